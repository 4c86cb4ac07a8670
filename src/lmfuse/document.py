"""A small document model (headings, paragraphs, tables, images) rendered to Markdown and HTML.

The run report and the sweep table both use it. HTML tables scroll inside their own box when
wider than the page, numbers are right-aligned, and images are either embedded (a report that
is one self-contained file) or linked by file name (next to the HTML).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
         ".table-wrap{max-width:100%;overflow-x:auto;margin:1em 0}"
         "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px}"
         "th{background:#f3f3f3;vertical-align:bottom}"
         "td.n{text-align:right;font-variant-numeric:tabular-nums}"
         "img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{color:#666;font-size:0.9em}"
         "code{background:#f3f3f3;padding:1px 3px}p.verdict{font-size:1.05em}")


def breakable(text: str) -> str:
    """Escape a header and let it wrap after `_`, `.` and `/` (long manifest keys)."""
    return re.sub(r"([_./])", r"\1<wbr>", html.escape(text))


def inline(text: str) -> str:
    """Escape, then render `code`, **bold** and [links](target)."""
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', s)


class Document:
    """Items in order; `markdown()` and `html()` render the same content."""

    def __init__(self):
        self.items: list[tuple] = []

    def h(self, text: str, level: int = 2) -> None:
        self.items.append(("h", level, text))

    def p(self, text: str, anchor: str | None = None) -> None:
        """A paragraph; `anchor` gives it that HTML id and class (e.g. the report's verdict)."""
        self.items.append(("p", text, anchor))

    def table(self, head: Sequence[str], rows: Sequence[Sequence[Any]], text: Sequence[int] = (0,)) -> None:
        """A table; columns whose index is in `text` are left-aligned, the others (figures) right-aligned."""
        n = len(head)
        self.items.append(("table", list(head), [list(r) for r in rows], {i % n for i in text}))

    def img(self, path: Path, alt: str) -> None:
        self.items.append(("img", Path(path), alt))

    def markdown(self) -> str:
        out = []
        for it in self.items:
            if it[0] == "h":
                out.append("#" * it[1] + " " + it[2])
            elif it[0] == "p":
                out.append(it[1])
            elif it[0] == "table":
                out.append("| " + " | ".join(it[1]) + " |")
                out.append("|" + "|".join("---" if i in it[3] else "---:" for i in range(len(it[1]))) + "|")
                out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in it[2]]
            else:
                out.append(f"![{it[2]}]({it[1].name})")
            out.append("")
        return "\n".join(out)

    def html(self, title: str, embed_images: bool = True) -> str:
        """The document as one HTML page; images embedded as data URIs, or linked by file name."""
        body = []
        for it in self.items:
            if it[0] == "h":
                body.append(f"<h{it[1]}>{html.escape(it[2])}</h{it[1]}>")
            elif it[0] == "p":
                attrs = f' class="{it[2]}" id="{it[2]}"' if it[2] else ""
                body.append(f"<p{attrs}>{inline(it[1])}</p>")
            elif it[0] == "table":
                head = "".join(f"<th>{breakable(h)}</th>" for h in it[1])
                rows = "".join("<tr>" + "".join(f'<td class="{"t" if i in it[3] else "n"}">{inline(str(c))}</td>'
                                                for i, c in enumerate(r)) + "</tr>" for r in it[2])
                # A table wider than the page scrolls inside its own box, never the page.
                body.append(f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
                            f"<tbody>{rows}</tbody></table></div>")
            else:
                src = (f"data:image/png;base64,{base64.b64encode(it[1].read_bytes()).decode()}" if embed_images
                       else html.escape(it[1].name))
                body.append(f'<figure><img alt="{html.escape(it[2])}" src="{src}">'
                            f"<figcaption>{html.escape(it[2])}</figcaption></figure>")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
