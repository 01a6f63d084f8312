"""A Report as one self-contained HTML page: summary, gate verdicts, a sortable layer table, heatmaps.

Everything is inline (CSS, a few lines of JS, images as data: URIs), with no address outside the
file, so the page opens offline in any browser and can be kept as a CI artifact. The heatmaps
of the worst layers (:func:`heatmap_layers`) need matplotlib and their cosines, which the caller
computes from the weights (:func:`wcond.cosines.heatmap_cosines`); without them the page says so.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Callable

from wcond._version import __version__
from wcond.errors import WcondError
from wcond.render.text import fmt_number, fmt_shape, ratio
from wcond.report import (
    DERIVED_LABELS,
    METRIC_GUIDE,
    TREND_METRICS,
    LayerReport,
    Report,
    legend,
    metric_label,
    resolve_metrics,
)
from wcond.text import html_text

if TYPE_CHECKING:
    from wcond.cosines import CosMatrix
    from wcond.trend import TrendReport

__all__ = ["HEATMAPS", "heatmap_layers", "to_html", "to_run_html"]

HEATMAPS = 4  # worst layers drawn

_Column = tuple[str, str, Callable[[LayerReport], "float | int | str | None"]]


def _metric(name: str) -> _Column:
    """A metric's column: its name as header, its meaning as tooltip."""
    return (name, METRIC_GUIDE[name].meaning, lambda r: getattr(r, name))


def _derived(label: str, get: Callable[[LayerReport], float | None]) -> _Column:
    return (label, DERIVED_LABELS[label], get)


