"""`wcond plot`: a layer's cosine heatmap (optionally beside another checkpoint's), or each metric per layer."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from wcond.analyze import inspect as inspect_checkpoint
from wcond.cli import app
from wcond.cli.common import (
    CheckpointArg,
    DeviceChoice,
    DeviceOpt,
    DownloadOpt,
    ExcludeOpt,
    LayersOpt,
    TauCosOpt,
    TauEucOpt,
    handle_errors,
    progress_bar,
    stderr,
)
from wcond.cli.project_config import ConfigOpt, read_config, with_config
from wcond.errors import UsageError
from wcond.plot import MAX_VECTORS, check_plot_output, plot_layer, plot_metrics, require_matplotlib


class Axis(str, Enum):
    rows = "rows"
    cols = "cols"


@app.command("plot")
@handle_errors
def plot_command(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Image file: .png or .svg.", show_default=False)
    ],
    layer: Annotated[
        Optional[str],
        typer.Option(
            "--layer",
            help="Heatmap of this layer's pairwise cosines (its tensor key). Without it: bar charts of every metric per layer.",
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
        Axis,
        typer.Option("--axis", help="Cosines between rows (output units) or cols (input units)."),
    ] = Axis.rows,
    max_vectors: Annotated[
        int,
        typer.Option(
            "--max-vectors",
            help="Heatmap shows at most this many rows/cols, evenly spaced (the title says so).",
            min=2,
        ),
    ] = MAX_VECTORS,
    width: Annotated[
        Optional[int],
        typer.Option("--width", help="Image width in pixels (with --height).", min=50),
    ] = None,
    height: Annotated[
        Optional[int],
        typer.Option("--height", help="Image height in pixels (with --width).", min=50),
    ] = None,
    dpi: Annotated[
        int,
        typer.Option(
            "--dpi",
            help="Pixels per inch: scales a default-size image, or text and lines within --width x --height.",
            min=10,
        ),
    ] = 100,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    tau_cos: TauCosOpt = 1e-4,
    tau_euc: TauEucOpt = 0.1,
    device: DeviceOpt = DeviceChoice.auto,
    config: ConfigOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Draw a layer's cosine heatmap, or each metric per layer.

    With --layer: the signed cos between the layer's rows (-1..1, near-parallel pairs circled), side
    by side with OTHER's when --vs is given. Without --layer: a bar chart of each inspect metric per layer.

    Needs matplotlib: pip install 'wcond\\[plot]'.

    Example: wcond plot model.pt --layer conv1.weight --vs model_cs.pt -o conv1.png
    """
    check_plot_output(output)
    require_matplotlib()  # before minutes of analysis, not after
    if (width is None) != (height is None):
        raise UsageError(
            "--width and --height go together: give both, or neither for the default size"
        )
    size = (width, height) if width and height else None
    o = with_config(
        ctx,
        read_config(config),
        layers=layers,
        exclude=exclude,
        groups=None,
        tau_cos=tau_cos,
        tau_euc=tau_euc,
        device=device.value,
    )
    if layer is not None:
        plot_layer(
            checkpoint,
            layer,
            output,
            vs=vs,
            axis=axis.value,
            max_vectors=max_vectors,
            tau_cos=o["tau_cos"],
            tau_euc=o["tau_euc"],
            size_px=size,
            dpi=dpi,
        )
    else:
        with progress_bar("inspecting") as progress:
            report = inspect_checkpoint(checkpoint, progress=progress, **o)
            other = inspect_checkpoint(vs, progress=progress, **o) if vs is not None else None
        plot_metrics(report, output, vs=other, size_px=size, dpi=dpi)
    stderr.print(f"wrote {output}", markup=False, highlight=False)
