"""`wcond init-cs`: Convolutional Similarity minimization as an offline initialization step."""

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
    GroupsOpt,
    LayersOpt,
    ReportFormat,
    emit,
    handle_errors,
    progress_bar,
    stderr,
    stdout,
)
from wcond.condition import InitCSResult, LayerResult, init_cs
from wcond.errors import UsageError
from wcond.layers import parse_groups
from wcond.load import open_checkpoint
from wcond.render import fmt_number
from wcond.save import check_output, save_checkpoint, write_text


class Optimizer(str, Enum):
    adam = "adam"
    sgd = "sgd"


@app.command("init-cs")
@handle_errors
def init_cs_command(
    checkpoint: CheckpointArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Where to write the conditioned checkpoint (.safetensors, .pt, .ckpt, ...).",
            show_default=False,
        ),
    ],
    iterations: Annotated[
        int, typer.Option("--iterations", "-n", help="Optimizer steps (the paper's I).", min=1)
    ] = 500,
    lr: Annotated[
        float, typer.Option("--lr", help="Learning rate (the paper: Adam at 1e-3).", min=0.0)
    ] = 1e-3,
    optimizer: Annotated[
        Optimizer, typer.Option("--optimizer", help="Optimizer minimizing the summed CS.")
    ] = Optimizer.adam,
    device: DeviceOpt = DeviceChoice.auto,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    groups: GroupsOpt = None,
    keep_norm: Annotated[
        bool,
        typer.Option(
            "--keep-norm",
            help="Rescale every filter to its original norm after each step: only directions change.",
        ),
    ] = False,
    seed: Annotated[
        Optional[int],
        typer.Option(
            "--seed", help="Seed torch for a reproducible run (CPU results are then deterministic)."
        ),
    ] = None,
    force: ForceOpt = False,
    history: Annotated[
        Optional[Path],
        typer.Option(
            "--history",
            help="Write the CS curve (per iteration, per layer) to this JSON file.",
            metavar="FILE",
        ),
    ] = None,
    format: Annotated[
        ReportFormat, typer.Option("--format", "-f", help="Summary format on stdout.")
    ] = ReportFormat.table,
    download: DownloadOpt = False,
) -> None:
    """Minimize Convolutional Similarity over the conv layers (CS paper, Algorithm 1) and write a new checkpoint.

    Everything else (biases, BatchNorm, Linear layers, a Lightning checkpoint's other entries, safetensors metadata) is copied unchanged; OUT is written to a temporary file and renamed only when complete.

    A DCP directory (torch.distributed.checkpoint) is written as one normal file (.safetensors or .pt)
    holding its model state dict; optimizer state and other entries are not carried over.

    Example: wcond init-cs model.pt -o model_cs.pt --iterations 500 --keep-norm
    """
    check_output(checkpoint, output, force)
    if history is not None and history.resolve() in (checkpoint.resolve(), output.resolve()):
        raise UsageError(
            f"--history {history}: would overwrite the input or output checkpoint; choose another file"
        )
    ck = open_checkpoint(checkpoint)
    with progress_bar("init-cs") as progress:
        tensors, result = init_cs(
            ck,
            iterations=iterations,
            lr=lr,
            optimizer=optimizer.value,
            device=device.value,
            layers=layers or (),
            exclude=exclude or (),
            groups=parse_groups(groups or ()),
            keep_norm=keep_norm,
            seed=seed,
            progress=progress,
            history=history is not None,
        )
    warnings = save_checkpoint(output, tensors, like=ck)
    if history is not None:
        doc = {
            "wcond_version": __version__,
            "checkpoint": result.checkpoint,
            "settings": result.settings,
            **(result.history or {}),
        }
        write_text(history, json.dumps(doc) + "\n")
    if format == ReportFormat.json:
        emit(
            json.dumps(
                {
                    "wcond_version": __version__,
                    **result.to_dict(),
                    "output": str(output),
                    "warnings": warnings,
                },
                indent=2,
            )
            + "\n",
            None,
        )
    else:
        render_init_cs(result, stdout)
        stdout.print(
            f"wrote {escape(str(output))}" + (f" and {escape(str(history))}" if history else "")
        )
    for warning in warnings:
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


