"""A self-contained HTML report of a run directory (``lightning-sketch report RUN_DIR``).

The report gathers what the callbacks and the CLI left under ``RUN_DIR`` and embeds every figure
as a base64 PNG (drawn by :mod:`lightning_sketch.report.plots`: own Agg canvas, no global pyplot state), so
the single HTML file can be mailed or opened offline. Sections, each present only when its data
exist (otherwise the report says what it looked for):

- **Training metrics**: curves from Lightning's CSV logger (``metrics.csv``).
- **Sketch store**: :func:`~lightning_sketch.store.inspect_store` of every store found
  (rows, checkpoints, sketch, index kind, size on disk, health).
- **Attribution examples**: query results written by ``lightning-sketch query --format json``
  (pictures of the query and of its top proponents/opponents when inputs are images).
- **Hessian spectrum**: eigenvalue trajectories, the summary scalars per snapshot and the SLQ
  densities from the :class:`~lightning_sketch.callbacks.HessianSpectrum` snapshot directories
  (``index.json`` in the ``lightning_sketch.spectrum/v1`` format).
- **Intrinsic dimension**: the metric against the active dimension d and D* from
  ``intrinsic_dimension.json`` (:class:`~lightning_sketch.callbacks.IntrinsicDimension`).

A run directory is untrusted input: the HTML is rendered by a Jinja2 template with autoescaping
(every string from a file is escaped), text drawn in figures is plain text (no TeX, no mathtext),
files are read through :mod:`lightning_sketch.io.safeio` (confined to ``RUN_DIR``, regular files
only, capped reads, checksums verified), and a damaged file is reported in its section instead of
aborting the report.

Example:
    >>> import tempfile
    >>> out = write_report(tempfile.mkdtemp())
    >>> "No sketch store" in out.read_text()
    True
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from lightning_sketch._version import __version__
from lightning_sketch.exceptions import StoreNotFoundError
from lightning_sketch.io import safeio as sio
from lightning_sketch.report import plots
from lightning_sketch.report.sections import (
    _attribution_section,
    _intrinsic_section,
    _metrics_section,
    _spectrum_section,
    _store_section,
)

__all__ = ["build_report", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;\
max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f0f0f0}td.l,th.l{text-align:left}.absent{color:#888;font-style:italic}
.bad{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}img{max-width:100%}
nav a{margin-right:1em}code{background:#f4f4f4;padding:0 3px}
"""

_TEMPLATE = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>lightning_sketch report: {{ name }}</title><style>{{ css|safe }}</style></head><body>
{%- macro cell(tag, c, j, left) -%}
<{{ tag }}{% if j < left %} class="l"{% endif %}>\
{% if c is mapping %}<span class="{{ c.cls }}">{{ c.text }}</span>{% else %}{{ c }}{% endif %}</{{ tag }}>
{%- endmacro -%}
{%- macro render(b) -%}
{%- if b.kind == "p" -%}<p{% if b.cls %} class="{{ b.cls }}"{% endif %}>\
{{ b.text }}{% if b.code %}<code>{{ b.code }}</code>{% endif %}{{ b.suffix }}</p>
{%- elif b.kind == "h3" -%}\
<h3>{{ b.text }}{% if b.code %}<code>{{ b.code }}</code>{% endif %}{{ b.suffix }}</h3>
{%- elif b.kind == "img" -%}<img alt="figure" src="data:image/png;base64,{{ b.data }}">
{%- elif b.kind == "sign" -%}<p>Score sign: <b>positive</b> = training on the example lowers the \
query's loss (proponent, green); <b>negative</b> = it raises it (opponent, red).</p>
{%- elif b.kind == "table" -%}\
<table><tr>{% for h in b.header %}{{ cell("th", h, loop.index0, b.left) }}{% endfor %}</tr>
{%- for r in b.rows %}<tr>{% for c in r %}{{ cell("td", c, loop.index0, b.left) }}{% endfor %}</tr>\
{% endfor %}</table>
{%- endif -%}
{%- endmacro -%}
<h1>lightning_sketch report: <code>{{ root }}</code></h1>
<p>Generated {{ when }} by lightning_sketch {{ version }}.</p>\
<nav>{% for s in sections %}<a href="#{{ s.id }}">{{ s.title }}</a>{% endfor %}</nav>
{%- for s in sections %}<section id="{{ s.id }}"><h2>{{ s.title }}</h2>\
{% for b in s.blocks %}{{ render(b) }}{% endfor %}</section>{% endfor %}
</body></html>
"""


# ---------------------------------------------------------------------------- entry points
def build_report(run_dir: str | Path, queries: str | Path | None = None) -> str:
    """The report of ``run_dir`` as one HTML string (figures embedded as base64 PNG).

    Every string taken from the run's files is HTML-escaped (Jinja2 autoescaping) and drawn in
    figures as plain text; a damaged or refused file is named in its section.

    Raises:
        StoreNotFoundError: if ``run_dir`` is not a directory, or ``queries`` is not readable JSON.
        StoreCorruptError: if ``queries`` is not a query result or fails its checksum.
    """
    import jinja2

    root = Path(run_dir)
    if not root.is_dir():
        raise StoreNotFoundError(f"Run directory {str(root)!r} does not exist; pass the run's "
                                 "trainer.default_root_dir.")
    with plots.plain_text():
        sections = [
            ("metrics", "Training metrics", _metrics_section(root)),
            ("store", "Sketch store", _store_section(root)),
            ("attribution", "Attribution examples", _attribution_section(root, queries)),
            ("spectrum", "Hessian spectrum", _spectrum_section(root)),
            ("intrinsic", "Intrinsic dimension", _intrinsic_section(root)),
        ]

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(_TEMPLATE).render(
        name=root.name, root=str(root), css=_CSS, version=__version__,
        when=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        sections=[{"id": sid, "title": title, "blocks": blocks} for sid, title, blocks in sections],
    )


def write_report(
    run_dir: str | Path, output: str | Path | None = None, queries: str | Path | None = None
) -> Path:
    """Write :func:`build_report` to ``output`` (default ``run_dir/report.html``) atomically; return its path.

    Raises:
        StoreWriteError: the report cannot be written (e.g. disk full); no partial file is left.
    """
    text = build_report(run_dir, queries)
    out = Path(output) if output is not None else Path(run_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    sio.atomic_write(out, [text.encode("utf-8")], what="report")
    return out
