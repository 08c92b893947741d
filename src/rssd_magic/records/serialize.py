"""Turning the names a cell bound into JSON specs plus blobs, and back.

Each name gets one JSON spec (stored inside ``transition_result``, so SQL
users can see what was kept) of one of these kinds:

``json``
    ``None``, bools, ints, finite floats and short strings: the value itself,
    readable with ``json_extract``; no blob, no pickle.
``module``
    an imported module, restored by importing it again by name.
``pickle``
    anything else: pickle protocol 5, with large buffers (numpy arrays,
    bytes-like data) handed out-of-band so they are stored as raw bytes in
    their own blobs and read back without copies.  Objects that plain pickle
    can't rebuild in a fresh kernel (functions and classes defined in the
    notebook, lambdas) go through cloudpickle, which pickles them by value;
    a by-reference pickle is kept beside it (``by_reference``) and tried
    first, so an instance of a class the notebook defines stays one.
``frame``
    a SQL result table (registered by sql/frames.py).
``skipped``
    a closed file: nothing to keep, nothing to warn about.
``unserializable``
    the value could not be pickled: the reason, so replay can say which
    names were not restored.

Blobs are returned to the caller as ``(digest, buffer)`` pairs to store; the
spec refers to them by digest.  Loading is for specs of a record whose
signature the caller checked (trust.py): a replay of an unsigned record
loads nothing at all.  The codecs that run code or interpret bytes (pickle,
frame) check the caller's word once more, so no path that forgets to ask
can unpickle; the others still read their spec as a stranger's JSON.
"""

from __future__ import annotations

import importlib
import io
import itertools
import math
import pickle
import types
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle

from .digests import BUFFER, STREAM, algorithm, buffer_digest, stream_digest, usable

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
        # A lone surrogate ('x\udcff', from surrogateescape decoding) has no
        # UTF-8 form, so it can't be JSON text in the store: pickle keeps it.
        return len(value) <= MAX_INLINE_STR and value.isascii() or _utf8_ok(value)
    return False


def _utf8_ok(text: str) -> bool:
    if len(text) > MAX_INLINE_STR:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _pickle(value: Any) -> list[tuple[str, bytes, list[pickle.PickleBuffer]]]:
    """``[(pickler, stream, out-of-band buffers), …]``, best first.

    A plain pickle that names ``__main__`` refers to objects the notebook
    defines.  In a fresh kernel they may exist already (a class from an
    ordinary cell that ran before this one): loading *by reference* then gives
    an instance of the notebook's own class.  When they don't, the cloudpickle
    stream rebuilds them *by value*.  The buffers of both are content-addressed,
    so data they share is stored once.
    """

    def dumps(dump) -> tuple[bytes, list[pickle.PickleBuffer]]:
        buffers: list[pickle.PickleBuffer] = []

        def keep(buf: pickle.PickleBuffer) -> bool:
            # Returning a false value sends the buffer out-of-band.
            if buf.raw().nbytes < MIN_OUT_OF_BAND:
                return True
            buffers.append(buf)
            return False

        return dump(value, protocol=5, buffer_callback=keep), buffers

    streams = []
    try:
        data, buffers = dumps(pickle.dumps)
        if b"__main__" not in data:
            return [("pickle", data, buffers)]
        streams.append(("pickle", data, buffers))
    except Exception:  # noqa: BLE001 - lambdas, local classes: cloudpickle's job
        pass
    data, buffers = dumps(cloudpickle.dumps)
    return streams + [("cloudpickle", data, buffers)]


def _is_closed_file(value: Any) -> bool:
    return isinstance(value, io.IOBase) and value.closed


#: A buffer's digest not computed yet (:func:`dump_value` with *defer*):
#: ``pending:<n>`` until :func:`resolve_pending` hashes what was kept of it.
PENDING = "pending:"
_pending = itertools.count()


