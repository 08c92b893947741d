"""Result tables of SQL cells: how a DataFrame is kept in the RSSD and read
back, and how it is shown.

:func:`dump_frame` keeps small frames as JSON inside the spec (readable
with ``json_extract``), larger ones as one Parquet blob (readable by
DuckDB's ``read_parquet``), Arrow IPC when Parquet would change a column
type, a pickle when Arrow can't hold the frame at all (loaded only from a
trusted payload).  Dtypes survive every route.

A result table is one more kind of stored value: this module registers the
``frame`` codec beside serialize's ``json``/``pickle``/``module`` ones, so
:func:`rssd_magic.records.serialize.load_names` restores an ``--out`` name and gc
and trust find a table's blobs like any other.  It imports serialize, never
the other way round (serialize imports it by name, on first use).

pandas is imported when a frame is first built or read; pyarrow only when
it is installed (the ``sql`` extra), for the Parquet and Arrow routes.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any, Callable

from ..records.canonical import canonical
from ..records.serialize import Blob, Codec, NotRestored, check_digests, dump_value, load_names, register, spec_blobs
from ..records.trust import stream_digest

#: Frames with at most this many cells (rows × columns) may be kept as JSON…
JSON_MAX_CELLS = 10_000
#: …if their encoded data also stays under this many bytes.
JSON_MAX_BYTES = 256 * 1024
#: Blob compression for Parquet and Arrow IPC.
COMPRESSION = "zstd"
#: Rows shown by the HTML/text table (the frame itself keeps all rows).
DISPLAY_MAX_ROWS = 60

_MASKED_INTS = {f"{p}Int{b}" for p in ("", "U") for b in (8, 16, 32, 64)}
# What a SQLite value can be: an object column holding a mix of these (SQLite
# types values, not columns) is kept cell by cell as tagged JSON.
_SCALARS = {type(None), bool, int, float, str, bytes, bytearray}


class _NotScalar(Exception):
    pass


def _cell(v: Any) -> Any:
    """JSON form of one object-column value (bool, int and float stay
    distinct: JSON writes ``true``, ``1`` and ``1.0``)."""
    t = type(v)
    if v is None or t in (bool, int, str):
        return v
    if t is float:
        return v if math.isfinite(v) else {"$float": repr(v)}
    if t is bytes:
        return {"$bytes": base64.b64encode(v).decode("ascii")}
    if t is bytearray:
        return {"$bytearray": base64.b64encode(v).decode("ascii")}
    raise _NotScalar


def _uncell(v: Any) -> Any:
    if isinstance(v, dict):
        if "$float" in v:
            return float(v["$float"])
        if "$bytes" in v:
            return base64.b64decode(v["$bytes"])
        if "$bytearray" in v:
            return bytearray(base64.b64decode(v["$bytearray"]))
    return v


def _objects(values: list) -> Any:
    import numpy as np

    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def _i8(values: Any) -> list:
    import numpy as np

    nat = np.iinfo("i8").min
    return [None if v == nat else v for v in values.view("i8").tolist()]


def _from_i8(values: list, dtype: str) -> Any:
    import numpy as np

    nat = np.iinfo("i8").min
    return np.array([nat if v is None else v for v in values], dtype="i8").view(dtype)


def _json_column(series: Any) -> tuple[dict, list] | None:
    """``(dtype description, values)`` for a column JSON keeps exactly, else None."""
    import numpy as np
    import pandas as pd

    dtype = series.dtype
    if isinstance(dtype, np.dtype):
        values = series.to_numpy()
        if dtype.kind in "biu":
            return {"dtype": dtype.str}, values.tolist()
        if dtype.kind == "f":
            return {"dtype": dtype.str}, [
                v if math.isfinite(v) else repr(v) for v in values.tolist()
            ]
        if dtype.kind in "mM":
            return {"dtype": dtype.str}, _i8(values)
        if dtype.kind == "O":
            try:
                return {"dtype": "object"}, [_cell(v) for v in values.tolist()]
            except _NotScalar:
                return None
        return None
    if isinstance(dtype, pd.DatetimeTZDtype):
        utc = series.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()
        return {"dtype": "datetimetz", "unit": dtype.unit, "tz": str(dtype.tz)}, _i8(utc)
    if isinstance(dtype, pd.StringDtype):
        na = "NA" if dtype.na_value is pd.NA else "nan"
        return {"dtype": "string", "storage": dtype.storage, "na": na}, [
            None if pd.isna(v) else v for v in series.tolist()
        ]
    if isinstance(dtype, pd.BooleanDtype) or (
        isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.name in _MASKED_INTS
    ):
        return {"dtype": "masked", "name": dtype.name}, [
            None if v is pd.NA else v for v in series.tolist()
        ]
    return None


def _json_restore(desc: dict, values: list) -> Any:
    import numpy as np
    import pandas as pd

    kind = desc["dtype"]
    if kind == "object":
        return _objects([_uncell(v) for v in values])
    if kind == "string":
        na = pd.NA if desc["na"] == "NA" else np.nan
        return pd.array(values, dtype=pd.StringDtype(desc["storage"], na_value=na))
    if kind == "masked":
        return pd.array(values, dtype=desc["name"])
    if kind == "datetimetz":
        raw = _from_i8(values, f"M8[{desc['unit']}]")
        return pd.Series(raw).dt.tz_localize("UTC").dt.tz_convert(desc["tz"]).array
    dtype = np.dtype(kind)
    if dtype.kind in "mM":
        return _from_i8(values, dtype.str)
    if dtype.kind == "f":
        return np.array([float(v) for v in values], dtype=dtype)
    return np.array(values, dtype=dtype)


def _columns_desc(df: Any) -> tuple[list, str] | None:
    names = list(df.columns)
    if not all(n is None or type(n) in (str, int, float, bool) for n in names):
        return None  # MultiIndex tuples and such: only the pickle route keeps them
    return names, str(df.columns.dtype)


def _restore_columns(names: list, dtype: str) -> Any:
    import pandas as pd

    try:
        return pd.Index(names, dtype=dtype)
    except (TypeError, ValueError):
        return pd.Index(names)


def _dump_json(df: Any, cols: tuple[list, str]) -> dict | None:
    import pandas as pd

    if df.shape[0] * max(df.shape[1], 1) > JSON_MAX_CELLS:
        return None
    idx = df.index
    if type(idx) is not pd.RangeIndex or idx.name is not None:
        return None
    dtypes, data = [], []
    for i in range(df.shape[1]):
        encoded = _json_column(df.iloc[:, i])
        if encoded is None:
            return None
        dtypes.append(encoded[0])
        data.append(encoded[1])
    try:
        if len(canonical(data)) > JSON_MAX_BYTES:
            return None
    except (TypeError, ValueError):
        return None
    return {
        "kind": "frame",
        "format": "json",
        "rows": int(df.shape[0]),
        "columns": cols[0],
        "columns_dtype": cols[1],
        "index": [idx.start, idx.stop, idx.step],
        "dtypes": dtypes,
        "data": data,
    }


def _arrow_names(names: list) -> list[str]:
    # Parquet needs unique string names; readable names are kept when they
    # qualify (SQL users see them in read_parquet), else positional ones.
    if all(type(n) is str for n in names) and len(set(names)) == len(names) and not any(
        n.startswith("__") for n in names
    ):
        return list(names)
    return [f"c{i}" for i in range(len(names))]


def _arrow_to_frame(table: Any, spec: dict) -> Any:
    df = table.to_pandas()
    tagged = set(spec.get("json_columns", ()))
    for i, dtype in enumerate(spec["dtypes"]):
        if dtype != "object":
            continue
        column = table.column(spec["arrow_names"][i])
        if i in tagged:
            df.isetitem(i, _objects([None if v is None else _uncell(json.loads(v)) for v in column.to_pylist()]))
        elif str(df.dtypes.iloc[i]) != "object":
            # pandas 3 reads Arrow strings as its ``str`` dtype; a column that
            # was plain ``object`` goes back to object, None staying None.
            df.isetitem(i, column.to_numpy(zero_copy_only=False).astype(object))
    df.columns = _restore_columns(spec["columns"], spec["columns_dtype"])
    return df


def _same_dtype(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b and getattr(a, "storage", None) == getattr(b, "storage", None)


def _dump_arrow(df: Any, cols: tuple[list, str]) -> tuple[dict, list[Blob]] | None:
    import pandas as pd
    import pyarrow as pa

    arrow_names = _arrow_names(cols[0])
    frame = df.copy(deep=False)
    frame.columns = arrow_names
    json_columns = []
    for i in range(df.shape[1]):
        if df.dtypes.iloc[i] != object:
            continue
        values = df.iloc[:, i].tolist()
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) == 1 and kinds <= {str, bytes, bytearray}:
            continue  # an Arrow string or binary column
        if kinds and kinds <= _SCALARS:  # a SQLite-style mix: tagged JSON per cell
            encoded = [None if v is None else canonical(_cell(v)) for v in values]
            frame.isetitem(i, pd.Series(encoded, dtype=object, index=df.index))
            json_columns.append(i)
    try:
        table = pa.Table.from_pandas(frame, preserve_index=None)
    except (pa.ArrowException, TypeError, ValueError):
        return None
    spec: dict = {
        "kind": "frame",
        "rows": int(df.shape[0]),
        "columns": cols[0],
        "columns_dtype": cols[1],
        "arrow_names": arrow_names,
        "dtypes": [str(d) for d in df.dtypes],
    }
    if json_columns:
        spec["json_columns"] = json_columns
    # What reading back gives, predicted from the table's first zero rows:
    # a frame Arrow can't give back exactly takes the pickle route instead.
    try:
        probe = _arrow_to_frame(table.slice(0, 0), spec)
    except Exception:  # noqa: BLE001
        return None
    if not all(_same_dtype(a, b) for a, b in zip(probe.dtypes, df.dtypes)) or not (
        type(probe.index) is type(df.index) and _same_dtype(probe.index.dtype, df.index.dtype)
    ):
        return None
    spec["format"], data = _table_blob(table)
    # A stream's digest (BLAKE3; SHA-256 in older records): these bytes get parsed.
    digest = stream_digest(data)
    spec["blob"] = digest
    spec["size"] = data.size
    return spec, [(digest, data)]


def _table_blob(table: Any) -> tuple[str, Any]:
    """``(format, bytes)`` of *table*: Parquet, or Arrow IPC when Parquet
    would change a column type (it has no second-resolution timestamps, and
    lacks a few other Arrow types)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=COMPRESSION)
    data = sink.getvalue()
    if pq.read_schema(pa.BufferReader(data)).remove_metadata().equals(table.schema.remove_metadata()):
        return "parquet", data
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=COMPRESSION)
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return "arrow", sink.getvalue()


