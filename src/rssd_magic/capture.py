"""Recording what a cell shows while it runs, and showing it again.

Outputs are kept as a list in nbformat's output shape (``stream``,
``display_data``, ``execute_result``, ``error``), in the order they happened,
so a replay is the same sequence with the same MIME types, and any tool that
reads notebooks can read ``transition_result``.

Recording is a tee: the cell's output still goes live to the frontend while
a copy is kept.  Three channels are watched, all through objects the shell
already has (duck-typed, so this module needs no IPython import):

* ``sys.stdout`` / ``sys.stderr`` — wrapped by :class:`Tee`;
* ``shell.display_pub.publish`` / ``clear_output`` — rich displays;
* ``shell.displayhook.write_format_data`` — the cell's result.

While the display publisher or the display hook runs, stream recording is
paused: a terminal shell *prints* displays and ``Out[n]``, and those prints
must not be recorded a second time as stdout.
"""

from __future__ import annotations

import base64
import sys
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator


def _jsonable(value: Any) -> Any:
    """Make a MIME bundle JSON-safe the way Jupyter does (bytes → base64)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _size(data: dict) -> int:
    return sum(len(v) if isinstance(v, str) else 64 for v in data.values())


def _utf8(text: str) -> str:
    """Text that encodes as UTF-8: lone surrogates (undecodable bytes that
    reached a text stream) become U+FFFD instead of failing the record."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # bytes smuggled in by surrogateescape: decode them for real
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class OutputRecorder:
    """Collects outputs in nbformat shape, merging consecutive stream text.

    At most *limit* characters of output are kept (a cell printing a
    gigabyte must not put a gigabyte into the RSSD); past it, recording
    stops and :meth:`finish` appends a note saying so.  What the user sees
    live is never cut.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.outputs: list[dict] = []
        self.paused = 0
        self.limit = limit
        self.size = 0
        self.truncated = False
        self._clear_pending = False
        # display_id -> outputs shown with it; kept aside because nbformat's
        # display_data has no place for transient data.
        self._displays: dict[str, list[dict]] = {}

    def _room(self, n: int) -> int:
        """How much of *n* more characters may be kept."""
        if self.truncated:
            return 0
        if self.limit is not None and self.size + n > self.limit:
            self.truncated = True
            return max(0, self.limit - self.size)
        self.size += n
        return n

    def _add(self, output: dict) -> None:
        if self._clear_pending:
            self.outputs.clear()
            self._clear_pending = False
        self.outputs.append(output)

    def stream(self, name: str, text: str) -> None:
        if self.paused or not text:
            return
        room = self._room(len(text))
        if room < len(text):
            text = text[:room]
            if not text:
                return
        last = self.outputs[-1] if self.outputs and not self._clear_pending else None
        if last and last["output_type"] == "stream" and last["name"] == name:
            last["text"].append(text)  # joined in finish(): no quadratic +=
        else:
            self._add({"output_type": "stream", "name": name, "text": [text]})

    def finish(self) -> list[dict]:
        """The outputs, JSON- and UTF-8-safe, with a note if any were cut."""
        for out in self.outputs:
            if out["output_type"] == "stream" and isinstance(out["text"], list):
                out["text"] = _utf8("".join(out["text"]))
        if self.truncated:
            self.outputs.append(
                {
                    "output_type": "stream",
                    "name": "stderr",
                    "text": f"[stateful] output recorded up to {self.limit} characters; the rest was shown "
                    "live but not recorded (StatefulMagics.max_output_size)\n",
                }
            )
        return self.outputs

    def display(self, data: dict, metadata: dict | None, transient: dict | None, update: bool) -> None:
        display_id = (transient or {}).get("display_id")
        if update:
            # An update replaces the earlier outputs with the same display_id,
            # as nbclient does when it writes a notebook.
            for out in self._displays.get(display_id, ()):
                out["data"] = _jsonable(data)
                out["metadata"] = _jsonable(metadata or {})
            return
        out = {"output_type": "display_data", "data": _jsonable(data), "metadata": _jsonable(metadata or {})}
        if not self._room(_size(out["data"])):
            return
        if display_id is not None:
            self._displays.setdefault(display_id, []).append(out)
        self._add(out)

    def result(self, data: dict, metadata: dict | None, execution_count: int | None) -> None:
        if not self._room(_size(data)):
            return
        self._add(
            {
                "output_type": "execute_result",
                "execution_count": execution_count,
                "data": _jsonable(data),
                "metadata": _jsonable(metadata or {}),
            }
        )

    def clear(self, wait: bool = False) -> None:
        if wait:
            self._clear_pending = True
        else:
            self.outputs.clear()


class Tee:
    """A text stream that forwards to *target* and records into *recorder*."""

    def __init__(self, target: Any, name: str, recorder: OutputRecorder) -> None:
        self._target = target
        self._name = name
        self._recorder = recorder

    def write(self, text: str) -> int:
        n = self._target.write(text)
        self._recorder.stream(self._name, text)
        return n

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, attr: str) -> Any:
        # flush, isatty, fileno, encoding, ipykernel's extras: all the target's.
        return getattr(self._target, attr)


@contextmanager
def patched(obj: Any, attr: str, replacement: Any) -> Iterator[None]:
    """Shadow a bound method on one instance, then remove the shadow."""
    had_own = attr in vars(obj)
    saved = vars(obj).get(attr)
    setattr(obj, attr, replacement)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, attr, saved)
        else:
            delattr(obj, attr)


@contextmanager
def capture(shell: Any, limit: int | None = None) -> Iterator[OutputRecorder]:
    """Tee everything *shell* shows while the block runs into a recorder
    (which keeps at most *limit* characters)."""
    rec = OutputRecorder(limit)
    pub, hook = shell.display_pub, shell.displayhook
    orig_publish, orig_clear = pub.publish, pub.clear_output
    orig_write_format, orig_start, orig_finish = (
        hook.write_format_data,
        hook.start_displayhook,
        hook.finish_displayhook,
    )

    def publish(data, metadata=None, *args, transient=None, update=False, **kwargs):
        rec.display(data, metadata, transient, update)
        rec.paused += 1
        try:
            return orig_publish(data, metadata, *args, transient=transient, update=update, **kwargs)
        finally:
            rec.paused -= 1

    def clear_output(wait=False):
        rec.clear(wait)
        return orig_clear(wait=wait)

    def write_format_data(format_dict, md_dict=None):
        rec.result(format_dict, md_dict, getattr(shell, "execution_count", None))
        return orig_write_format(format_dict, md_dict)

    def start_displayhook():
        rec.paused += 1
        return orig_start()

    def finish_displayhook():
        try:
            return orig_finish()
        finally:
            rec.paused -= 1

    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(out, "stdout", rec), Tee(err, "stderr", rec)
    try:
        with ExitStack() as stack:
            # Each replacement is named after the method it shadows.
            for obj, replacement in (
                (pub, publish),
                (pub, clear_output),
                (hook, write_format_data),
                (hook, start_displayhook),
                (hook, finish_displayhook),
            ):
                stack.enter_context(patched(obj, replacement.__name__, replacement))
            yield rec
    finally:
        # Restore only what we installed: a cell may have replaced the
        # streams itself (contextlib.redirect_stdout that it left in place).
        if isinstance(sys.stdout, Tee):
            sys.stdout = out
        if isinstance(sys.stderr, Tee):
            sys.stderr = err


class ReplayedResult:
    """Stands for a cell's recorded result: the shell's display hook shows it
    through ``_repr_mimebundle_`` with exactly the recorded MIME bundle."""

    def __init__(self, data: dict, metadata: dict) -> None:
        self.data = data
        self.metadata = metadata

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", ""))


def replay(outputs: Any, shell: Any) -> tuple[ReplayedResult | None, int]:
    """Show recorded *outputs* again through *shell*, in order.

    Streams are written to the current ``sys.stdout``/``sys.stderr`` and
    displays go through the shell's publisher.  The cell's result is not
    shown here: it is returned, for the magic to return, so the shell shows
    it as this cell's ``execute_result`` (with this cell's prompt number).
    Returns ``(result, how many outputs were malformed and skipped)``: the
    JSON may have been written by another tool.
    """
    if not isinstance(outputs, list):
        return None, 1
    result, skipped = None, 0
    for out in outputs:
        try:
            kind = out.get("output_type")
            if kind == "stream":
                text = out["text"]
                text = "".join(text) if isinstance(text, list) else text
                stream = sys.stderr if out.get("name") == "stderr" else sys.stdout
                stream.write(str(text))
                stream.flush()  # keep stdout/stderr interleaving as recorded
            elif kind == "display_data":
                data, metadata = out["data"], out.get("metadata", {})
                if not isinstance(data, dict) or not isinstance(metadata, dict):
                    raise TypeError("data and metadata must be objects")
                shell.display_pub.publish(data=data, metadata=metadata)
            elif kind == "execute_result":
                data, metadata = out["data"], out.get("metadata", {})
                if not isinstance(data, dict) or not isinstance(metadata, dict):
                    raise TypeError("data and metadata must be objects")
                result = ReplayedResult(data, metadata)
            elif kind != "error":
                raise TypeError(f"unknown output_type {kind!r}")
        except (AttributeError, KeyError, TypeError, ValueError):
            skipped += 1
    return result, skipped
