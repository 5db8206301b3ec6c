"""The HTML of ``peftlab report``: what a page holds (sections of facts, tables and figures) and its Jinja2 template.

A page is self-contained: the CSS is inline, every figure is a PNG embedded as a ``data:image/png;base64,`` URI,
the only links are ``#anchors`` within the page, and nothing needs JavaScript (long tables fold into
``<details>``). The template autoescapes, so a run name, prompt or metric key such as ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

MISSING = "—"
SMALL_IMAGE = 256


@dataclass
class Cell:
    """A table cell: the text shown, the exact value on hover (``title``), a link to an anchor of the page."""

    text: str
    exact: str | None = None
    link: str | None = None


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    folded: bool = False  # long tables (per layer, predictions) fold into <details>
    note: str = ""


@dataclass
class Figure:
    """A PNG to embed (``png`` bytes), or why it is missing (``missing``)."""

    title: str
    png: bytes | None = None
    missing: str = ""
    width: int = 0  # pixels; a small image (a grid of 16×16 samples) is shown enlarged, without smoothing

    @property
    def shown_width(self) -> int | None:
        return max(2, SMALL_IMAGE // self.width) * self.width if 0 < self.width < SMALL_IMAGE else None

    @property
    def uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png or b"").decode("ascii")


@dataclass
class Section:
    """One run, comparison or analysis: ``facts`` (option → value), tables, figures, and nested sections."""

    anchor: str
    title: str
    kind: str
    facts: list[tuple[str, Cell]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def cell(value: Any, link: str | None = None) -> Cell:
    """A table cell of any JSON value: integers with thousands separators, floats to 4 decimals in [1e-3, 100), to 1
    in [100, 1e5), else to 4 significant digits, the exact value as ``exact``; a list ``[a, b]`` as ``[a, b]``."""
    if value is None:
        return Cell(MISSING, link=link)
    if isinstance(value, bool):
        return Cell(str(value).lower(), link=link)
    if isinstance(value, int):
        return Cell(f"{value:,}", str(value), link)
    if isinstance(value, float):
        if not math.isfinite(value):
            return Cell(str(value), str(value), link)
        if value == 0 or 1e-3 <= abs(value) < 100:
            return Cell(f"{value:.4f}", repr(value), link)
        return Cell(f"{value:,.1f}" if 100 <= abs(value) < 1e5 else f"{value:.4g}", repr(value), link)
    if isinstance(value, (list, tuple)):
        return Cell("[" + ", ".join(cell(v).text for v in value) + "]", str(list(value)), link)
    if isinstance(value, dict):
        return Cell(", ".join(f"{k}: {cell(v).text}" for k, v in value.items()), link=link)
    return Cell(str(value), link=link)


def anchor(*parts: Any) -> str:
    """An HTML id from ``parts`` (letters, digits, ``-``, ``_`` and ``.`` kept; the rest become ``-``)."""
    text = "-".join(str(p) for p in parts)
    return "".join(c if c.isalnum() and c.isascii() or c in "-_." else "-" for c in text) or "section"


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.5em; } .kind { color: #777; font-weight: normal; font-size: .7em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } tr:nth-child(even) td { background: #fafafa; }
td { max-width: 40em; overflow-wrap: anywhere; white-space: pre-wrap; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; }
dl.facts dt { color: #555; } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
img.small { image-rendering: pixelated; }
figcaption { color: #555; font-size: .9em; }
.missing { color: #a33; } .warning { background: #fff4e5; border-left: 4px solid #f0a020; padding: .4em .8em; }
.note { color: #555; font-size: .9em; } nav ul { columns: 2; }
.child { border-left: 3px solid #eee; padding-left: 1em; margin-left: .3em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="note">Written by peftlab {{ version }} (<code>peftlab report</code>) from {{ source }}.</p>
{% macro show_cell(c, tag="td") -%}
<{{ tag }}{% if c.exact and c.exact != c.text %} title="{{ c.exact }}"{% endif %}>
{%- if c.link %}<a href="#{{ c.link }}">{{ c.text }}</a>{% else %}{{ c.text }}{% endif %}</{{ tag }}>
{%- endmacro %}
{% macro show_table(t) -%}
<table>
<thead><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in t.rows %}<tr>{% for c in row %}{{ show_cell(c) }}{% endfor %}</tr>
{% endfor %}</tbody>
</table>
{%- endmacro %}
{% macro show_section(s, level) %}
<section id="{{ s.anchor }}"{% if level > 2 %} class="child"{% endif %}>
<h{{ level }}>{{ s.title }} <span class="kind">{{ s.kind }}</span></h{{ level }}>
{% for w in s.warnings %}<p class="warning">{{ w }}</p>
{% endfor %}
{% if s.facts %}<dl class="facts">
{% for name, value in s.facts %}<dt>{{ name }}</dt>
{{- show_cell(value, "dd") }}
{% endfor %}</dl>{% endif %}
{% for t in s.tables %}
{% if t.folded %}<details><summary><strong>{{ t.title }}</strong> ({{ t.rows|length }} rows)</summary>
{% else %}<h{{ level + 1 }}>{{ t.title }}</h{{ level + 1 }}>{% endif %}
{% if t.note %}<p class="note">{{ t.note }}</p>{% endif %}
{{ show_table(t) }}
{% if t.folded %}</details>{% endif %}
{% endfor %}
{% for f in s.figures %}
<figure>
{% if f.png %}<img src="{{ f.uri }}" alt="{{ f.title }}"
{%- if f.shown_width %} width="{{ f.shown_width }}" class="small"{% endif %}>
{% else %}<p class="missing">{{ f.title }}: missing ({{ f.missing }})</p>{% endif %}
<figcaption>{{ f.title }}</figcaption>
</figure>
{% endfor %}
{% if s.children %}<nav><ul>
{% for c in s.children %}<li><a href="#{{ c.anchor }}">{{ c.title }}</a></li>{% endfor %}
</ul></nav>
{% for c in s.children %}{{ show_section(c, level + 1) }}{% endfor %}{% endif %}
</section>
{% endmacro %}
{{ show_section(section, 2) }}
</body>
</html>
"""


def render(section: Section, title: str, source: str) -> str:
    """The page of ``section`` (and its children) as HTML text; every value is escaped."""
    import jinja2

    from peftlab._version import __version__

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE).render(section=section, title=title, source=source, version=__version__)