# Layer table: header (a metric's name, or a declared label), tooltip, value (number, str or None).
_COLUMNS: list[_Column] = [
    ("layer", "tensor key", lambda r: r.name),
    ("kind", "matrix or conv1d/2d/3d", lambda r: r.kind),
    ("shape", "stored shape", lambda r: fmt_shape(r.shape)),
    _metric("params"),
    _metric("acv_mean"),
    _derived("acv/fl", lambda r: ratio(r.acv_sum, r.acv_floor)),
    _metric("conv_similarity_norm"),
    _derived("cs/fl", lambda r: ratio(r.conv_similarity, r.conv_similarity_floor)),
    _metric("norm_dev_max"),
    _metric("norm_loss"),
    _metric("rare_rows"),
    _metric("rare_cols"),
    _metric("near_parallel_rows"),
    _metric("near_parallel_cols"),
    _metric("dead_rows"),
    ("notes", "", lambda r: "; ".join(r.notes)),
]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
.sub{color:#586069}.verdict{display:inline-block;padding:6px 12px;border-radius:6px;font-weight:600;margin:10px 0}
.pass{background:#dcffe4;color:#116329}.fail{background:#ffebe9;color:#a40e26}.none{background:#eef1f4;color:#444d56}
table{border-collapse:collapse;margin:6px 0}
th,td{padding:3px 8px;border-bottom:1px solid #e6e9ed;text-align:right;white-space:nowrap}
th{background:#f3f5f7;position:sticky;top:0}td.t,th.t{text-align:left}td.notes{white-space:normal;color:#586069;text-align:left;min-width:14em}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#e4e8ec}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tr.tripped td:first-child{color:#a40e26;font-weight:600}td.worst{background:#fff1c2}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px;margin:6px 0}dt{color:#586069}dd{margin:0}
.maps{display:flex;flex-wrap:wrap;gap:18px}figure{margin:0;border:1px solid #e6e9ed;border-radius:6px;padding:8px}
figcaption{font-size:13px;max-width:520px}.scroll{overflow-x:auto}.note{color:#586069;font-style:italic}
"""

# Click a header to sort by it (again: reverse). Numbers sort numerically, empty cells last.
_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    function sort() {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows), num = th.dataset.type === "num";
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, c;
        if (num) {
          if (x === "" || y === "") { c = (x === "") - (y === ""); return c || a.dataset.i - b.dataset.i; }
          c = parseFloat(x) - parseFloat(y);
        } else { c = x.localeCompare(y); }
        return (asc ? c : -c) || a.dataset.i - b.dataset.i;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    }
    th.tabIndex = 0;
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter") { sort(); } });
  });
});
"""


def _e(s: object) -> str:
    """Any text on the page: escaped for HTML, control characters shown as escapes."""
    return html_text(s)


def to_html(
    report: Report,
    cosines: Mapping[str, CosMatrix | str] | None = None,
    *,
    heatmaps: int = HEATMAPS,
) -> str:
    """The report as a self-contained HTML page.

    Args:
        cosines: the cosine matrix of each layer of :func:`heatmap_layers`, or why it cannot be
            drawn (:func:`wcond.cosines.heatmap_cosines`); None: the page says what it needs.
        heatmaps: how many of the worst layers get a cosine heatmap (0: none).
    """

    verdict = _verdict(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>wcond inspect: {_e(report.checkpoint)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1>wcond inspect: <span class="mono">{_e(report.checkpoint)}</span></h1>',
        f'<div class="sub">format {_e(report.format)}'
        + (f", state dict under <code>{_e(report.wrapper)}</code>" if report.wrapper else "")
        + f"; wcond {_e(__version__)}</div>",
        verdict,
        _gates(report),
        _summary(report),
        _layer_table(report),
        _heatmaps(report, cosines, heatmaps),
        _settings(report),
        f"<script>{_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _verdict(report: Report) -> str:
    if not report.gates:
        return '<div class="verdict none" id="verdict">No gates set (use --fail-if, or fail-if in [tool.wcond])</div>'
    failed = [g for g in report.gates if not g.passed]
    if failed:
        return f'<div class="verdict fail" id="verdict">FAIL: {len(failed)} of {len(report.gates)} gates tripped</div>'
    return (
        f'<div class="verdict pass" id="verdict">PASS: all {len(report.gates)} gates passed</div>'
    )


def _gates(report: Report) -> str:
    if not report.gates:
        return ""
    rows = []
    for g in report.gates:
        status = '<td class="t pass">PASS</td>' if g.passed else '<td class="t fail">FAIL</td>'
        where = (
            ", ".join(
                f"<code>{_e(v.layer)}</code> ({_e(fmt_number(v.value))})" for v in g.violations
            )
            or "-"
        )
        rows.append(
            f'<tr>{status}<td class="t"><code>{_e(g.expr)}</code></td><td class="t">{where}</td></tr>'
        )
    head = '<tr><th class="t">verdict</th><th class="t">gate</th><th class="t">layers that trip it (value)</th></tr>'
    return f'<h2>Gates</h2><table id="gates"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _summary(report: Report) -> str:
    s = report.summary
    items = [
        ("layers analyzed", f"{s.layers} ({s.skipped_tensors} other tensors skipped)"),
        ("parameters analyzed", f"{s.params:,}"),
        ("near-parallel pairs", f"{s.near_parallel_rows} rows, {s.near_parallel_cols} cols"),
        ("dead rows", str(s.dead_rows)),
        ("layers with NaN/Inf", str(s.nonfinite_layers)),
        ("acv_sum total", fmt_number(s.acv_sum)),
        ("conv_similarity total", fmt_number(s.conv_similarity)),
        ("norm_loss total", fmt_number(s.norm_loss)),
    ]
    labels = {
        "acv_mean": "highest acv_mean",
        "conv_similarity_norm": "highest conv_similarity_norm",
        "near_parallel": "most near-parallel pairs",
        "rare_rows": "lowest rare_rows",
    }
    items += [(label, ", ".join(s.worst[k][:3])) for k, label in labels.items() if s.worst.get(k)]
    body = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    return f'<h2>Summary</h2><dl id="summary">{body}</dl>'


def _layer_table(report: Report) -> str:
    tripped = {v.layer for g in report.gates for v in g.violations}
    heads = []
    for i, (h, tip, _) in enumerate(_COLUMNS):
        kind = 'class="t" data-type="str"' if i < 3 or h == "notes" else 'data-type="num"'
        heads.append(f'<th {kind} title="{_e(tip)}">{_e(h)}</th>')
    rows = []
    for n, r in enumerate(report.layers):
        cells = []
        for h, _, get in _COLUMNS:
            v = get(r)
            if isinstance(v, str):
                cls = "notes" if h == "notes" else "t"
                cells.append(f'<td class="{cls}" data-v="{_e(v)}">{_e(v)}</td>')
            else:
                raw = "" if v is None or v != v else repr(v)
                cells.append(f'<td data-v="{raw}">{_e(fmt_number(v))}</td>')
        cls = ' class="tripped"' if r.name in tripped or r.nonfinite else ""
        rows.append(f'<tr data-i="{n}"{cls}>{"".join(cells)}</tr>')
    metrics = [h for h, tip, _ in _COLUMNS if h in DERIVED_LABELS or h in METRIC_GUIDE]
    return (
        '<h2>Layers</h2><p class="sub">Click a column header to sort. Layers in red trip a gate or hold NaN/Inf.</p>'
        f'<div class="scroll"><table class="sortable" id="layers"><thead><tr>{"".join(heads)}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>{_legend(metrics)}"
    )


def _legend(headers: Sequence[str]) -> str:
    """Each column: its name, the terminal table's label, and what it measures."""
    items = []
    for label, name, meaning in legend(headers):
        if label in DERIVED_LABELS:
            items.append(f"<dt><code>{_e(label)}</code></dt><dd>{_e(name)}</dd>")
        else:
            short = metric_label(name)
            also = f" (table: <code>{_e(short)}</code>)" if short != name else ""
            items.append(f"<dt><code>{_e(name)}</code>{also}</dt><dd>{_e(meaning)}</dd>")
    return f'<dl class="legend" id="legend">{"".join(items)}</dl>'


def heatmap_layers(report: Report, n: int = HEATMAPS) -> list[tuple[LayerReport, str]]:
    """Up to n layers worth a look (those the page draws heatmaps of), each with why.

    Gate trips first, then near-parallel pairs, highest acv_mean, lowest rare_rows.
    """
    by_name = {r.name: r for r in report.layers}
    reasons: dict[str, str] = {}
    for g in report.gates:
        for v in g.violations:
            reasons.setdefault(v.layer, f"trips {g.expr} ({fmt_number(v.value)})")
    for name in report.summary.worst.get("near_parallel", []):
        r = by_name[name]
        reasons.setdefault(
            name,
            f"{r.near_parallel_rows} near-parallel row pairs, {r.near_parallel_cols} col pairs",
        )
    for name in report.summary.worst.get("acv_mean", [])[:2]:
        reasons.setdefault(name, f"high acv_mean ({fmt_number(by_name[name].acv_mean)})")
    for name in report.summary.worst.get("rare_rows", [])[:2]:
        reasons.setdefault(name, f"low rare_rows ({fmt_number(by_name[name].rare_rows)})")
    return [(by_name[k], why) for k, why in reasons.items() if not by_name[k].nonfinite][:n]


def _heatmaps(report: Report, cosines: Mapping[str, CosMatrix | str] | None, n: int) -> str:
    if n <= 0:
        return ""
    head = "<h2>Worst layers: cosine between rows</h2>"
    chosen = heatmap_layers(report, n)
    if not chosen:
        return ""
    from wcond.render import plot  # matplotlib is imported by plot.require_matplotlib

    try:
        plot.require_matplotlib()
    except WcondError:
        return (
            head
            + f'<p class="note" id="heatmaps-note">Heatmaps need matplotlib: {_e(plot.INSTALL_HINT)}</p>'
        )
    if cosines is None:
        return (
            head + '<p class="note" id="heatmaps-note">Heatmaps need the layers\' cosines '
            "(pass cosines= to to_html).</p>"
        )
    figures = []
    for layer, why in chosen:
        cm = cosines.get(layer.name, repr(layer.name))  # as a missing key of a weights dict read
        if isinstance(cm, str):
            figures.append(
                f"<figure><figcaption><code>{_e(layer.name)}</code>: not drawn ({_e(cm)})</figcaption></figure>"
            )
            continue
        png = base64.b64encode(plot.heatmap_png(cm)).decode("ascii")
        pairs = ", ".join(f"{p.i}&ndash;{p.j} (cos {p.cos:+.4f})" for p in layer.closest_rows)
        figures.append(
            f'<figure><img alt="cosine heatmap of {_e(layer.name)}" width="520" height="460" '
            f'src="data:image/png;base64,{png}">'
            f"<figcaption><code>{_e(layer.name)}</code>: {_e(why)}."
            + (f" Closest row pairs: {pairs}." if pairs else "")
            + "</figcaption></figure>"
        )
    return head + f'<div class="maps" id="heatmaps">{"".join(figures)}</div>'


def _settings(report: Report) -> str:
    body = "".join(
        f"<dt>{_e(k)}</dt><dd><code>{_e(v)}</code></dd>" for k, v in report.settings.items()
    )
    return f'<h2>Settings</h2><dl id="settings">{body}</dl>'


# --------------------------------------------------------------------------- a run's page

_RUN_CSS = """
svg.chart{display:block;overflow:visible}svg.chart polyline{fill:none;stroke:#0969da;stroke-width:1.5}
svg.chart circle{fill:#0969da}svg.chart line{stroke:#d0d7de}svg.chart text{font-size:9px;fill:#586069}
td.chart{text-align:left;padding:4px 10px}td.chart .fl{font-size:12px;color:#586069}
pre.terminal{background:#f6f8fa;border:1px solid #e6e9ed;border-radius:6px;padding:10px;overflow-x:auto;font-size:12px}
"""
_CHART_W, _CHART_H, _CHART_PAD = 170, 48, 5


def to_run_html(t: TrendReport, metrics: Sequence[str] = TREND_METRICS) -> str:
    """A run's checkpoints as one self-contained page: gate verdicts per checkpoint, each layer's
    metrics as small line charts over the steps (inline SVG, layers that moved most first), and
    the table the terminal shows. No script and no address outside the file."""
    from wcond.render.text import table_text
    from wcond.render.trend import render_trend_table

    metrics = resolve_metrics(metrics)
    title = f"wcond inspect: {len(t.reports)} checkpoints"
    gated = [r for r in t.reports if r.gates]
    failed = sum(1 for r in gated if r.failed)
    if not gated:
        verdict = "none", "No gates set (use --fail-if, or fail-if in [tool.wcond])"
    elif failed:
        verdict = "fail", f"FAIL: gates tripped in {failed} of {len(gated)} checkpoints"
    else:
        verdict = "pass", f"PASS: all {len(gated)} checkpoints pass their gates"
    terminal = table_text(render_trend_table, t, 140)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}{_RUN_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="sub">x axis: {_e(t.x_label)} {_e(t.x[0])} &rarr; {_e(t.x[-1])}; '
        f"wcond {_e(__version__)}</div>",
        f'<div class="verdict {verdict[0]}" id="verdict">{_e(verdict[1])}</div>',
        _run_checkpoints(t),
        _run_charts(t, metrics),
        '<h2>As on the terminal</h2><pre class="terminal" id="terminal">'
        f"{_e_lines(terminal)}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _e_lines(text: str) -> str:
    """Multi-line text for a <pre>: each line escaped, the line breaks kept."""
    return "\n".join(_e(line) for line in text.splitlines())


def _run_checkpoints(t: TrendReport) -> str:
    exprs = list(dict.fromkeys(g.expr for r in t.reports for g in r.gates))
    head = "".join(
        f'<th class="t">{_e(h)}</th>' for h in ("checkpoint", t.x_label, "layers", "verdict")
    ) + "".join(f'<th class="t"><code>{_e(x)}</code></th>' for x in exprs)
    rows = []
    for r, x in zip(t.reports, t.x):
        by_expr = {g.expr: g for g in r.gates}
        cells = [
            f'<td class="t"><code>{_e(r.checkpoint)}</code></td>',
            f"<td>{_e(x)}</td>",
            f"<td>{r.summary.layers}</td>",
            '<td class="t fail">FAIL</td>'
            if r.failed
            else '<td class="t pass">PASS</td>'
            if r.gates
            else '<td class="t">-</td>',
        ]
        for expr in exprs:
            g = by_expr.get(expr)
            if g is None:
                cells.append('<td class="t">-</td>')
            elif g.passed:
                cells.append('<td class="t pass">PASS</td>')
            else:
                where = ", ".join(
                    f"<code>{_e(v.layer)}</code> ({_e(fmt_number(v.value))})" for v in g.violations
                )
                cells.append(f'<td class="t notes"><b class="fail">FAIL</b> {where}</td>')
        cls = ' class="tripped"' if r.failed else ""
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (
        '<h2>Checkpoints and their gates</h2><div class="scroll"><table id="checkpoints">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _run_charts(t: TrendReport, metrics: Sequence[str]) -> str:
    order = sorted(
        t.trend, key=lambda n: -t.movement(n, metrics)
    )  # stable: stored order among equals
    head = '<th class="t">layer</th>' + "".join(f'<th class="t">{_e(m)}</th>' for m in metrics)
    rows = []
    for name in order:
        cells = [f'<td class="t"><code>{_e(name)}</code></td>']
        for m in metrics:
            values = t.trend[name].get(m, [])
            cells.append(
                f'<td class="chart">{_chart(t.x, values, t.x_label, f"{m} of {name}")}</td>'
            )
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<h2>Layers over the {_e(t.x_label)}s</h2><p class="sub">One chart per layer and metric, '
        "min to max of its values; layers that moved most first. Hover a point for its value.</p>"
        f'<div class="scroll"><table id="charts"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>{_legend(metrics)}"
    )


def _chart(xs: Sequence[int], values: Sequence[float | None], x_label: str, what: str) -> str:
    """A small inline SVG line chart; a missing or non-finite value breaks the line."""
    pts = [(x, v) for x, v in zip(xs, values) if v is not None and math.isfinite(v)]
    if not pts:
        return '<span class="sub">-</span>'
    w, h, pad = _CHART_W, _CHART_H, _CHART_PAD
    x_lo, x_hi = min(xs), max(xs)
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    flat = hi - lo <= 1e-4 * max(abs(lo), abs(hi))  # as the terminal's sparklines

    def px(x: float) -> float:
        return w / 2 if x_hi == x_lo else pad + (x - x_lo) / (x_hi - x_lo) * (w - 2 * pad)

    def py(v: float) -> float:
        return h / 2 if flat else pad + (hi - v) / (hi - lo) * (h - 2 * pad)

    lines: list[list[str]] = []
    run: list[str] = []
    for x, v in zip(xs, values):
        if v is None or not math.isfinite(v):
            lines.append(run)
            run = []
        else:
            run.append(f"{px(x):.1f},{py(v):.1f}")
    lines.append(run)
    shapes = [f'<polyline points="{" ".join(r)}"/>' for r in lines if len(r) >= 2]
    shapes += [
        f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="2"><title>{_e(x_label)} {_e(x)}: '
        f"{_e(fmt_number(v))}</title></circle>"
        for x, v in pts
    ]
    first, last = pts[0][1], pts[-1][1]
    return (
        f'<svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="{_e(what)}"><line x1="0" y1="{h - 1}" x2="{w}" y2="{h - 1}"/>'
        f"{''.join(shapes)}</svg>"
        f'<span class="fl">{_e(fmt_number(first))} &rarr; {_e(fmt_number(last))}'
        f" (min {_e(fmt_number(lo))}, max {_e(fmt_number(hi))})</span>"
    )
