"""Widgets recorded as what they showed last, not as live views.

A widget display is a reference (``application/vnd.jupyter.widget-view+json``
with a model id) to a model that lives in the kernel.  Replayed in another
kernel the model doesn't exist ("Error displaying widget: model not found"),
and the view's ``text/plain`` is the first frame (a tqdm bar at 0%).  So at
the end of a recorded cell, each widget view is replaced by a static bundle
read from the widget's final state:

* ``text/plain``: for boxes and Output widgets, the text their children
  show (a tqdm bar: ``100%|██████████| 5/5 [...]``); for other widgets
  their repr, as a widget display's ``text/plain`` always is;
* ``text/html``: a static rendering of the common kinds (HTML, Label, Text,
  progress bars, sliders, checkboxes, buttons, boxes, Output widgets,
  images); widgets of other kinds are text only.  Every value is escaped;
  HTML widgets keep only bare formatting tags (``<b>``, ``<i>``, ``<code>``…,
  no attributes).  No script, no live input.

A widget closed during the cell (tqdm with ``leave=False``) left nothing on
screen: its output is dropped.  ipywidgets is only looked up in
``sys.modules``: a widget exists only if the notebook imported it.  No IPython.
"""

from __future__ import annotations

import html
import re
import sys
from html.parser import HTMLParser
from typing import Any, Mapping

from ..records import outputs

VIEW = "application/vnd.jupyter.widget-view+json"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SAFE_COLOR = re.compile(r"^[#A-Za-z0-9(),.% ]{1,40}$")
_STYLE_COLORS = {"success": "#5cb85c", "info": "#5bc0de", "warning": "#f0ad4e", "danger": "#d9534f"}
_BOXES = {"BoxModel", "HBoxModel", "VBoxModel", "GridBoxModel", "AccordionModel", "TabModel", "StackModel"}
_PROGRESS = {"IntProgressModel", "FloatProgressModel"}
_SLIDERS = {"IntSliderModel", "FloatSliderModel", "FloatLogSliderModel"}
_TEXTS = {"TextModel", "ComboboxModel", "PasswordModel"}
_BUTTONS = {"ButtonModel", "ToggleButtonModel"}
_MAX_DEPTH = 32


def registry() -> Mapping[str, Any] | None:
    """ipywidgets' live widgets by model id, or None if it isn't imported."""
    mod = sys.modules.get("ipywidgets.widgets.widget")
    if mod is None:
        return None
    instances = getattr(mod, "_instances", None)  # ipywidgets 8
    if not isinstance(instances, Mapping):
        instances = vars(getattr(mod, "Widget", object)).get("widgets")  # ipywidgets 7: a class dict
    return instances if isinstance(instances, Mapping) else None


def _model_id(view: Any) -> str | None:
    return view.get("model_id") if isinstance(view, dict) else None


def snapshot_outputs(recorded: list[outputs.Output]) -> list[outputs.Output]:
    """The *recorded* outputs with every widget view replaced by a static snapshot."""
    if not any(isinstance(o.get("data"), dict) and VIEW in o["data"] for o in recorded):
        return recorded
    live = registry()
    kept = []
    for out in recorded:
        data = out.get("data")
        if not isinstance(data, dict) or VIEW not in data:
            kept.append(out)
            continue
        widget = live.get(_model_id(data[VIEW])) if live is not None else None
        if widget is None:
            if live is not None:
                continue  # closed during the cell: nothing of it was left on screen
            static = without_views(data)  # not an ipywidgets model we can read
            if not static:
                continue
            kept.append({**out, "data": static})
            continue
        try:
            bundle = snapshot(widget)
        except Exception:  # noqa: BLE001 - a widget we can't read keeps its recorded text
            bundle = without_views(data) or {"text/plain": ""}
        meta = dict(out.get("metadata") or {})
        meta["rssd_magic"] = {**(meta.get("rssd_magic") or {}), "widget": str(getattr(widget, "_model_name", "?"))}
        kept.append({**out, "data": bundle, "metadata": meta})
    return kept


