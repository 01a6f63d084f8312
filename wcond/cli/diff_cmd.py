"""`wcond diff`: every metric of two checkpoints side by side, layers matched by key."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from wcond.checkpoint.source import check_source
from wcond.cli import app
from wcond.cli.common import (
    CheckpointArg,
    DeviceOpt,
    DownloadOpt,
    ExcludeOpt,
    GroupsOpt,
    LayersOpt,
    RayAddressOpt,
    RayOpt,
    TauCosOpt,
    TauEucOpt,
    engine_for,
    handle_errors,
    load_torch,
    progress_bar,
)
from wcond.cli.outputs import OutputsOpt, QuietOpt, plan_outputs, write_outputs
from wcond.cli.project_config import ConfigOpt, read_config, with_config
from wcond.defaults import DEVICE, DIFF_FORMATS, TAU_COS, TAU_EUC, DiffFormat


@app.command("diff")
@handle_errors
def diff_command(
    ctx: typer.Context,
    a: CheckpointArg,
    b: CheckpointArg,
    format: Annotated[
        Optional[DiffFormat],
        typer.Option(
            "--format",
            "-f",
            help="Output format: "
            + ", ".join(DIFF_FORMATS)
            + " (default: table, or from -o's extension).",
            metavar="FORMAT",
        ),
    ] = None,
    output: OutputsOpt = None,
    quiet: QuietOpt = False,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    groups: GroupsOpt = None,
    tau_cos: TauCosOpt = TAU_COS,
    tau_euc: TauEucOpt = TAU_EUC,
    device: DeviceOpt = DEVICE,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    config: ConfigOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Compare two checkpoints, e.g. before and after init-cs or shrink.

    Every inspect metric for A and B, the change B - A and the relative change, layers found on
    one side only, and shape changes.

    Both sides are analyzed with the same settings, taken from \\[tool.wcond] (or --config) and the flags.
    -o may be repeated (diff.md, diff.json): both are analysed once; the table still printed unless --quiet.

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
        device=device,
    )
    plan = plan_outputs(DIFF_FORMATS, format, output, quiet=quiet)
    check_source(a)
    check_source(b)
    load_torch()
    from wcond.diff import diff

    with (
        engine_for(ray, ray_address) as engine,
        progress_bar("inspecting A and B" + (" on Ray" if engine else "")) as progress,
    ):
        report = diff(a, b, **o, config=cfg.path, progress=progress, engine=engine)
    write_outputs("diff", report, plan)