def dump_value(value: Any, defer: int | None = None) -> tuple[dict, list[Blob]]:
    """Spec and blobs for one value.  Never raises: failures become specs.

    With *defer*, pickle streams and out-of-band buffers of at least that
    many bytes are named ``pending:<n>`` instead of hashed: the caller
    snapshots them and hashes the snapshot later, off the user's time
    (:func:`resolve_pending`)."""
    if _is_inline(value):
        return {"kind": "json", "value": value}, []
    if isinstance(value, types.ModuleType):
        return {"kind": "module", "module": value.__name__}, []
    if _is_closed_file(value):
        # ``with open(...) as f`` leaves a closed file behind: nothing to
        # keep, and nothing worth a warning.
        return {"kind": "skipped", "type": type_name(value), "why": "closed file"}, []
    try:
        streams = _pickle(value)
    except Exception as exc:  # noqa: BLE001 - any pickling failure is reported, not raised
        return {
            "kind": "unserializable",
            "type": type_name(value),
            "error": f"{type(exc).__name__}: {exc}",
        }, []
    blobs: dict[str, Any] = {}
    refs = []
    for pickler, data, buffers in streams:
        digest = f"{PENDING}{next(_pending)}" if defer is not None and len(data) >= defer else stream_digest(data)
        ref = {"pickler": pickler, "blob": digest, "buffers": []}
        blobs[ref["blob"]] = data
        for buf in buffers:
            raw = buf.raw()
            digest = f"{PENDING}{next(_pending)}" if defer is not None and raw.nbytes >= defer else buffer_digest(raw)
            blobs[digest] = raw
            ref["buffers"].append(digest)
        refs.append(ref)
    spec = {
        "kind": "pickle",
        "type": type_name(value),
        **refs[-1],
        "size": sum(memoryview(b).nbytes for b in blobs.values()),
    }
    if len(refs) == 2:
        spec["by_reference"] = refs[0]
    return spec, list(blobs.items())


def dump_names(namespace: dict, names: list[str], defer: int | None = None) -> tuple[dict[str, dict], list[Blob]]:
    """Specs for *names* of *namespace*, and all the blobs they need (see
    :func:`dump_value` for *defer*)."""
    specs: dict[str, dict] = {}
    blobs: list[Blob] = []
    for name in names:
        spec, value_blobs = dump_value(namespace[name], defer)
        specs[name] = spec
        blobs.extend(value_blobs)
    return specs, blobs


def resolve_pending(specs: list[dict], blobs: list[Blob]) -> list[Blob]:
    """Hash the blobs named ``pending:<n>`` and put their digests in their
    place, in *specs* (changed in place) and in the blob list returned."""
    streams = set()

    def streams_of(ref: Any) -> None:
        if isinstance(ref, dict):
            streams.add(ref.get("blob"))
            streams_of(ref.get("by_reference"))

    for spec in specs:
        streams_of(spec)
    found = {
        d: (stream_digest if d in streams else buffer_digest)(data) for d, data in blobs if d.startswith(PENDING)
    }
    if not found:
        return blobs

    def fix(ref: Any) -> None:
        if isinstance(ref, dict):
            if isinstance(ref.get("blob"), str):
                ref["blob"] = found.get(ref["blob"], ref["blob"])
            if isinstance(ref.get("buffers"), list):
                ref["buffers"] = [found.get(d, d) for d in ref["buffers"]]
            fix(ref.get("by_reference"))

    for spec in specs:
        fix(spec)
    return [(found.get(d, d), data) for d, data in blobs]


def _rebound(func: types.FunctionType, namespace: dict) -> types.FunctionType:
    fresh = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__)
    fresh.__kwdefaults__ = func.__kwdefaults__
    fresh.__qualname__ = func.__qualname__
    fresh.__doc__ = func.__doc__
    fresh.__annotations__ = func.__annotations__
    fresh.__dict__.update(func.__dict__)
    return fresh


def _rebind_globals(value: Any, namespace: dict) -> Any:
    """Give functions (and methods of classes) restored by value the
    notebook's globals back.

    cloudpickle rebuilds notebook code with a private copy of the globals it
    referenced; the user expects it to read the live namespace, as if the
    cell had just defined it.
    """
    if isinstance(value, types.FunctionType) and value.__module__ == "__main__":
        return _rebound(value, namespace)
    if isinstance(value, type) and value.__module__ == "__main__":
        for attr, member in list(vars(value).items()):
            if isinstance(member, types.FunctionType):
                setattr(value, attr, _rebound(member, namespace))
            elif isinstance(member, (staticmethod, classmethod)) and isinstance(member.__func__, types.FunctionType):
                setattr(value, attr, type(member)(_rebound(member.__func__, namespace)))
            elif isinstance(member, property):
                parts = [
                    _rebound(f, namespace) if isinstance(f, types.FunctionType) else f
                    for f in (member.fget, member.fset, member.fdel)
                ]
                setattr(value, attr, property(*parts, member.__doc__))
    elif value.__class__.__module__ == "__main__" and isinstance(value.__class__, type):
        _rebind_globals(value.__class__, namespace)
    return value