def without_views(data: dict) -> dict:
    """A bundle without widget views (what may be replayed of it)."""
    return {k: v for k, v in data.items() if k != VIEW}


def snapshot(widget: Any) -> dict:
    """The static MIME bundle of *widget*'s current state."""
    text = None
    if _model(widget) not in _BOXES and _model(widget) != "OutputModel":
        try:
            text = repr(widget)
        except Exception:  # noqa: BLE001 - a repr that fails: the state's text
            text = None
    if text is None:
        # Boxes show their children: tqdm's bar is HTML + progress + HTML, and
        # its container's repr would recompute the rate at snapshot time (or
        # fail once the bar is freed); the children hold what was shown.
        text = _text(widget, 0)
    bundle = {"text/plain": text}
    body = _html(widget, 0)
    if body:
        bundle["text/html"] = f'<div class="rssd-magic-widget">{body}</div>'
    return bundle


def _model(widget: Any) -> str:
    return str(getattr(widget, "_model_name", ""))


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


class _TextOf(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        elif tag == "br":
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_text(markup: Any) -> str:
    """The text an HTML fragment shows (tags dropped, entities decoded)."""
    parser = _TextOf()
    parser.feed(str(markup))
    parser.close()
    return "".join(parser.parts)


_FORMATTING = {"b", "strong", "i", "em", "u", "s", "code", "small", "sub", "sup", "span", "br"}


class _Formatting(_TextOf):
    """Text kept escaped; only plain formatting tags kept, without attributes
    (so no script, handler, URL or style can come through), balanced."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        super().handle_starttag(tag, attrs)
        if tag in _FORMATTING and not self.skip:
            self.parts.append(f"<{tag}>")
            if tag != "br":
                self.open.append(tag)

    def handle_endtag(self, tag):
        super().handle_endtag(tag)
        if tag in self.open:
            while self.open:
                last = self.open.pop()
                self.parts.append(f"</{last}>")
                if last == tag:
                    break

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(_esc(data))


def safe_html(markup: Any) -> str:
    """An HTML fragment reduced to escaped text and bare formatting tags."""
    parser = _Formatting()
    parser.feed(str(markup))
    parser.close()
    return "".join(parser.parts) + "".join(f"</{tag}>" for tag in reversed(parser.open))


def _fraction(widget: Any) -> float:
    lo, hi, value = (getattr(widget, k, 0) or 0 for k in ("min", "max", "value"))
    return min(1.0, max(0.0, (value - lo) / (hi - lo))) if hi > lo else 0.0


def _text(widget: Any, depth: int) -> str:
    """A text rendering of *widget*'s state (when its repr can't be had)."""
    model = _model(widget)
    if depth > _MAX_DEPTH:
        return ""
    if model in _BOXES:
        sep = "\n" if model != "HBoxModel" else ""
        return sep.join(_text(child, depth + 1) for child in getattr(widget, "children", ()))
    if model == "OutputModel":
        return "".join(_output_text(o) for o in getattr(widget, "outputs", ()))
    if model in ("HTMLModel", "HTMLMathModel"):
        return html_text(widget.value).replace("\u2007", " ")
    if model in _PROGRESS:
        filled = round(_fraction(widget) * 10)
        return "|" + "\u2588" * filled + " " * (10 - filled) + "|"
    description = str(getattr(widget, "description", "") or "")
    value = "***" if model == "PasswordModel" else getattr(widget, "label", None) or getattr(widget, "value", "")
    return f"{description} {value}".strip() if not isinstance(value, (bytes, dict)) else description


def _output_text(out: Any) -> str:
    kind = outputs.kind(out)
    if kind is None:
        return ""
    if kind == outputs.STREAM:
        return outputs.text_of(out)
    if kind == outputs.ERROR:
        return _ANSI.sub("", "\n".join(out.get("traceback") or ())) + "\n"
    data = out.get("data") or {}
    widget = (registry() or {}).get(_model_id(data.get(VIEW)))
    if widget is not None:
        return _text(widget, 1) + "\n"
    return (outputs.plain_of(out) or "") + "\n"


def _html(widget: Any, depth: int) -> str:
    """Static HTML for *widget*, or "" for kinds not rendered (text only)."""
    if depth > _MAX_DEPTH or getattr(getattr(widget, "layout", None), "display", None) == "none":
        return ""
    model = _model(widget)
    description = getattr(widget, "description", "") or ""
    label = f"<label>{_esc(description)}</label> " if description and model not in _BUTTONS else ""
    if model in _BOXES:
        direction = "row" if model == "HBoxModel" else "column"
        children = "".join(_html(child, depth + 1) for child in getattr(widget, "children", ()))
        return f'<div style="display:flex;flex-direction:{direction};gap:4px;align-items:center">{children}</div>'
    if model == "OutputModel":
        return "".join(_output_html(o, depth) for o in getattr(widget, "outputs", ()))
    if model in ("HTMLModel", "HTMLMathModel"):
        return f"{label}<span>{safe_html(widget.value)}</span>"
    if model == "LabelModel":
        return f"{label}<span>{_esc(widget.value)}</span>"
    if model in _TEXTS:
        value = "*" * len(widget.value) if model == "PasswordModel" else widget.value
        return f'{label}<input type="text" value="{_esc(value)}" disabled>'
    if model == "TextareaModel":
        return f"{label}<textarea disabled>{_esc(widget.value)}</textarea>"
    if model in _PROGRESS:
        style = getattr(getattr(widget, "style", None), "bar_color", None)
        color = style if isinstance(style, str) and _SAFE_COLOR.match(style) else None
        color = color or _STYLE_COLORS.get(getattr(widget, "bar_style", ""))
        css = f' style="accent-color:{color}"' if color else ""
        pct = round(_fraction(widget) * 100)
        return f'{label}<progress value="{_fraction(widget):.4f}" max="1"{css}>{pct}%</progress>'
    if model in _SLIDERS:
        try:
            readout = format(widget.value, getattr(widget, "readout_format", "") or "")
        except (TypeError, ValueError):
            readout = str(widget.value)
        attrs = " ".join(f'{k}="{_esc(getattr(widget, k, ""))}"' for k in ("min", "max", "step", "value"))
        return f'{label}<input type="range" {attrs} disabled> <output>{_esc(readout)}</output>'
    if model == "CheckboxModel":
        checked = " checked" if widget.value else ""
        return f'<label><input type="checkbox" disabled{checked}> {_esc(description)}</label>'
    if model in _BUTTONS:
        pressed = ' aria-pressed="true"' if model == "ToggleButtonModel" and widget.value else ""
        return f"<button disabled{pressed}>{_esc(description)}</button>"
    if model == "ImageModel" and getattr(widget, "format", "") in ("png", "jpeg", "gif"):
        import base64

        src = base64.b64encode(bytes(widget.value)).decode("ascii")
        return f'<img src="data:image/{widget.format};base64,{src}">'
    value = getattr(widget, "label", None) or getattr(widget, "value", None)
    if isinstance(value, (str, int, float, tuple)) and model.endswith("Model") and model != "WidgetModel":
        return f"{label}<span>{_esc(value)}</span>"  # Dropdown, IntText, DatePicker, ...
    return ""


def _output_html(out: Any, depth: int) -> str:
    if not isinstance(out, dict):
        return ""
    data = out.get("data") if isinstance(out.get("data"), dict) else {}
    widget = (registry() or {}).get(_model_id(data.get(VIEW)))
    if widget is not None:
        return _html(widget, depth + 1)
    for mime in ("image/png", "image/jpeg", "image/gif"):
        if isinstance(data.get(mime), str):
            return f'<img src="data:{mime};base64,{_esc(data[mime].strip())}">'
    text = _output_text(out)
    return f'<pre style="margin:0">{_esc(text)}</pre>' if text else ""
