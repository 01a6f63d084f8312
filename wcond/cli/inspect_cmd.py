"""`wcond inspect`: the per-layer redundancy report with CI gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from wcond.cli import app
from wcond.cli.common import (
    EXIT_GATE,
    CheckpointArg,
    DeviceOpt,
    ExcludeOpt,
    GroupsOpt,
    LayersOpt,
    TauCosOpt,
    TauEucOpt,
    emit,
    handle_errors,
    pick_format,
    progress_bar,
    stdout,
)
from wcond.cli.project_config import ConfigOpt, read_config, with_config
from wcond.defaults import (
    DEVICE,
    INSPECT_FORMATS,
    MAX_TOP,
    TAU_COS,
    TAU_EUC,
    TOP,
    InspectFormat,
)


@app.command("inspect")
@handle_errors
def inspect_command(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
    format: Annotated[
        Optional[InspectFormat],
        typer.Option(
            "--format", "-f", help="Output format (default: table, or from -o's extension)."
        ),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write the report to this file instead of stdout."),
    ] = None,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    groups: GroupsOpt = None,
    tau_cos: TauCosOpt = TAU_COS,
    tau_euc: TauEucOpt = TAU_EUC,
    top: Annotated[
        int,
        typer.Option(
            "--top", help="Closest pairs listed per layer and axis (JSON).", min=0, max=MAX_TOP
        ),
    ] = TOP,
    fail_if: Annotated[
        Optional[list[str]],
        typer.Option(
            "--fail-if",
            help="Gate: exit 1 when any layer satisfies METRIC OP NUMBER (repeatable).",
            metavar="EXPR",
        ),
    ] = None,
    device: DeviceOpt = DEVICE,
    config: ConfigOpt = None,
) -> None:
    """Report per layer: ACV, Convolutional Similarity, norm deviation, near-parallel pairs, RaRe.

    Exit codes: 0 fine, 1 a --fail-if gate tripped, 2 unusable input or arguments.
    Defaults come from \\[tool.wcond] in pyproject.toml (or --config FILE); flags override them.

    Example: wcond inspect model.safetensors --fail-if "near_parallel_rows>0" -f markdown
    """
    from wcond.analyze import inspect as inspect_checkpoint
    from wcond.render import render, render_table

    cfg = read_config(config)
    o = with_config(
        ctx,
        cfg,
        layers=layers,
        exclude=exclude,
        groups=groups,
        tau_cos=tau_cos,
        tau_euc=tau_euc,
        top=top,
        fail_if=fail_if,
        device=device,
    )
    # --format, then -o's extension, then the config's format, then the table.
    fmt = pick_format(INSPECT_FORMATS, format, output, cfg.values.get("format"))
    with progress_bar("inspecting") as progress:
        report = inspect_checkpoint(checkpoint, **o, config=cfg.path, progress=progress)
    if fmt == "table" and output is None:
        render_table(report, stdout)
    else:
        emit(render(report, fmt), output)
    if report.failed:
        raise typer.Exit(EXIT_GATE)
