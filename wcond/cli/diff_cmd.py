"""`wcond diff`: every metric of two checkpoints side by side, layers matched by key."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from wcond.cli import app
from wcond.cli.common import (
    CheckpointArg,
    DeviceChoice,
    DeviceOpt,
    DownloadOpt,
    ExcludeOpt,
    GroupsOpt,
    LayersOpt,
    TauCosOpt,
    TauEucOpt,
    emit,
    handle_errors,
    progress_bar,
    stdout,
)
from wcond.cli.project_config import ConfigOpt, read_config, with_config
from wcond.diff import diff
from wcond.render_diff import DIFF_FORMATS, render_diff_table


class DiffFormat(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


_SUFFIX_FORMATS = {".json": DiffFormat.json, ".md": DiffFormat.markdown, ".txt": DiffFormat.table}


@app.command("diff")
@handle_errors
def diff_command(
    ctx: typer.Context,
    a: CheckpointArg,
    b: CheckpointArg,
    format: Annotated[
        Optional[DiffFormat],
        typer.Option(
            "--format", "-f", help="Output format (default: table, or from -o's extension)."
        ),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write the diff to this file instead of stdout."),
    ] = None,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    groups: GroupsOpt = None,
    tau_cos: TauCosOpt = 1e-4,
    tau_euc: TauEucOpt = 0.1,
    device: DeviceOpt = DeviceChoice.auto,
    config: ConfigOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Compare two checkpoints, e.g. before and after init-cs or shrink.

    Every inspect metric for A and B, the change B - A and the relative change, layers found on
    one side only, and shape changes.

    Both sides are analyzed with the same settings, taken from \\[tool.wcond] (or --config) and the flags.

    Example: wcond diff model.pt model_cs.safetensors -f markdown -o diff.md
    """
    cfg = read_config(config)
    o = with_config(
        ctx,
        cfg,
        layers=layers,
        exclude=exclude,
        groups=groups,
        tau_cos=tau_cos,
        tau_euc=tau_euc,
        device=device.value,
    )
    fmt = (
        format
        or (_SUFFIX_FORMATS.get(output.suffix.lower()) if output else None)
        or DiffFormat.table
    )
    with progress_bar("inspecting A and B") as progress:
        report = diff(a, b, **o, progress=progress)
    report.settings["config"] = str(cfg.path) if cfg.path else None
    if fmt == DiffFormat.table and output is None:
        render_diff_table(report, stdout)
    else:
        emit(DIFF_FORMATS[fmt.value](report), output)
