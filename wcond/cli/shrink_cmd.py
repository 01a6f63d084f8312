"""`wcond shrink` and `wcond expand`: RaRe merging into a smaller checkpoint, and back to dense."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from wcond.checkpoint.source import check_source
from wcond.checkpoint.target import check_output
from wcond.cli import app
from wcond.cli.common import (
    CheckpointArg,
    DeviceOpt,
    DownloadOpt,
    ExcludeOpt,
    ForceOpt,
    LayersOpt,
    RayAddressOpt,
    RayOpt,
    RewriteFormatOpt,
    TauCosOpt,
    TauEucOpt,
    emit,
    engine_for,
    handle_errors,
    load_torch,
    progress_bar,
    stderr,
    stdout,
)
from wcond.defaults import AXIS, DEVICE, TAU_COS, TAU_EUC, Axis
from wcond.errors import UsageError
from wcond.text import markup


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
    tau_cos: TauCosOpt = TAU_COS,
    tau_euc: TauEucOpt = TAU_EUC,
    axis: Annotated[
        Axis,
        typer.Option(
            "--axis",
            help="auto: the longer axis only (both for a square layer), as the paper.",
        ),
    ] = AXIS,
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
    device: DeviceOpt = DEVICE,
    force: ForceOpt = False,
    format: RewriteFormatOpt = "table",
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
            help="With --fold: the layers in the order data flows, comma-separated, by module "
            "(net.0) or weight key (net.0.weight); a BatchNorm on a layer's output right after "
            "it (conv1,bn1,conv2,bn2,fc).",
            metavar="NAME1,NAME2,...",
        ),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            help="With --fold: import FACTORY from PKG.MODULE (your own code: importing it runs "
            "it, so name only code you trust), build the model, load IN into it and fold every "
            "chain found by tracing it. Writes a plain state dict.",
            metavar="PKG.MODULE:FACTORY",
        ),
    ] = None,
    input_shape: Annotated[
        Optional[str],
        typer.Option(
            "--input-shape",
            help="With --model: compare the outputs before and after on a random input of this "
            "shape (e.g. 1,3,32,32).",
            metavar="N,C,...",
        ),
    ] = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Fuse near-parallel rows/columns (RaRe merging) into a smaller checkpoint.

    Each shrunk layer is stored as W' plus an [original, stored] pair and a scale per fused row/column.
    Load it with wcond.load_state_dict(OUT), or write it dense with `wcond expand`.
    With --fold --chain, parallel units of ReLU-joined layers are removed outright instead;
    with --fold --model, the chains are found by tracing your model (its factory is imported).

    A DCP directory (torch.distributed.checkpoint) is written as one normal file holding its model
    state dict.

    Example: wcond shrink model.pt --tau-cos 1e-4 -o small.safetensors
    """
    if output is None and not dry_run:
        raise UsageError("-o OUT is required (or pass --dry-run to report without writing)")
    target = None if dry_run else output
    on_ray = ray or ray_address is not None
    if fold_units and on_ray:
        raise UsageError(
            "--fold couples the layers of its chain, so it runs in one process: drop --ray "
            "(shrink without --fold runs on Ray)"
        )
    if (model is not None or input_shape is not None) and not fold_units:
        raise UsageError("--model and --input-shape go with --fold")
    stray = [
        name
        for name, given in (
            ("--axis", axis != AXIS),
            ("--layers", layers),
            ("--exclude", exclude),
            ("--protect", protect),
            ("--no-protect-ends", no_protect_ends),
        )
        if given
    ]
    if fold_units and stray:
        raise UsageError(
            f"--fold takes its layers from --chain or --model; {', '.join(stray)} do not apply to it"
        )
    if fold_units and model is not None and chain is not None:
        raise UsageError("--fold takes --model (traced) or --chain (named), not both")
    if fold_units and model is None and chain is None:
        raise UsageError(
            "--fold needs --chain NAME1,NAME2,... (the layers, in the order data flows) "
            "or --model PKG.MODULE:FACTORY"
        )
    if chain is not None and not fold_units:
        raise UsageError(
            "--chain goes with --fold; without --fold, shrink stores factorized layers and needs no chain"
        )
    shape = None
    if input_shape is not None:
        try:
            shape = [int(n) for n in input_shape.split(",")]
        except ValueError:
            raise UsageError(f"--input-shape {input_shape!r}: wants sizes like 1,3,32,32") from None
    check_source(checkpoint)
    if target is not None:
        check_output(checkpoint, target, force)
    load_torch()
    from wcond.render.json import to_json
    from wcond.render.shrink import render_fold, render_shrink
    from wcond.shrink import fold, shrink
    from wcond.shrink.tracing import fold_checkpoint

    if fold_units and model is not None:
        folded = fold_checkpoint(
            checkpoint,
            target,
            model=model,
            input_shape=shape,
            tau_cos=tau_cos,
            tau_euc=tau_euc,
            force=force,
        )
        if format == "json":
            emit(to_json(folded), None)
        else:
            render_fold(folded, stdout)
        for warning in folded.warnings:
            stderr.print(f"[yellow]warning:[/] {markup(warning)}", soft_wrap=True)
        return
    with (
        engine_for(on_ray, ray_address) as engine,
        progress_bar("shrinking on Ray" if engine else "shrinking") as progress,
    ):
        if fold_units:
            assert chain is not None  # checked above
            keys = [k.strip() for k in chain.split(",") if k.strip()]
            report = fold(
                checkpoint,
                target,
                chain=keys,
                tau_cos=tau_cos,
                tau_euc=tau_euc,
                force=force,
                device=device,
                progress=progress,
            )
        else:
            report = shrink(
                checkpoint,
                target,
                tau_cos=tau_cos,
                tau_euc=tau_euc,
                axis=axis,
                layers=layers or (),
                exclude=exclude or (),
                protect=protect or (),
                protect_ends=not no_protect_ends,
                force=force,
                device=device,
                progress=progress,
                engine=engine,
            )
    if format == "json":
        emit(to_json(report), None)
    else:
        render_shrink(report, stdout)
    for warning in report.warnings:
        stderr.print(f"[yellow]warning:[/] {markup(warning)}", soft_wrap=True)


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
    check_source(checkpoint)
    check_output(checkpoint, output, force)
    load_torch()
    from wcond.render.text import keep_name, listed, print_prose
    from wcond.shrink import expand

    result = expand(checkpoint, output, force=force)
    if result.expanded:
        n = len(result.expanded)
        print_prose(
            stdout,
            f"expanded {n} factorized layer{'s' if n > 1 else ''}: ",
            *listed(result.expanded),
        )
    else:
        print_prose(
            stdout,
            keep_name(result.checkpoint),
            " holds no factorized layers; its tensors were copied unchanged",
        )
    for warning in result.warnings:
        stderr.print(f"[yellow]warning:[/] {markup(warning)}", soft_wrap=True)
    print_prose(stdout, "wrote ", keep_name(result.output))