def _unpickle(ref: Any, get_blob: Callable[[str], Any]) -> Any:
    blob, buffers = (ref.get("blob"), ref.get("buffers", [])) if isinstance(ref, dict) else (None, None)
    # A spec another tool wrote may name no blob, or something else than
    # digests: said as such, not as "blob None is missing".
    if not isinstance(blob, str) or not isinstance(buffers, list) or not all(isinstance(d, str) for d in buffers):
        raise NotRestored("has a malformed pickle spec (no blob digest)")
    check_digests([blob], buffers)
    return pickle.loads(get_blob(blob), buffers=[get_blob(d) for d in buffers])


def check_digests(streams: list[str], buffers: list[str] = ()) -> None:
    """NotRestored unless every digest names the algorithm its kind of
    blob must have (digests.py): a stream BLAKE3 or SHA-256, a raw buffer
    BLAKE3.  Checked before any blob is read, so a blob named by a digest
    that is not collision-resistant is never loaded, whoever signed it."""
    for digest in buffers:
        if not usable(digest, BUFFER):
            algo = algorithm(digest) or "no"
            if algo == "xxh3-128":
                raise NotRestored(
                    "names an XXH3-128 buffer (an older format, not collision-resistant): not loaded; "
                    "--force runs the cell again and records it anew"
                )
            raise NotRestored(f"names a buffer by {algo[:20]!r} digest (only blake3 is accepted): not loaded")
    for digest in streams:
        if not usable(digest, STREAM):
            raise NotRestored(
                f"names a stream by {(algorithm(digest) or 'no')[:20]!r} digest (only blake3 or sha256 is accepted): not loaded"
            )


def _load_pickle(spec: dict, get_blob: Callable[[str], Any], namespace: dict) -> Any:
    by_ref = spec.get("by_reference")
    if by_ref:
        try:
            return _unpickle(by_ref, get_blob)
        except (AttributeError, ImportError, pickle.UnpicklingError):
            pass  # the notebook doesn't define it (yet): rebuild it by value
    return _rebind_globals(_unpickle(spec, get_blob), namespace)


class NotRestored(Exception):
    """A spec that yields no value; ``why`` is empty when that is expected."""

    def __init__(self, why: str = ""):
        super().__init__(why)
        self.why = why


# -- codecs ----------------------------------------------------------------------
#
# Each spec kind is read back by one codec: how to load it, which blobs it
# refers to (gc keeps them, trust checks them), and whether loading it runs
# code or interprets bytes (then only a signed spec is loaded).  Kinds that
# live in other modules register themselves on import; the ones this module
# can't import without a cycle (SQL result tables) are imported by name the
# first time a spec of their kind is seen.


@dataclass(frozen=True)
class Codec:
    """How specs of one ``kind`` are loaded, and what they refer to."""

    kind: str
    load: Callable[[dict, Callable[[str], Any], dict], Any]
    blobs: Callable[[dict], list[str]] = lambda spec: []
    signed: bool = False


CODECS: dict[str, Codec] = {}
#: Kinds registered by a module of their own, imported on first use.
_PLUGINS = {"frame": "rssd_magic.sql.frames"}


def register(codec: Codec) -> Codec:
    CODECS[codec.kind] = codec
    _WITH_BLOBS.clear()
    return codec


#: :func:`kinds_with_blobs`, remembered until a codec is registered (every
#: recorded run asks, through the tally: 9 µs a time to work out).
_WITH_BLOBS: list[list[str]] = []


def kinds_with_blobs() -> list[str]:
    """The kinds whose specs may refer to blobs (plugins loaded to ask them)."""
    if _WITH_BLOBS:
        return _WITH_BLOBS[0]
    for kind in _PLUGINS:
        codec_for({"kind": kind})
    none = Codec.__dataclass_fields__["blobs"].default
    kinds = sorted(kind for kind, codec in CODECS.items() if codec.blobs is not none)
    _WITH_BLOBS[:] = [kinds]
    return kinds


