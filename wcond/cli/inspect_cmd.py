"""`wcond inspect`: the per-layer redundancy report with CI gates."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from wcond.analyze import inspect as inspect_checkpoint
from wcond.cli import app
from wcond.cli.common import (
    EXIT_GATE,
    CheckpointArg,
    DeviceChoice,
    DeviceOpt,
    ExcludeOpt,
    LayersOpt,
    TauCosOpt,
    TauEucOpt,
    emit,
    handle_errors,
    progress_bar,
    stdout,
)
from wcond.layers import parse_groups
from wcond.render import render, render_table


class Format(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    csv = "csv"


_SUFFIX_FORMATS = {".json": Format.json, ".md": Format.markdown, ".csv": Format.csv, ".txt": Format.table}


@app.command("inspect")
@handle_errors
def inspect_command(
    checkpoint: CheckpointArg,
    format: Annotated[Optional[Format], typer.Option("--format", "-f", help="Output format (default: table, or from -o's extension).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the report to this file instead of stdout.")] = None,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    groups: Annotated[Optional[list[str]], typer.Option("--groups", help="Conv groups of a layer, KEY=G (KEY may be a glob; repeatable).", metavar="KEY=G")] = None,
    tau_cos: TauCosOpt = 1e-4,
    tau_euc: TauEucOpt = 0.1,
    top: Annotated[int, typer.Option("--top", help="Closest pairs listed per layer and axis (JSON).", min=0)] = 3,
    fail_if: Annotated[Optional[list[str]], typer.Option("--fail-if", help="Gate: exit 1 when any layer satisfies METRIC OP NUMBER (repeatable).", metavar="EXPR")] = None,
    device: DeviceOpt = DeviceChoice.cpu,
) -> None:
    """Report per layer: ACV, Convolutional Similarity, norm deviation, near-parallel pairs, RaRe.

    Exit codes: 0 fine, 1 a --fail-if gate tripped, 2 unusable input or arguments.

    Example: wcond inspect model.safetensors --fail-if "near_parallel_rows>0" -f markdown
    """
    fmt = format or (_SUFFIX_FORMATS.get(output.suffix.lower(), Format.table) if output else Format.table)
    with progress_bar("inspecting") as progress:
        report = inspect_checkpoint(
            checkpoint,
            layers=layers or (),
            exclude=exclude or (),
            groups=parse_groups(groups or ()),
            tau_cos=tau_cos,
            tau_euc=tau_euc,
            top=top,
            device=device.value,
            fail_if=fail_if or (),
            progress=progress,
        )
    if fmt == Format.table and output is None:
        render_table(report, stdout)
    else:
        emit(render(report, fmt.value), output)
    if report.failed:
        raise typer.Exit(EXIT_GATE)
