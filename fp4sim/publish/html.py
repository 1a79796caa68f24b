"""A small builder for self-contained HTML report pages.

``HtmlReport`` collects blocks (headings, paragraphs, tables, figures, collapsible
sections, side-by-side rows, traceback blocks) and renders one HTML document with its
CSS inline and every figure embedded as a base64 PNG ``data:`` URI: the page opens
from disk in any browser, without a server or network access. All text is escaped;
only :meth:`HtmlReport.raw` inserts markup verbatim.

Example::

    page = HtmlReport("My report")
    page.heading("Results")
    with page.row():                      # plot first, numbers beside it
        page.figure(fig, caption="error CDF")
        page.table(["metric", "value"], [["relative L2", 1.2e-3]])
    with page.collapsible("Details"):
        page.paragraph("...")
    html_text = page.render()

Figures are ``matplotlib.figure.Figure`` objects (no pyplot state needed); PNG bytes
are written without a timestamp so that a page is reproducible.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #1d232a; background: #fafbfc; }
main { max-width: 1320px; margin: 0 auto; padding: 16px 28px 60px; }
h1 { font-size: 1.7em; margin: 0.6em 0 0.2em; }
h2 { font-size: 1.35em; margin-top: 1.6em; border-bottom: 1px solid #d8dee4; padding-bottom: 4px; }
h3 { font-size: 1.12em; margin-top: 1.2em; }
h4 { font-size: 1.0em; margin: 0.8em 0 0.3em; }
p { line-height: 1.45; max-width: 1100px; }
table { border-collapse: collapse; font-size: 0.86em; margin: 6px 0 12px; background: #fff; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 4px 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #eef1f4; }
td.text, th.text { text-align: left; }
tr.good td { background: #e9f7ec; }
tr.bad td { background: #fde8e8; }
td.good { background: #e9f7ec; }
td.bad { background: #fde8e8; font-weight: 600; }
figure { margin: 4px 12px 12px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e1e4e8; background: #fff; }
figcaption { font-size: 0.85em; color: #57606a; max-width: 640px; }
.row { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 8px; }
.row > * { flex: 0 1 auto; }
details { margin: 8px 0; border: 1px solid #d8dee4; border-radius: 6px; background: #fff;
          padding: 4px 12px; }
details > summary { cursor: pointer; font-weight: 600; padding: 4px 0; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 8px; overflow-x: auto;
      font-size: 0.82em; }
pre.traceback { background: #fff5f5; border-color: #f5a3a3; color: #82071e; }
.callout { border-left: 5px solid #0969da; background: #eef6ff; padding: 8px 14px; margin: 10px 0; }
.callout ul { margin: 4px 0 0; padding-left: 22px; }
.callout li { margin: 3px 0; }
.callout.bad { border-color: #cf222e; background: #fff1f0; }
.callout.good { border-color: #1a7f37; background: #effaf1; }
.callout.warn { border-color: #bf8700; background: #fff8e5; }
nav.toc { font-size: 0.9em; columns: 3; background: #fff; border: 1px solid #d8dee4;
          padding: 6px 20px; border-radius: 6px; }
nav.toc a { text-decoration: none; }
.muted { color: #57606a; font-size: 0.88em; }
"""


def format_number(value: Any, digits: int = 3) -> str:
    """Compact display of a table cell: floats in 3 significant digits, None as an em dash."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0.0:
            return "0"
        magnitude = abs(value)
        if 1e-3 <= magnitude < 1e5:
            return f"{value:.{digits}g}"
        return f"{value:.{max(digits - 1, 0)}e}"
    return str(value)


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}-{n}", n + 1
    taken.add(slug)
    return slug


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_to_png(figure: Any, dpi: int = 90) -> bytes:
    """Render a matplotlib Figure to PNG bytes (no timestamp metadata) and close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    try:  # a pyplot-managed figure must be closed to free memory; a bare Figure needs nothing
        # lazy: optional [report] extra; only a pyplot figure needs closing
        import matplotlib.pyplot as plt

        if plt.fignum_exists(getattr(figure, "number", -1)):
            plt.close(figure)
    except Exception:  # noqa: BLE001 - closing is best effort
        pass
    return buffer.getvalue()


