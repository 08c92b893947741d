"""Turning the names a cell bound into JSON specs plus blobs, and back.

Each name gets one JSON spec (stored inside ``transition_result``, so SQL
users can see what was kept) of one of these kinds:

``json``
    ``None``, bools, ints, finite floats and short strings: the value itself,
    readable with ``json_extract``; no blob, no pickle.
``module``
    an imported module, restored by importing it again.
``pickle``
    anything else: pickle protocol 5, with large buffers (numpy arrays,
    bytes-like data) handed out-of-band so they are stored as raw bytes in
    their own blobs and read back without copies.  Objects that plain pickle
    can't rebuild in a fresh kernel (functions and classes defined in the
    notebook, lambdas) go through cloudpickle, which pickles them by value.
``unserializable``
    the value could not be pickled: the reason, so replay can say which
    names were not restored.

Blobs are returned to the caller as ``(digest, buffer)`` pairs to store; the
spec refers to them by digest.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from typing import Any, Callable

import cloudpickle

from .trust import buffer_digest, stream_digest

#: Strings longer than this go to a blob rather than into the JSON.
MAX_INLINE_STR = 4096
#: Pickle buffers smaller than this stay inside the pickle stream.
MIN_OUT_OF_BAND = 64 * 1024

Blob = tuple[str, Any]

#: Why a pickled name was not restored when its signature didn't check out.
UNTRUSTED = "is not signed by your key"


def type_name(value: Any) -> str:
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}"


def _is_inline(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    t = type(value)
    if t is int:
        return True
    if t is float:
        return math.isfinite(value)
    if t is str:
        return len(value) <= MAX_INLINE_STR
    return False


def _pickle(value: Any) -> tuple[bytes, list[pickle.PickleBuffer], str]:
    buffers: list[pickle.PickleBuffer] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        # Returning a false value sends the buffer out-of-band.
        if buf.raw().nbytes < MIN_OUT_OF_BAND:
            return True
        buffers.append(buf)
        return False

    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=keep)
        # A plain pickle that names __main__ refers to objects defined in the
        # notebook; a fresh kernel does not have them yet, so pickle by value.
        if b"__main__" not in data:
            return data, buffers, "pickle"
    except Exception:
        pass
    buffers.clear()
    data = cloudpickle.dumps(value, protocol=5, buffer_callback=keep)
    return data, buffers, "cloudpickle"


def dump_value(value: Any) -> tuple[dict, list[Blob]]:
    """Spec and blobs for one value.  Never raises: failures become specs."""
    if _is_inline(value):
        return {"kind": "json", "value": value}, []
    if isinstance(value, types.ModuleType):
        return {"kind": "module", "module": value.__name__}, []
    try:
        data, buffers, pickler = _pickle(value)
    except Exception as exc:  # noqa: BLE001 - any pickling failure is reported, not raised
        return {
            "kind": "unserializable",
            "type": type_name(value),
            "error": f"{type(exc).__name__}: {exc}",
        }, []
    blobs: list[Blob] = [(stream_digest(data), data)]
    for buf in buffers:
        raw = buf.raw()
        blobs.append((buffer_digest(raw), raw))
    spec = {
        "kind": "pickle",
        "type": type_name(value),
        "pickler": pickler,
        "blob": blobs[0][0],
        "buffers": [d for d, _ in blobs[1:]],
        "size": sum(memoryview(b).nbytes for _, b in blobs),
    }
    return spec, blobs


def dump_names(namespace: dict, names: list[str]) -> tuple[dict[str, dict], list[Blob]]:
    """Specs for *names* of *namespace*, and all the blobs they need."""
    specs: dict[str, dict] = {}
    blobs: list[Blob] = []
    for name in names:
        spec, value_blobs = dump_value(namespace[name])
        specs[name] = spec
        blobs.extend(value_blobs)
    return specs, blobs


def _rebind_globals(value: Any, namespace: dict) -> Any:
    """Give a function restored by value the notebook's globals back.

    cloudpickle rebuilds a notebook function with a private copy of the
    globals it referenced; the user expects it to see the live namespace, as
    if the cell had just defined it.
    """
    if isinstance(value, types.FunctionType) and value.__module__ == "__main__":
        fresh = types.FunctionType(
            value.__code__, namespace, value.__name__, value.__defaults__, value.__closure__
        )
        fresh.__kwdefaults__ = value.__kwdefaults__
        fresh.__qualname__ = value.__qualname__
        fresh.__doc__ = value.__doc__
        fresh.__annotations__ = value.__annotations__
        fresh.__dict__.update(value.__dict__)
        return fresh
    return value


def load_names(
    specs: dict[str, dict],
    get_blob: Callable[[str], Any],
    namespace: dict,
    trusted: Callable[[str], bool] = lambda name: False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Rebuild values from *specs*; returns ``(values, {name: why not})``.

    A pickle is only loaded when ``trusted(name)`` says its payload carries
    a valid signature; *get_blob* must verify each blob against its digest.
    """
    values: dict[str, Any] = {}
    missing: dict[str, str] = {}
    if not isinstance(specs, dict):
        return values, {"(names)": f"recorded names are not a JSON object ({type(specs).__name__})"}
    for name, spec in specs.items():
        kind = spec.get("kind") if isinstance(spec, dict) else None
        try:
            if kind == "pickle" and not trusted(name):
                missing[name] = UNTRUSTED
                continue
            if kind == "json":
                values[name] = spec["value"]
            elif kind == "module":
                __import__(spec["module"])
                values[name] = sys.modules[spec["module"]]
            elif kind == "pickle":
                buffers = [get_blob(d) for d in spec.get("buffers", ())]
                value = pickle.loads(get_blob(spec["blob"]), buffers=buffers)
                values[name] = _rebind_globals(value, namespace)
            elif kind == "unserializable":
                missing[name] = f"was not serializable ({spec.get('error', 'unknown reason')})"
            else:
                missing[name] = f"unknown kind {kind!r}"
        except KeyError as exc:
            missing[name] = f"blob {str(exc.args[0])[:24]}… is missing from the RSSD"
        except Exception as exc:  # noqa: BLE001 - a bad value must not stop the replay
            missing[name] = f"could not be restored ({type(exc).__name__}: {exc})"
    return values, missing
