"""`wcond inspect`: the per-layer redundancy report with CI gates."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from wcond.analyze import inspect as inspect_checkpoint
from wcond.cli import app
from wcond.cli.common import (
    EXIT_GATE,
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
    stderr,
    stdout,
)
from wcond.cli.project_config import ConfigOpt, read_config, with_config
from wcond.errors import UsageError
from wcond.frames import require_pandas, write_parquet
from wcond.render import render, render_table


class Format(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    csv = "csv"
    html = "html"
    junit = "junit"
    parquet = "parquet"


_SUFFIX_FORMATS = {
    ".json": Format.json,
    ".md": Format.markdown,
    ".csv": Format.csv,
    ".txt": Format.table,
    ".html": Format.html,
    ".htm": Format.html,
    ".xml": Format.junit,
    ".parquet": Format.parquet,
}


@app.command("inspect")
@handle_errors
def inspect_command(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
    format: Annotated[
        Optional[Format],
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
    tau_cos: TauCosOpt = 1e-4,
    tau_euc: TauEucOpt = 0.1,
    top: Annotated[
        int, typer.Option("--top", help="Closest pairs listed per layer and axis (JSON).", min=0)
    ] = 3,
    fail_if: Annotated[
        Optional[list[str]],
        typer.Option(
            "--fail-if",
            help="Gate: exit 1 when any layer satisfies METRIC OP NUMBER (repeatable).",
            metavar="EXPR",
        ),
    ] = None,
    device: DeviceOpt = DeviceChoice.auto,
    config: ConfigOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Report per layer: ACV, Convolutional Similarity, norm deviation, near-parallel pairs, RaRe.

    Exit codes: 0 fine, 1 a --fail-if gate tripped, 2 unusable input or arguments.
    Defaults come from \\[tool.wcond] in pyproject.toml (or --config FILE); flags override them.

    Example: wcond inspect model.safetensors --fail-if "near_parallel_rows>0" -f markdown
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
        top=top,
        fail_if=fail_if,
        device=device.value,
    )
    # --format, then -o's extension, then the config's format, then the table.
    fmt = (
        format
        or (_SUFFIX_FORMATS.get(output.suffix.lower()) if output else None)
        or Format(cfg.values.get("format", "table"))
    )
    if fmt == Format.parquet:
        if output is None:
            raise UsageError("--format parquet writes a binary file: give -o FILE.parquet")
        require_pandas()  # before the analysis, not after
    with progress_bar("inspecting") as progress:
        report = inspect_checkpoint(checkpoint, **o, progress=progress)
    report.settings["config"] = str(cfg.path) if cfg.path else None
    if fmt == Format.parquet:
        assert output is not None
        write_parquet(report, output)
        stderr.print(f"wrote {escape(str(output))}", soft_wrap=True)
    elif fmt == Format.table and output is None:
        render_table(report, stdout)
    else:
        emit(render(report, fmt.value), output)
    if report.failed:
        raise typer.Exit(EXIT_GATE)
