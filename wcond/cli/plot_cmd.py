"""`wcond plot`: a layer's cosine heatmap (optionally beside another checkpoint's), or each metric per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from wcond.checkpoint.source import check_source, expand_paths
from wcond.cli import app
from wcond.cli.common import (
    CHECKPOINT_HELP,
    DeviceOpt,
    DownloadOpt,
    ExcludeOpt,
    LayersOpt,
    RayAddressOpt,
    RayOpt,
    TauCosOpt,
    TauEucOpt,
    engine_for,
    handle_errors,
    load_torch,
    progress_bar,
    say_written,
)
from wcond.cli.project_config import ConfigOpt, read_config, with_config
from wcond.defaults import (
    DEVICE,
    MAX_DPI,
    MAX_PIXELS,
    MAX_SIDE,
    MAX_VECTORS,
    MAX_VECTORS_LIMIT,
    TAU_COS,
    TAU_EUC,
)
from wcond.errors import UsageError
from wcond.output import check_plot_output


@app.command("plot")
@handle_errors
def plot_command(
    ctx: typer.Context,
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help=CHECKPOINT_HELP + " With --trend, several (or a quoted glob).",
            show_default=False,
            metavar="CHECKPOINT...",
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Image file: .png or .svg.", show_default=False)
    ],
    layer: Annotated[
        Optional[str],
        typer.Option(
            "--layer",
            help="Heatmap of this layer's pairwise cosines (its tensor key). "
            "Without it: bar charts of every metric per layer.",
            metavar="KEY",
        ),
    ] = None,
    vs: Annotated[
        Optional[Path],
        typer.Option(
            "--vs",
            help="A second checkpoint shown beside the first (same layer key).",
            metavar="OTHER",
        ),
    ] = None,
    axis: Annotated[
        Literal["rows", "cols"],
        typer.Option(
            "--axis",
            help="Cosines between rows (output units) or cols (input units).",
        ),
    ] = "rows",
    max_vectors: Annotated[
        int,
        typer.Option(
            "--max-vectors",
            help="Heatmap shows at most this many rows/cols, evenly spaced (the title says so).",
            min=2,
            max=MAX_VECTORS_LIMIT,
        ),
    ] = MAX_VECTORS,
    width: Annotated[
        Optional[int],
        typer.Option(
            "--width", help="Image width in pixels (with --height).", min=50, max=MAX_SIDE
        ),
    ] = None,
    height: Annotated[
        Optional[int],
        typer.Option(
            "--height", help="Image height in pixels (with --width).", min=50, max=MAX_SIDE
        ),
    ] = None,
    dpi: Annotated[
        int,
        typer.Option(
            "--dpi",
            help="Pixels per inch: scales a default-size image, or text and lines within --width x --height.",
            min=10,
            max=MAX_DPI,
        ),
    ] = 100,
    trend: Annotated[
        bool,
        typer.Option(
            "--trend",
            help="Each metric against the checkpoints' order (or their step): over the whole model, "
            "or one line per layer when --layers is given.",
        ),
    ] = False,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    tau_cos: TauCosOpt = TAU_COS,
    tau_euc: TauEucOpt = TAU_EUC,
    device: DeviceOpt = DEVICE,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    config: ConfigOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Draw a layer's cosine heatmap, or each metric per layer.

    With --layer: the signed cos between the layer's rows (-1..1, near-parallel pairs circled), side
    by side with OTHER's when --vs is given. Without --layer: a bar chart of each inspect metric per layer.

    Needs matplotlib: pip install 'wcond\\[plot]'.

    With --trend and several checkpoints (a run's step_*.pt): each metric against the step.

    Example: wcond plot model.pt --layer conv1.weight --vs model_cs.pt -o conv1.png
    """
    check_plot_output(output)
    if (width is None) != (height is None):
        raise UsageError(
            "--width and --height go together: give both, or neither for the default size"
        )
    size = (width, height) if width is not None and height is not None else None
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise UsageError(
            f"--width {size[0]} --height {size[1]}: {size[0] * size[1]:,} pixels is too large "
            f"to draw; at most {MAX_PIXELS:,} (e.g. 8000 x 5000)"
        )
    o = with_config(
        ctx,
        read_config(config),
        layers=layers,
        exclude=exclude,
        groups=None,
        tau_cos=tau_cos,
        tau_euc=tau_euc,
        device=device,
    )
    for c in [*checkpoints, *([vs] if vs is not None else [])]:
        check_source(c)
    paths = expand_paths(checkpoints)
    if trend:
        if layer is not None or vs is not None:
            raise UsageError("--trend draws metrics over checkpoints; it takes no --layer or --vs")
        if len(paths) < 2:
            raise UsageError("--trend needs at least two checkpoints (or a glob matching several)")
    elif len(paths) > 1:
        raise UsageError(
            f"{len(paths)} checkpoints given: plot draws one (with --vs OTHER beside it), "
            "or several with --trend"
        )
    load_torch()
    from wcond.analyze import inspect as inspect_checkpoint
    from wcond.render.plot import plot_cosines, plot_metrics, require_matplotlib

    require_matplotlib()  # after the arguments, before minutes of analysis
    if trend:
        from wcond.render.plot import plot_trend
        from wcond.trend import trend as trend_of

        with (
            engine_for(ray, ray_address) as engine,
            progress_bar("inspecting on Ray" if engine else "inspecting") as progress,
        ):
            result = trend_of(paths, progress=progress, engine=engine, **o)
        plot_trend(result, output, per_layer=bool(o["layers"]), size_px=size, dpi=dpi)
    elif layer is not None:
        from wcond.cosines import layer_cosines
        from wcond.render.plot import check_heatmaps

        check_heatmaps(1 if vs is None else 2, size, dpi)  # before reading any weights
        maps = layer_cosines(
            layer,
            [paths[0], *([vs] if vs is not None else [])],
            axis=axis,
            max_vectors=max_vectors,
            tau_cos=o["tau_cos"],
            tau_euc=o["tau_euc"],
        )
        plot_cosines(maps, output, size_px=size, dpi=dpi)
    else:
        with progress_bar("inspecting") as progress:
            report = inspect_checkpoint(paths[0], progress=progress, **o)
            other = inspect_checkpoint(vs, progress=progress, **o) if vs is not None else None
        plot_metrics(report, output, vs=other, size_px=size, dpi=dpi)
    say_written(output)
