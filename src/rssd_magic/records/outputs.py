"""What a cell showed, as one type: nbformat's outputs (``stream``,
``display_data``, ``execute_result``, ``error``), made and read here only.

An :data:`Output` is the JSON object nbformat and Jupyter use, so a record's
``outputs`` (``transition_result``) read like a notebook's.  Records are
also written by other tools and may hold anything, so the readers take any
value and answer None or "" for what is not an output of their kind.
Stream text may be a string or a list of strings (nbformat allows both).
"""

from __future__ import annotations

from typing import Any

#: One nbformat output (a JSON object).
Output = dict[str, Any]

STREAM, DISPLAY, RESULT, ERROR = "stream", "display_data", "execute_result", "error"


def stream(name: str, text: str | list[str]) -> Output:
    return {"output_type": STREAM, "name": name, "text": text}


def display(data: dict, metadata: dict) -> Output:
    return {"output_type": DISPLAY, "data": data, "metadata": metadata}


def result(data: dict, metadata: dict, execution_count: int | None) -> Output:
    return {"output_type": RESULT, "execution_count": execution_count, "data": data, "metadata": metadata}


def error(ename: str, evalue: str, traceback: list[str]) -> Output:
    return {"output_type": ERROR, "ename": ename, "evalue": evalue, "traceback": traceback}


def kind(out: Any) -> str | None:
    """The ``output_type`` of *out* (None when it is not an output)."""
    return out.get("output_type") if isinstance(out, dict) else None


def joined(text: Any) -> str:
    """nbformat text (a string, or a list of them) as one string."""
    return "".join(text) if isinstance(text, list) else str(text)


def text_of(out: Output) -> str:
    """A stream's text."""
    return joined(out.get("text", ""))


def plain_of(out: Output) -> str | None:
    """The ``text/plain`` of a display or a result (None when it has none)."""
    data = out.get("data")
    plain = data.get("text/plain") if isinstance(data, dict) else None
    return joined(plain) if plain is not None else None
