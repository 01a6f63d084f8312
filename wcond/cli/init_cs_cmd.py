"""`wcond init-cs`: Convolutional Similarity minimization as an offline initialization step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from wcond._version import __version__
from wcond.checkpoint.source import check_source
from wcond.checkpoint.target import check_output
from wcond.cli import app
from wcond.cli.common import (
    CheckpointArg,
    DeviceOpt,
    DownloadOpt,
    ExcludeOpt,
    ForceOpt,
    GroupsOpt,
    LayersOpt,
    RayAddressOpt,
    RayOpt,
    RewriteFormatOpt,
    emit,
    engine_for,
    finite,
    handle_errors,
    load_torch,
    progress_bar,
    stderr,
    stdout,
)
from wcond.config import parse_groups
from wcond.defaults import (
    DEVICE,
    ITERATIONS,
    LR,
    MAX_ITERATIONS,
    MAX_SEED,
    OPTIMIZER,
    Optimizer,
)
from wcond.errors import UsageError
from wcond.text import markup


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
        int,
        typer.Option(
            "--iterations", "-n", help="Optimizer steps (the paper's I).", min=1, max=MAX_ITERATIONS
        ),
    ] = ITERATIONS,
    lr: Annotated[
        float,
        typer.Option(
            "--lr", help="Learning rate (the paper: Adam at 1e-3).", min=0.0, callback=finite
        ),
    ] = LR,
    optimizer: Annotated[
        Optimizer,
        typer.Option(
            "--optimizer",
            help="Optimizer minimizing the summed CS.",
        ),
    ] = OPTIMIZER,
    device: DeviceOpt = DEVICE,
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
            "--seed",
            help="Seed torch for a reproducible run (CPU results are then deterministic).",
            min=0,
            max=MAX_SEED,
        ),
    ] = None,
    force: ForceOpt = False,
    history: Annotated[
        Optional[Path],
        typer.Option(
            "--history",
            help="Write the CS curve (per iteration, per layer) to this .json file.",
            metavar="FILE",
        ),
    ] = None,
    format: RewriteFormatOpt = "table",
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Minimize Convolutional Similarity over the conv layers (CS paper, Algorithm 1) and write a new checkpoint.

    Everything else (biases, BatchNorm, Linear layers, a Lightning checkpoint's other entries,
    safetensors metadata) is copied unchanged; OUT is written to a temporary file and renamed
    only when complete.

    A DCP directory (torch.distributed.checkpoint) is written as one normal file (.safetensors or .pt)
    holding its model state dict; optimizer state and other entries are not carried over.

    What to expect (benchmarks/CS_TRAINING.md, a small CNN on digits): the defaults mostly shrink
    the filters. Behind BatchNorm that only raises each conv's effective learning rate; it gained
    about 1 point on a task with headroom, and rescaling the random filters to the same norms
    without CS gained more. Without BatchNorm the defaults left a network that did not train: use
    --keep-norm there. --keep-norm lowers feature-map similarity but bought no accuracy with
    BatchNorm.

    Example: wcond init-cs model.pt -o model_cs.pt --iterations 500 --keep-norm
    """
    check_source(checkpoint)
    check_output(checkpoint, output, force)
    if history is not None and history.resolve() in (checkpoint.resolve(), output.resolve()):
        raise UsageError(
            f"--history {history}: would overwrite the input or output checkpoint; choose another file"
        )
    if history is not None and history.suffix.lower() != ".json":
        raise UsageError(f"--history {history}: the CS curve is written as JSON; give a .json file")
    group_sizes = parse_groups(groups or ())
    load_torch()
    from wcond.checkpoint.open import open_checkpoint
    from wcond.checkpoint.write import Layout, save_checkpoint
    from wcond.condition import init_cs
    from wcond.output import write_text
    from wcond.render.init_cs import render_init_cs

    ck = open_checkpoint(checkpoint)
    with (
        engine_for(ray, ray_address) as engine,
        progress_bar("init-cs on Ray" if engine else "init-cs") as progress,
    ):
        tensors, result = init_cs(
            ck,
            iterations=iterations,
            lr=lr,
            optimizer=optimizer,
            device=device,
            layers=layers or (),
            exclude=exclude or (),
            groups=group_sizes,
            keep_norm=keep_norm,
            seed=seed,
            progress=progress,
            history=history is not None,
            engine=engine,
        )
    warnings = save_checkpoint(output, tensors, like=Layout.of(ck))
    if history is not None:
        doc = {
            "wcond_version": __version__,
            "checkpoint": result.checkpoint,
            "settings": result.settings,
            **(result.history or {}),
        }
        write_text(history, json.dumps(doc) + "\n")
    if format == "json":
        from wcond.render.json import to_json

        emit(to_json(result, output=str(output), warnings=warnings), None)
    else:
        from wcond.render.text import Part, keep_name, print_prose

        render_init_cs(result, stdout)
        also: list[Part] = [" and ", keep_name(history)] if history else []
        print_prose(stdout, "wrote ", keep_name(output), *also)
    for warning in warnings:
        stderr.print(f"[yellow]warning:[/] {markup(warning)}", soft_wrap=True)