def _pct(v: float | None) -> str:
    """A signed percentage with one decimal, none from 100% up (keeps the table within 80 columns)."""
    if v is None:
        return "-"
    return f"{100 * v:+.0f}%" if abs(v) >= 0.9995 else f"{100 * v:+.1f}%"


def render_init_cs(result: InitCSResult, console: Console) -> None:
    """The terminal view: CS before/after per layer, the drop split into norms and directions, then totals and notes."""
    keep_norm = result.settings["keep_norm"]
    table = Table(
        title=escape(f"wcond init-cs: {result.checkpoint}"),
        title_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        padding=(0, 0, 0, 1),
        pad_edge=False,
    )
    table.add_column("layer", overflow="fold", min_width=12)
    # With --keep-norm the norm part and |W| are 0 by construction; the floor is what matters instead.
    middle = ["floor", "gap"] if keep_norm else ["norms", "dirs"]
    for header in [
        "CS",
        "after",
        "change",
        *middle,
        "cs_n",
        *([] if keep_norm else ["|W|"]),
        "max|Δw|",
    ]:
        table.add_column(header, justify="right", no_wrap=True)
    for r in result.layers:
        if keep_norm:
            middle = [
                fmt_number(r.cs_floor, 3),
                "-" if r.floor_gap_closed is None else _pct(r.floor_gap_closed).lstrip("+"),
            ]
        else:
            middle = [_pct(_neg(r.drop_from_norms)), _pct(_neg(r.drop_from_directions))]
        cells = [
            fmt_number(r.cs_before, 3),
            fmt_number(r.cs_after, 3),
            _pct(_neg(r.cs_drop)),
            *middle,
            f"{fmt_number(r.cs_norm_before, 3)}→{fmt_number(r.cs_norm_after, 3)}",
            *([] if keep_norm else [_pct(r.norm_change)]),
            fmt_number(r.max_abs_change, 3),
        ]
        table.add_row(escape(r.name), *cells, style="" if r.optimized else "dim")
    console.print(table)
    legend = (
        "CS before and after; change = norms + dirs, the parts due to the filters' norms and to their directions "
        "(CS of the new filters rescaled to their old norms); cs_n: conv_similarity_norm before→after; |W|: layer norm"
    )
    if keep_norm:
        legend = (
            "CS before and after; floor: lowest CS at these filter norms; gap: share of CS - floor removed; "
            "cs_n: conv_similarity_norm before→after"
        )
    console.print(f"[dim]{legend}[/]", soft_wrap=True)
    s = result.settings
    done = result.optimized
    drop = (result.cs_before - result.cs_after) / result.cs_before if result.cs_before else None
    console.print(
        f"total CS {fmt_number(result.cs_before)} → {fmt_number(result.cs_after)} ({_pct(_neg(drop))}) over "
        f"{len(done)} of {len(result.layers)} conv layers; {s['iterations']} {s['optimizer']} steps, lr {s['lr']:g}, "
        f"{'--keep-norm, ' if keep_norm else ''}{s['device']}, {result.seconds:.1f} s",
        soft_wrap=True,
    )
    if not keep_norm and _norms_dominate(done):
        console.print(
            "most of the drop came from smaller filters (CS is homogeneous of degree 4); "
            "--keep-norm holds each filter's norm fixed so that only directions change",
            soft_wrap=True,
        )
    for r in result.layers:
        for note in r.notes:
            console.print(f"[dim]note[/] {escape(r.name)}: {escape(note)}", soft_wrap=True)


def _neg(v: float | None) -> float | None:
    """A drop shown as a (negative) change."""
    return (
        None if v is None else 0.0 - v
    )  # 0.0 - 0.0 is +0.0: an unchanged layer shows +0.0%, not -0.0%


def _norms_dominate(rows: list[LayerResult]) -> bool:
    norms = sum((r.drop_from_norms or 0.0) * (r.cs_before or 0.0) for r in rows)
    dirs = sum((r.drop_from_directions or 0.0) * (r.cs_before or 0.0) for r in rows)
    return norms > max(dirs, 0.0)
