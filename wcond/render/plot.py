"""Pictures of a checkpoint: the signed cosine matrix of a layer's rows (or columns), and each metric per layer.

matplotlib is an optional extra (``pip install 'wcond[plot]'``): it is imported on first use,
with the Agg backend (no display needed), and its absence is a :class:`UsageError` naming the
install command. The cosines and their near-parallel marks are computed by :mod:`wcond.cosines`;
this module only draws them.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wcond.defaults import MAX_DPI, MAX_PIXELS, MAX_SIDE
from wcond.errors import UsageError
from wcond.output import atomic_path, check_plot_output  # check_plot_output re-exported
from wcond.report import COUNT_FIELDS, NUMERIC_FIELDS, Report
from wcond.text import visible

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from wcond.cosines import CosMatrix
    from wcond.trend import TrendReport

__all__ = [
    "INSTALL_HINT",
    "check_canvas",
    "check_heatmaps",
    "heatmap_png",
    "heatmap_title",
    "plot_cosines",
    "plot_metrics",
    "plot_trend",
    "require_matplotlib",
]

INSTALL_HINT = "pip install 'wcond[plot]'  (or: pip install 'matplotlib>=3.7')"
_DEFAULT_DPI = 100


def require_matplotlib() -> Any:
    """matplotlib.pyplot on the Agg backend, or a UsageError saying what to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise UsageError(
            f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap_title(cm: CosMatrix) -> str:
    """The heatmap's title: the layer, what is shown, and how many pairs are circled."""
    what = f"cos between {cm.axis}"
    if cm.subsampled:
        what += f", {len(cm.indices)} of {cm.total} shown (evenly spaced)"
    k = len(cm.near_parallel)
    return f"{_label(cm.name)}\n{what}; {k} near-parallel pair{'' if k == 1 else 's'} circled"


def _draw_heatmap(fig: Figure, ax: Axes, cm: CosMatrix) -> None:
    import matplotlib as mpl
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="#bbbbbb")  # grey: dead vectors
    n = len(cm.indices)
    image = ax.imshow(cm.cos, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
    if cm.near_parallel:
        ii = [i for i, j in cm.near_parallel] + [j for i, j in cm.near_parallel]
        jj = [j for i, j in cm.near_parallel] + [i for i, j in cm.near_parallel]
        size = max(12.0, 3000.0 / n)
        # Yellow rings: visible on both saturated ends of the diverging scale.
        ax.scatter(jj, ii, s=size, facecolors="none", edgecolors="#ffd700", linewidths=1.8)
    # Tick labels are the original indices, also when only a subsample is shown.
    label = FuncFormatter(lambda pos, _: str(cm.indices[int(pos)]) if 0 <= int(pos) < n else "")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        axis.set_major_formatter(label)
    ax.tick_params(labelsize=7)
    ax.set_xlabel(f"{cm.axis[:-1]} index", fontsize=8)
    ax.set_ylabel(f"{cm.axis[:-1]} index", fontsize=8)
    ax.set_title(heatmap_title(cm), fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.85, label="cos")


def _figure(
    plt: Any, size_px: tuple[int, int] | None, default_in: tuple[float, float], dpi: int, **kw: Any
) -> tuple[Figure, Any]:
    inches = (size_px[0] / dpi, size_px[1] / dpi) if size_px else default_in
    check_canvas((round(inches[0] * dpi), round(inches[1] * dpi)), dpi)
    return plt.subplots(figsize=inches, dpi=dpi, **kw)


def check_canvas(size_px: tuple[int, int] | None, dpi: int = _DEFAULT_DPI) -> None:
    """A UsageError, before any drawing, for an image too large to draw or a dpi out of range.

    Bounds: :data:`MAX_SIDE` pixels a side, :data:`MAX_PIXELS` in all, dpi from 10 to :data:`MAX_DPI`.
    """
    if not 10 <= dpi <= MAX_DPI:
        raise UsageError(f"dpi={dpi}: expected 10 to {MAX_DPI}", params=("dpi",))
    if size_px is None:
        return
    w, h = size_px
    if min(w, h) < 1 or max(w, h) > MAX_SIDE or w * h > MAX_PIXELS:
        raise UsageError(
            f"a {w}x{h}-pixel image (dpi {dpi}) is too large to draw: at most {MAX_SIDE:,} pixels "
            f"a side and {MAX_PIXELS:,} in all; lower the size or the dpi"
        )


def _save(plt: Any, fig: Figure, out: Path, dpi: int) -> None:
    """PNG or SVG by the extension, written atomically; an SVG gets the PNG's pixel size (width/height in px)."""
    try:
        with atomic_path(out) as tmp:
            if out.suffix.lower() == ".png":
                fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
            else:
                buf = io.StringIO()
                fig.savefig(buf, format="svg", dpi=dpi)
                w, h = (round(x * dpi) for x in fig.get_size_inches())
                # matplotlib sizes an SVG in points (72 per inch); state pixels so browsers draw it as large as the PNG.
                svg = re.sub(
                    r'width="[\d.]+pt" height="[\d.]+pt"',
                    f'width="{w}px" height="{h}px"',
                    buf.getvalue(),
                    count=1,
                )
                tmp.write_text(svg, encoding="utf-8")
    finally:
        plt.close(fig)


def check_heatmaps(panels: int, size_px: tuple[int, int] | None, dpi: int = _DEFAULT_DPI) -> None:
    """:func:`check_canvas` for ``panels`` heatmaps side by side (default size: 7 x 6 inches each)."""
    default_in = (7.0 * panels, 6.0)
    check_canvas(size_px or (round(default_in[0] * dpi), round(default_in[1] * dpi)), dpi)


def plot_cosines(
    maps: Sequence[CosMatrix],
    out: str | Path,
    *,
    size_px: tuple[int, int] | None = None,
    dpi: int = _DEFAULT_DPI,
) -> Path:
    """Heatmaps of signed cosines side by side: a layer's rows (or cols), and the same layer elsewhere.

    Example:
        >>> maps = wcond.cosines.layer_cosines("conv1.weight", ["model.pt", "model_cs.pt"])
        >>> wcond.render.plot.plot_cosines(maps, "conv1.png")
    """
    out = check_plot_output(out)
    check_heatmaps(len(maps), size_px, dpi)
    plt = require_matplotlib()
    fig, axes = _figure(
        plt,
        size_px,
        (7.0 * len(maps), 6.0),
        dpi,
        ncols=len(maps),
        squeeze=False,
        layout="constrained",
    )
    for ax, cm in zip(axes[0], maps):
        _draw_heatmap(fig, ax, cm)
    _save(plt, fig, out, dpi)
    return out


def heatmap_png(
    cm: CosMatrix, size_px: tuple[int, int] = (520, 460), dpi: int = _DEFAULT_DPI
) -> bytes:
    """One heatmap as PNG bytes (for embedding in a report)."""
    plt = require_matplotlib()
    fig, ax = _figure(plt, size_px, (5.2, 4.6), dpi, layout="constrained")
    _draw_heatmap(fig, ax, cm)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    finally:
        plt.close(fig)
    return buf.getvalue()


def plot_metrics(
    report: Report,
    out: str | Path,
    *,
    vs: Report | None = None,
    size_px: tuple[int, int] | None = None,
    dpi: int = _DEFAULT_DPI,
) -> Path:
    """A bar chart per metric (every NUMERIC_FIELDS entry), one bar per layer; grouped A/B bars with ``vs``."""
    out = check_plot_output(out)
    check_canvas(size_px, dpi)
    plt = require_matplotlib()
    from matplotlib.ticker import MaxNLocator

    reports = [report] + ([vs] if vs is not None else [])
    names = [r.name for r in report.layers]
    if vs is not None:
        names += [r.name for r in vs.layers if r.name not in set(names)]
    ncols = 4
    nrows = math.ceil(len(NUMERIC_FIELDS) / ncols)
    width_in = max(14.0, 0.25 * len(names) * ncols * len(reports))
    fig, axes = _figure(
        plt,
        size_px,
        (min(width_in, 40.0), 2.4 * nrows + 1.5),
        dpi,
        nrows=nrows,
        ncols=ncols,
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    x = np.arange(len(names))
    bar = 0.8 / len(reports)
    labelled = len(names) <= 40
    for k, metric in enumerate(NUMERIC_FIELDS):
        ax = axes[k // ncols][k % ncols]
        top, any_value = 0.0, False
        for s, (rep, color) in enumerate(zip(reports, ("#4477aa", "#ee6677"))):
            by_name = {r.name: r.value(metric) for r in rep.layers}
            values = [_nan(by_name.get(n)) for n in names]
            ax.bar(
                x + (s - (len(reports) - 1) / 2) * bar,
                values,
                width=bar,
                color=color,
                label=_source_name(rep.checkpoint),
            )
            top = max([top] + [v for v in values if math.isfinite(v)])
            any_value = any_value or any(math.isfinite(v) for v in values)
        ax.set_title(metric, fontsize=9)
        ax.set_ylim(
            bottom=0, top=None if top > 0 else 1
        )  # every metric is >= 0; all-zero gets a visible axis
        if not any_value:
            ax.text(
                0.5,
                0.5,
                "does not apply to these layers",
                ha="center",
                va="center",
                fontsize=8,
                color="gray",
                transform=ax.transAxes,
            )
        if metric in COUNT_FIELDS:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(NUMERIC_FIELDS) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xticks(
            x,
            [_label(n.removesuffix(".weight")) for n in names] if labelled else [str(i) for i in x],
            rotation=90,
            fontsize=7,
        )
    if vs is not None:
        axes[0][0].legend(fontsize=7)
    title = f"wcond metrics per layer: {_source_name(report.checkpoint)}"
    if vs is not None:
        title += f" (blue) vs {_source_name(vs.checkpoint)} (red)"
    if not labelled:
        title += f"; {len(names)} layers numbered in stored order"
    fig.suptitle(title, fontsize=11)
    _save(plt, fig, out, dpi)
    return out


def _nan(v: float | None) -> float:
    return math.nan if v is None else v


def _source_name(src: str) -> str:
    return _label(Path(src).name)


def _label(name: str) -> str:
    """A name from a checkpoint as matplotlib text: control characters escaped, ``$`` not mathtext."""
    return visible(name).replace("$", r"\$")


# How `plot_trend` sums a metric over layers: additive totals add up; a worst-case value keeps
# the worst layer's; per-layer ratios and means are averaged.
_TREND_AGGREGATE = {
    "acv_mean": "mean",
    "conv_similarity_norm": "mean",
    "norm_dev_max": "max",
    "rare_rows": "min",
    "rare_cols": "min",
}
_TREND_LEGEND_MAX = 12


def _aggregate(values: list[float], how: str) -> float:
    if not values:
        return math.nan
    if how == "mean":
        return sum(values) / len(values)
    if how == "max":
        return max(values)
    if how == "min":
        return min(values)
    return math.fsum(values)


def plot_trend(
    t: TrendReport,
    out: str | Path,
    *,
    per_layer: bool = False,
    size_px: tuple[int, int] | None = None,
    dpi: int = _DEFAULT_DPI,
) -> Path:
    """Each metric against the checkpoint order (or step): over all layers, or one line per layer.

    Args:
        t: the trend of several checkpoints (:func:`wcond.trend.trend`).
        out: a .png or .svg file.
        per_layer: one line per layer instead of one line for the whole model (sums for totals
            and counts, the mean of acv_mean and conv_similarity_norm, the worst layer's
            norm_dev_max and rare_rows/cols).
    """
    out = check_plot_output(out)
    plt = require_matplotlib()
    from matplotlib.ticker import MaxNLocator

    x = t.x
    ncols = 4
    nrows = math.ceil(len(NUMERIC_FIELDS) / ncols)
    fig, axes = _figure(
        plt, size_px, (16.0, 2.6 * nrows + 1.2), dpi, nrows=nrows, ncols=ncols, squeeze=False
    )
    layers = list(t.trend)
    for k, metric in enumerate(NUMERIC_FIELDS):
        ax = axes[k // ncols][k % ncols]
        how = _TREND_AGGREGATE.get(metric, "sum")
        if per_layer:
            for name in layers:
                ys = [_nan(v) for v in t.trend[name][metric]]
                if any(math.isfinite(y) for y in ys):
                    ax.plot(
                        x, ys, marker=".", linewidth=1, label=_label(name.removesuffix(".weight"))
                    )
            ax.set_title(metric, fontsize=9)
        else:
            ys = [
                _aggregate(
                    [
                        v
                        for name in layers
                        if (v := t.trend[name][metric][i]) is not None and math.isfinite(v)
                    ],
                    how,
                )
                for i in range(len(x))
            ]
            ax.plot(x, ys, marker="o", linewidth=1.5, color="#4477aa")
            ax.set_title(f"{metric} ({how} over layers)", fontsize=9)
        if metric in COUNT_FIELDS:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(NUMERIC_FIELDS) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(t.x_label, fontsize=8)
    if per_layer and 1 < len(layers) <= _TREND_LEGEND_MAX:
        axes[0][0].legend(fontsize=6)
    names = [_source_name(r.checkpoint) for r in t.reports]
    title = f"wcond trend over {len(names)} checkpoints: {names[0]} … {names[-1]}"
    if per_layer and len(layers) > _TREND_LEGEND_MAX:
        title += f"; {len(layers)} layers (narrow with --layers for a legend)"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(plt, fig, out, dpi)
    return out