def codec_for(spec: Any) -> Codec | None:
    """The codec of *spec*'s kind (None for a kind nobody registered)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if not isinstance(kind, str):
        return None
    codec = CODECS.get(kind)
    if codec is None and kind in _PLUGINS:
        importlib.import_module(_PLUGINS[kind])
        codec = CODECS.get(kind)
    return codec


def spec_blobs(spec: Any) -> list[str]:
    """Digests of the blobs *spec* refers to (none for an unknown kind)."""
    codec = codec_for(spec)
    if codec is None:
        return []
    return [d for d in codec.blobs(spec) if isinstance(d, str)]


def _ref_blobs(ref: Any) -> list[str]:
    if not isinstance(ref, dict):
        return []
    buffers = ref.get("buffers")
    return [ref.get("blob"), *(buffers if isinstance(buffers, list) else [])]


def _pickle_blobs(spec: dict) -> list[str]:
    return _ref_blobs(spec) + _ref_blobs(spec.get("by_reference"))


def _unserializable(spec: dict, get_blob, namespace) -> Any:
    raise NotRestored(f"was not serializable ({spec.get('error', 'unknown reason')})")


def _skipped(spec: dict, get_blob, namespace) -> Any:
    raise NotRestored()


def _json(spec: dict, get_blob, namespace) -> Any:
    if "value" not in spec:
        raise NotRestored("has no value in its record")
    return spec["value"]


def _module(spec: dict, get_blob, namespace) -> Any:
    """A module, imported again by its dotted name through the normal import
    system — the import the cell's own code made, now made by a signed
    record.  A name is only a name: no path, no relative import, nothing
    that would make ``import`` read a file the name doesn't say."""
    name = spec.get("module")
    if not _is_module_name(name):
        raise NotRestored(f"names no importable module ({str(name)[:60]!r})")
    return importlib.import_module(name)


def _is_module_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= 200
        and all(part.isidentifier() for part in name.split("."))
    )


register(Codec("json", _json))
register(Codec("module", _module))
register(Codec("pickle", _load_pickle, _pickle_blobs, signed=True))
register(Codec("skipped", _skipped))
register(Codec("unserializable", _unserializable))


def load_value(spec: Any, get_blob: Callable[[str], Any], namespace: dict, trusted: bool) -> Any:
    """Rebuild one value from its spec, or raise NotRestored (or the loader's error)."""
    codec = codec_for(spec)
    if codec is None:
        kind = spec.get("kind") if isinstance(spec, dict) else None
        raise NotRestored(f"unknown kind {kind!r}")
    # Checked for every binary payload, even data-only formats: nothing
    # from the RSSD is deserialized unless we (or a trusted key) wrote it.
    if codec.signed and not trusted:
        raise NotRestored(UNTRUSTED)
    return codec.load(spec, get_blob, namespace)


def load_names(
    specs: dict[str, dict],
    get_blob: Callable[[str], Any],
    namespace: dict,
    trusted: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Rebuild values from *specs*; returns ``(values, {name: why not})``.

    A pickle is only loaded when *trusted* (the record's signature was
    judged good); *get_blob* must verify each blob against its digest.
    Each value is bound into *namespace* as soon as it is rebuilt, so a later
    name (an instance) can find an earlier one (its class) by reference.
    """
    values: dict[str, Any] = {}
    missing: dict[str, str] = {}
    if not isinstance(specs, dict):
        return values, {"(names)": f"recorded names are not a JSON object ({type(specs).__name__})"}
    for name, spec in specs.items():
        try:
            values[name] = namespace[name] = load_value(spec, get_blob, namespace, trusted)
        except NotRestored as exc:
            if exc.why:
                missing[name] = exc.why
        except KeyError as exc:
            missing[name] = f"blob {str(exc.args[0])[:24]}… is missing from the RSSD"
        except Exception as exc:  # noqa: BLE001 - a bad value must not stop the replay
            missing[name] = f"could not be restored ({type(exc).__name__}: {exc})"
    return values, missing
