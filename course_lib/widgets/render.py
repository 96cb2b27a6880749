"""Drawing helpers the widgets share: a matplotlib figure as PNG bytes, and numbers as an HTML table.

Widgets show numbers as HTML text (so a reader, a test and a browser can all read them) next to a
picture drawn by matplotlib without pyplot (so nothing is displayed twice in a notebook).
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence

from IPython.display import Image
from matplotlib.figure import Figure

CELL_STYLE = "padding:2px 8px;text-align:right;border:1px solid #ddd"
CAPTION_STYLE = "font-family:monospace;padding:6px 0 2px"


def visible_token(token: str) -> str:
    """A token as a reader can see it: a space as '␣', a newline or tab escaped as \\n or \\t."""
    return repr(token)[1:-1].replace(" ", "␣") if token.strip() != token or not token.isprintable() else token


def figure_to_png(figure: Figure) -> bytes:
    """The figure rendered to PNG bytes, for an `ipywidgets.Image`."""
    if not isinstance(figure, Figure):
        raise TypeError(f"figure must be a matplotlib Figure, got {type(figure).__name__}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def html_table(
    rows: Sequence[Sequence[object]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    css_class: str,
    caption: str = "",
) -> str:
    """An HTML table whose body cells carry `css_class` and data-row/data-col attributes, so a browser
    test can find a number by position rather than by scraping text."""
    if len(rows) != len(row_labels) or any(len(r) != len(col_labels) for r in rows):
        raise ValueError("rows must have one label per row and one column label per cell")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in col_labels)
    body = []
    for i, (label, row) in enumerate(zip(row_labels, rows, strict=True)):
        cells = "".join(
            f'<td class="{css_class}" data-row="{i}" data-col="{j}" style="{CELL_STYLE}">{html.escape(str(value))}</td>'
            for j, value in enumerate(row)
        )
        body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    title = f'<div style="{CAPTION_STYLE}">{html.escape(caption)}</div>' if caption else ""
    return (
        f'<div class="{css_class}-table">{title}<table style="border-collapse:collapse;font-family:monospace">'
        f"<tr><th></th>{head}</tr>{''.join(body)}</table></div>"
    )


class SnapshotMixin:
    """Gives a widget with a `figure()` method a static picture of its current state."""

    def figure(self) -> Figure:
        raise NotImplementedError

    def snapshot(self) -> Image:
        """The current figure as a PNG image: what a notebook shows after the widget, so the page reads well
        where widgets do not run (GitHub, nbviewer), whatever matplotlib backend is active."""
        return Image(data=figure_to_png(self.figure()))