def _has_pyarrow() -> bool:
    """pyarrow is optional: without it large tables are kept as (signed)
    pickles instead of Parquet, and Parquet ones written elsewhere can't be
    read back here (their outputs still replay)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def dump_frame(df: Any) -> tuple[dict, list[Blob]]:
    """``(spec, blobs)`` for a result frame: JSON when small, else Parquet
    (Arrow IPC, or a pickle, when Parquet can't keep a dtype).  The spec says
    ``format``, ``rows``, ``columns`` and ``dtypes`` whatever the route."""
    cols = _columns_desc(df)
    if cols is not None:
        spec = _dump_json(df, cols)
        if spec is not None:
            return spec, []
        dumped = _dump_arrow(df, cols) if _has_pyarrow() else None
        if dumped is not None:
            return dumped
    inner, blobs = dump_value(df)
    return {
        "kind": "frame",
        "format": "pickle",
        "rows": int(df.shape[0]),
        "columns": [str(c) for c in df.columns],
        "dtypes": [str(d) for d in df.dtypes],
        "value": inner,
    }, blobs


def load_frame(spec: dict, get_blob: Callable[[str], Any], trusted: bool = False) -> Any:
    """The frame :func:`dump_frame` described.

    JSON, Parquet and Arrow are data and load regardless; the pickle route
    runs code, so it loads only when the payload is *trusted* (its
    signature checked).  A missing Parquet/Arrow blob is a KeyError; a
    pickle that can't be loaded (untrusted, blob missing, …) a ValueError
    saying why.
    """
    import pandas as pd

    fmt = spec.get("format")
    if fmt == "json":
        start, stop, step = spec["index"]
        columns = [_json_restore(d, v) for d, v in zip(spec["dtypes"], spec["data"])]
        df = pd.DataFrame(dict(enumerate(columns)), index=pd.RangeIndex(start, stop, step))
        df.columns = _restore_columns(spec["columns"], spec["columns_dtype"])
        return df
    if fmt in ("parquet", "arrow"):
        if not _has_pyarrow():
            raise ValueError(f"the result table is stored as {fmt.title()}, which needs pyarrow (pip install pyarrow)")
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            check_digests([spec.get("blob")])
        except NotRestored as exc:
            raise ValueError(f"the result table {exc.why}") from None
        source = pa.BufferReader(pa.py_buffer(get_blob(spec["blob"])))
        table = pq.read_table(source) if fmt == "parquet" else pa.ipc.open_file(source).read_all()
        return _arrow_to_frame(table, spec)
    if fmt == "pickle":
        values, missing = load_names({"frame": spec["value"]}, get_blob, {}, trusted=trusted)
        if "frame" in missing:
            raise ValueError(f"the result table {missing['frame']}")
        return values["frame"]
    raise ValueError(f"unknown result table format {fmt!r}")


def frame_bundle(df: Any) -> tuple[dict, dict]:
    """``(data, metadata)``: *df* as an HTML table and as text, the way
    pandas shows it (long frames cut to :data:`DISPLAY_MAX_ROWS` rows)."""
    import pandas as pd

    with pd.option_context("display.max_rows", DISPLAY_MAX_ROWS, "display.min_rows", 20):
        html = df._repr_html_()
        if html is None:  # display.notebook_repr_html is off
            html = df.to_html(max_rows=DISPLAY_MAX_ROWS)
        text = repr(df)
    return {"text/plain": text, "text/html": html}, {}


def _frame_blobs(spec: dict) -> list[str]:
    """Blobs of a result table: its Parquet/Arrow blob, or its inner pickle's."""
    inner = spec.get("value")
    return [spec.get("blob"), *(spec_blobs(inner) if isinstance(inner, dict) else [])]


def _load(spec: dict, get_blob: Callable[[str], Any], namespace: dict) -> Any:
    # serialize.load_value refuses an unsigned spec of a signed codec before
    # calling this, so reaching here means the payload was trusted.
    return load_frame(spec, get_blob, trusted=True)


# Result tables are one more kind of stored value, loaded like the others.
# serialize imports this module by name the first time it meets a "frame"
# spec (serialize._PLUGINS), so a replay or a gc that never ran a SQL cell
# still reads them, and serialize never imports us back.
register(Codec("frame", _load, _frame_blobs, signed=True))
