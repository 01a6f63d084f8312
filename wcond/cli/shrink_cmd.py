"""`wcond shrink` and `wcond expand`: RaRe merging into a smaller checkpoint, and back to dense."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wcond import __version__
from wcond.cli import app
from wcond.cli.common import (
    CheckpointArg,
    DeviceChoice,
    DeviceOpt,
    DownloadOpt,
    ExcludeOpt,
    ForceOpt,
    LayersOpt,
    ReportFormat,
    TauCosOpt,
    TauEucOpt,
    emit,
    handle_errors,
    progress_bar,
    stderr,
    stdout,
)
from wcond.errors import UsageError
from wcond.render import fmt_number
from wcond.shrink import ShrinkReport, expand, fold, shrink


class Axis(str, Enum):
    auto = "auto"
    rows = "rows"
    cols = "cols"
    both = "both"


@app.command("shrink")
@handle_errors
def shrink_command(
    checkpoint: CheckpointArg,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output", "-o", help="Where to write the smaller checkpoint (.safetensors, .pt, ...)."
        ),
    ] = None,
    tau_cos: TauCosOpt = 1e-4,
    tau_euc: TauEucOpt = 0.1,
    axis: Annotated[
        Axis,
        typer.Option(
            "--axis", help="auto: the longer axis only (both for a square layer), as the paper."
        ),
    ] = Axis.auto,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    protect: Annotated[
        Optional[list[str]],
        typer.Option(
            "--protect", help="Never fuse layers matching this glob (repeatable).", metavar="GLOB"
        ),
    ] = None,
    no_protect_ends: Annotated[
        bool,
        typer.Option(
            "--no-protect-ends",
            help="Also fuse the first layer's columns and the last layer's rows.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be fused; write nothing.")
    ] = False,
    device: DeviceOpt = DeviceChoice.cpu,
    force: ForceOpt = False,
    format: Annotated[
        ReportFormat, typer.Option("--format", "-f", help="Report format on stdout.")
    ] = ReportFormat.table,
    fold_units: Annotated[
        bool,
        typer.Option(
            "--fold",
            help="Remove positively parallel units along --chain: a plain, narrower state dict.",
        ),
    ] = False,
    chain: Annotated[
        Optional[str],
        typer.Option(
            "--chain",
            help="With --fold: weight keys in the order data flows, comma-separated.",
            metavar="KEY1,KEY2,...",
        ),
    ] = None,
    download: DownloadOpt = False,
) -> None:
    """Fuse near-parallel rows/columns (RaRe merging) into a smaller checkpoint.

    Each shrunk layer is stored as W' plus one index and one coefficient per original row/column.
    Load it with wcond.load_state_dict(OUT), or write it dense with `wcond expand`.
    With --fold --chain, parallel units of ReLU-joined layers are removed outright instead.

    A DCP directory (torch.distributed.checkpoint) is written as one normal file holding its model
    state dict.

    Example: wcond shrink model.pt --tau-cos 1e-4 -o small.safetensors
    """
    if output is None and not dry_run:
        raise UsageError("-o OUT is required (or pass --dry-run to report without writing)")
    target = None if dry_run else output
    with progress_bar("shrinking") as progress:
        if fold_units:
            if chain is None:
                raise UsageError(
                    "--fold needs --chain KEY1,KEY2,... (the layers, in the order data flows)"
                )
            stray = [
                name
                for name, given in (
                    ("--axis", axis != Axis.auto),
                    ("--layers", layers),
                    ("--exclude", exclude),
                    ("--protect", protect),
                    ("--no-protect-ends", no_protect_ends),
                )
                if given
            ]
            if stray:
                raise UsageError(
                    f"--fold takes its layers from --chain; {', '.join(stray)} do not apply to it"
                )
            keys = [k.strip() for k in chain.split(",") if k.strip()]
            report = fold(
                checkpoint,
                target,
                chain=keys,
                tau_cos=tau_cos,
                tau_euc=tau_euc,
                force=force,
                device=device.value,
                progress=progress,
            )
        else:
            if chain is not None:
                raise UsageError(
                    "--chain goes with --fold; without --fold, shrink stores factorized layers and needs no chain"
                )
            report = shrink(
                checkpoint,
                target,
                tau_cos=tau_cos,
                tau_euc=tau_euc,
                axis=axis.value,
                layers=layers or (),
                exclude=exclude or (),
                protect=protect or (),
                protect_ends=not no_protect_ends,
                force=force,
                device=device.value,
                progress=progress,
            )
    if format == ReportFormat.json:
        emit(json.dumps({"wcond_version": __version__, **report.to_dict()}, indent=2) + "\n", None)
    else:
        render_shrink(report, stdout)
    for warning in report.warnings:
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


def render_shrink(report: ShrinkReport, console: Console) -> None:
    """The terminal view of a ShrinkReport: one row per layer, then the totals."""
    title = f"wcond shrink{' --fold' if report.mode == 'fold' else ''}: {report.checkpoint}"
    table = Table(
        title=escape(title),
        title_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        padding=(0, 0, 0, 1),
        pad_edge=False,
    )
    table.add_column("layer", overflow="fold", min_width=16)
    for header in ("shape", "∥r/c", "params", "error", "max°"):
        table.add_column(header, justify="right", no_wrap=True)
    for r in report.layers:
        shape = _shape(r.shape_before) + (
            "" if r.shape_after == r.shape_before else f" → {_shape(r.shape_after)}"
        )
        params = f"{r.params_before:,}" + (
            "" if r.params_after == r.params_before else f" → {r.params_after:,}"
        )
        table.add_row(
            escape(r.name),
            shape,
            f"{r.fused_rows}/{r.fused_cols}",
            params,
            fmt_number(r.reconstruction_error, 3),
            fmt_number(r.max_angle_deg, 3),
            style="bold" if r.changed else "dim",
        )
    console.print(table)
    console.print(
        "[dim]∥r/c: row/column pairs fused  error: |W - P W' Q|/|W|  max°: widest pair fused[/]"
    )
    console.print(
        f"parameters: {report.params_before:,} → {report.params_after:,} "
        f"([bold]{report.params_removed:,}[/] removed, {report.percent_removed:.2f}%); "
        f"tensor bytes: {report.bytes_before:,} → {report.bytes_after:,}",
        soft_wrap=True,
    )
    if report.widths:
        changed = ", ".join(f"{escape(k)} {a} → {b}" for k, (a, b) in report.widths.items())
        console.print(
            f"new widths (output units): {changed}; build the model with these to load the output",
            soft_wrap=True,
        )
    for r in report.layers:
        for note in r.notes:
            console.print(f"[dim]note[/] {escape(r.name)}: {escape(note)}", soft_wrap=True)
    if report.output is None:
        console.print("dry run: nothing written")
    else:
        console.print(f"wrote {escape(report.output)}", soft_wrap=True)


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape))


@app.command("expand")
@handle_errors
def expand_command(
    checkpoint: CheckpointArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Where to write the dense checkpoint (.safetensors, .pt, ...).",
            show_default=False,
        ),
    ],
    force: ForceOpt = False,
    download: DownloadOpt = False,
) -> None:
    """Rebuild a shrunk checkpoint's factorized layers into a plain checkpoint any model loads.

    Example: wcond expand small.safetensors -o dense.safetensors
    """
    result = expand(checkpoint, output, force=force)
    if result.expanded:
        n = len(result.expanded)
        stdout.print(
            f"expanded {n} factorized layer{'s' if n > 1 else ''}: {escape(', '.join(result.expanded))}",
            soft_wrap=True,
        )
    else:
        stdout.print(
            f"{escape(result.checkpoint)} holds no factorized layers; its tensors were copied unchanged",
            soft_wrap=True,
        )
    for warning in result.warnings:
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    stdout.print(f"wrote {escape(result.output)}", soft_wrap=True)
