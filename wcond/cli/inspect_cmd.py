"""`wcond inspect`: the per-layer redundancy report with CI gates."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from wcond.analyze import inspect as inspect_checkpoint
from wcond.cli import app
from wcond.cli.common import (
    EXIT_GATE,
    DeviceChoice,
    DeviceOpt,
    ExcludeOpt,
    GroupsOpt,
    LayersOpt,
    RayAddressOpt,
    RayOpt,
    TauCosOpt,
    TauEucOpt,
    emit,
    engine_for,
    handle_errors,
    progress_bar,
    stdout,
)
from wcond.cli.project_config import ConfigOpt, read_config, with_config
from wcond.errors import UsageError
from wcond.render import render, render_table


class Format(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    csv = "csv"
    html = "html"
    junit = "junit"


_SUFFIX_FORMATS = {
    ".json": Format.json,
    ".md": Format.markdown,
    ".csv": Format.csv,
    ".txt": Format.table,
    ".html": Format.html,
    ".htm": Format.html,
    ".xml": Format.junit,
}


@app.command("inspect")
@handle_errors
def inspect_command(
    ctx: typer.Context,
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoint file (.pt .pth .bin .ckpt .safetensors), shard index, or directory. "
            "Several (or a quoted glob such as 'run/step_*.pt'): one report each, ordered "
            "naturally, and each metric's trend per layer.",
            show_default=False,
            metavar="CHECKPOINT...",
        ),
    ],
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
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Report per layer: ACV, Convolutional Similarity, norm deviation, near-parallel pairs, RaRe.

    Exit codes: 0 fine, 1 a --fail-if gate tripped, 2 unusable input or arguments.
    Defaults come from \\[tool.wcond] in pyproject.toml (or --config FILE); flags override them.

    With several checkpoints the gates apply to each, and the exit code is the worst.

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
    from wcond.trend import expand_paths

    paths = expand_paths(checkpoints)
    label = "inspecting on Ray" if ray or ray_address else "inspecting"
    if len(paths) > 1:
        _inspect_many(paths, fmt, output, o, cfg.path, ray, ray_address, label)
        return
    with engine_for(ray, ray_address) as engine, progress_bar(label) as progress:
        report = inspect_checkpoint(paths[0], **o, progress=progress, engine=engine)
    report.settings["config"] = str(cfg.path) if cfg.path else None
    if fmt == Format.table and output is None:
        render_table(report, stdout)
    else:
        emit(render(report, fmt.value), output)
    if report.failed:
        raise typer.Exit(EXIT_GATE)


def _inspect_many(
    paths: list[Path],
    fmt: Format,
    output: Optional[Path],
    options: dict[str, Any],
    config: Optional[Path],
    ray: bool,
    ray_address: Optional[str],
    label: str,
) -> None:
    """Several checkpoints: their trend as a table, JSON, CSV or Markdown; exit 1 if any gate tripped."""
    from wcond.render_trend import TREND_FORMATS, render_trend, render_trend_table
    from wcond.trend import trend

    if fmt.value not in TREND_FORMATS:
        raise UsageError(
            f"--format {fmt.value} shows one checkpoint; with {len(paths)} checkpoints use "
            + ", ".join(TREND_FORMATS)
        )
    with engine_for(ray, ray_address) as engine, progress_bar(label) as progress:
        result = trend(paths, **options, progress=progress, engine=engine)
    for report in result.reports:
        report.settings["config"] = str(config) if config else None
    if fmt == Format.table and output is None:
        render_trend_table(result, stdout)
    else:
        emit(render_trend(result, fmt.value), output)
    if result.failed:
        raise typer.Exit(EXIT_GATE)