class HtmlReport:
    """Accumulates blocks and renders a self-contained HTML page (see the module doc)."""

    def __init__(self, title: str, *, subtitle: str | None = None, toc: bool = True) -> None:
        self.title = title
        self.subtitle = subtitle
        self.toc = toc
        self._parts: list[str] = []
        self._toc: list[tuple[str, str]] = []
        self._slugs: set[str] = set()

    # -- text -----------------------------------------------------------------------------
    def heading(self, text: str, level: int = 2, *, anchor: str | None = None) -> str:
        """Add an ``<h{level}>`` (level 2 entries go to the table of contents); return its id."""
        if not 1 <= level <= 6:
            raise ValueError(f"heading level must be 1..6, got {level}")
        slug = _slug(anchor or text, self._slugs)
        if level == 2:
            self._toc.append((slug, text))
        self._parts.append(f'<h{level} id="{slug}">{html.escape(text)}</h{level}>')
        return slug

    def paragraph(self, text: str, *, css_class: str | None = None) -> None:
        cls = f' class="{html.escape(css_class)}"' if css_class else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def bullets(self, items: Sequence[str]) -> None:
        body = "".join(f"<li>{html.escape(item)}</li>" for item in items)
        self._parts.append(f"<ul>{body}</ul>")

    def callout(self, text: str, *, kind: str = "info", points: Sequence[str] = ()) -> None:
        """A highlighted paragraph (with optional bullet ``points``); ``kind`` is ``info``,
        ``good`` or ``bad``."""
        if kind not in ("info", "good", "warn", "bad"):
            raise ValueError(f"callout kind must be info, good, warn or bad, got {kind!r}")
        items = "".join(f"<li>{html.escape(p)}</li>" for p in points)
        body = html.escape(text) + (f"<ul>{items}</ul>" if items else "")
        self._parts.append(f'<div class="callout {kind}">{body}</div>')

    def code_block(self, text: str) -> None:
        self._parts.append(f"<pre>{html.escape(text)}</pre>")

    def traceback_block(self, title: str, traceback_text: str) -> None:
        """A red, preformatted block for an exception's traceback, under a heading line."""
        body = html.escape(traceback_text)
        self._parts.append(f'<h4>{html.escape(title)}</h4><pre class="traceback">{body}</pre>')

    def raw(self, markup: str) -> None:
        """Insert trusted markup verbatim."""
        self._parts.append(markup)

    # -- tables and figures ---------------------------------------------------------------
    def table(
        self,
        headers: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        caption: str | None = None,
        row_classes: Sequence[str | None] | None = None,
        cell_classes: Sequence[Sequence[str | None]] | None = None,
        text_columns: int = 1,
    ) -> None:
        """A table; numbers are formatted by :func:`format_number`. The first
        ``text_columns`` columns are left-aligned. ``row_classes`` / ``cell_classes``
        may mark rows or cells ``good`` / ``bad``."""
        out = ["<table>"]
        if caption:
            out.append(f"<caption>{html.escape(caption)}</caption>")
        head = "".join(
            f'<th class="text">{html.escape(h)}</th>'
            if i < text_columns
            else f"<th>{html.escape(h)}</th>"
            for i, h in enumerate(headers)
        )
        out.append(f"<thead><tr>{head}</tr></thead><tbody>")
        for r, row in enumerate(rows):
            if len(row) != len(headers):
                raise ValueError(f"table row {r} has {len(row)} cells, headers have {len(headers)}")
            rc = row_classes[r] if row_classes and row_classes[r] else None
            cells = []
            for c, value in enumerate(row):
                classes = []
                if c < text_columns:
                    classes.append("text")
                if cell_classes and cell_classes[r][c]:
                    classes.append(str(cell_classes[r][c]))
                cls = f' class="{" ".join(classes)}"' if classes else ""
                cells.append(f"<td{cls}>{html.escape(format_number(value))}</td>")
            tr_cls = f' class="{rc}"' if rc else ""
            out.append(f"<tr{tr_cls}>{''.join(cells)}</tr>")
        out.append("</tbody></table>")
        self._parts.append("".join(out))

    def image_png(self, png: bytes, *, alt: str, caption: str | None = None) -> None:
        """Embed PNG bytes as a base64 data URI."""
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError("image_png expects PNG bytes")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(
            f'<figure><img alt="{html.escape(alt)}" src="{png_data_uri(png)}">{cap}</figure>'
        )

    def figure(
        self, figure: Any, *, alt: str | None = None, caption: str | None = None, dpi: int = 90
    ) -> None:
        """Embed a matplotlib Figure as a PNG."""
        self.image_png(
            figure_to_png(figure, dpi=dpi), alt=alt or caption or "figure", caption=caption
        )

    # -- structure ------------------------------------------------------------------------
    @contextmanager
    def row(self) -> Iterator[None]:
        """Blocks added inside are laid out side by side (wrapping on narrow screens)."""
        self._parts.append('<div class="row">')
        try:
            yield
        finally:
            self._parts.append("</div>")

    @contextmanager
    def block(self) -> Iterator[None]:
        """Group blocks into one cell of a :meth:`row`."""
        self._parts.append("<div>")
        try:
            yield
        finally:
            self._parts.append("</div>")

    @contextmanager
    def collapsible(self, summary: str, *, open: bool = False) -> Iterator[None]:
        """A ``<details>`` section, closed unless ``open``."""
        flag = " open" if open else ""
        self._parts.append(f"<details{flag}><summary>{html.escape(summary)}</summary>")
        try:
            yield
        finally:
            self._parts.append("</details>")

    # -- output ---------------------------------------------------------------------------
    def render(self) -> str:
        head = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body><main>"
        )
        top = [f"<h1>{html.escape(self.title)}</h1>"]
        if self.subtitle:
            top.append(f'<p class="muted">{html.escape(self.subtitle)}</p>')
        if self.toc and self._toc:
            links = "".join(
                f'<li><a href="#{slug}">{html.escape(text)}</a></li>' for slug, text in self._toc
            )
            top.append(f'<nav class="toc"><ul>{links}</ul></nav>')
        return head + "".join(top) + "\n".join(self._parts) + "</main></body></html>\n"
