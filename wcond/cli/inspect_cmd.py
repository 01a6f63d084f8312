"""`wcond inspect`: the per-layer redundancy report with CI gates."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from wcond.checkpoint.source import check_source, expand_paths
from wcond.cli import app
from wcond.cli.common import (
    CHECKPOINT_HELP,
    EXIT_GATE,
    FAIL_IF_HELP,
    GATES_EPILOG,
    DeviceOpt,
    DownloadOpt,
    ExcludeOpt,
    GroupsOpt,
    LayersOpt,
    RayAddressOpt,
    RayOpt,
    TauCosOpt,
    TauEucOpt,
    check_gates,
    engine_for,
    handle_errors,
    load_torch,
    progress_bar,
    say_gates,
)
from wcond.cli.outputs import (
    GithubOpt,
    OutputPlan,
    OutputsOpt,
    QuietOpt,
    github_wanted,
    plan_outputs,
    to_github,
    write_outputs,
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
from wcond.errors import UsageError

if TYPE_CHECKING:
    from wcond.checkpoint.base import Checkpoint
    from wcond.cosines import CosMatrix
    from wcond.report import Report


def _explain(value: bool) -> None:
    """--explain: the guide to the numbers, at the terminal's width; no checkpoint needed."""
    if value:
        from wcond.cli.common import stdout
        from wcond.explain import explain_text

        stdout.print(explain_text(stdout.width), end="", markup=False, highlight=False)
        raise typer.Exit()


@app.command("inspect", epilog=GATES_EPILOG)
@handle_errors
def inspect_command(
    ctx: typer.Context,
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help=CHECKPOINT_HELP
            + " Several (a quoted glob such as 'run/step_*.pt', or a directory of a run's "
            "checkpoints): one report each, ordered naturally, and each metric's trend per layer.",
            show_default=False,
            metavar="CHECKPOINT...",
        ),
    ],
    format: Annotated[
        Optional[InspectFormat],
        typer.Option(
            "--format",
            "-f",
            help="Output format: "
            + ", ".join(INSPECT_FORMATS)
            + " (default: table, or from -o's extension).",
            metavar="FORMAT",
        ),
    ] = None,
    output: OutputsOpt = None,
    quiet: QuietOpt = False,
    github: GithubOpt = None,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    groups: GroupsOpt = None,
    tau_cos: TauCosOpt = TAU_COS,
    tau_euc: TauEucOpt = TAU_EUC,
    top: Annotated[
        int,
        typer.Option(
            "--top",
            help=f"Closest pairs listed per layer and axis (JSON), 0 to {MAX_TOP}.",
            min=0,
            max=MAX_TOP,
            metavar="N",
        ),
    ] = TOP,
    fail_if: Annotated[
        Optional[list[str]],
        typer.Option(
            "--fail-if",
            help=FAIL_IF_HELP,
            metavar="EXPR",
        ),
    ] = None,
    device: DeviceOpt = DEVICE,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    config: ConfigOpt = None,
    download: DownloadOpt = False,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            callback=_explain,
            is_eager=True,
            help="Print what each metric measures, which way is worse, the range measured on "
            "trained networks and what to do next, then exit (no CHECKPOINT needed).",
        ),
    ] = False,
) -> None:
    """Report per layer: ACV, Convolutional Similarity, norm deviation, near-parallel pairs, RaRe.

    Exit codes: 0 fine, 1 a --fail-if gate tripped, 2 unusable input or arguments.
    Defaults come from \\[tool.wcond] in pyproject.toml (or --config FILE); flags override them.

    With several checkpoints the gates apply to each, and the exit code is the worst.

    -o may be repeated: the checkpoint is read and analysed once and each file written in the
    format of its extension, the table still printed (unless --quiet). In GitHub Actions (or with
    --github) the Markdown summary is appended to $GITHUB_STEP_SUMMARY and each tripped gate
    becomes an ::error annotation.

    Example: wcond inspect model.safetensors --fail-if "near_parallel_rows>0" -o report.html -o wcond.xml
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
        device=device,
    )
    check_gates(o["fail_if"])
    # Each -o's format: --format, then its extension, then the config's format, then the table.
    plan = plan_outputs(INSPECT_FORMATS, format, output, cfg.values.get("format"), quiet)
    for c in checkpoints:
        check_source(c)
    paths = expand_paths(checkpoints)
    load_torch()
    from wcond.analyze import inspect as inspect_checkpoint

    if "parquet" in plan.formats:
        from wcond.frames import require_parquet

        for path, fmt in plan.files:
            if fmt == "parquet":
                require_parquet(path)  # before the analysis, not after
    label = "inspecting on Ray" if ray or ray_address else "inspecting"
    if len(paths) > 1:
        _inspect_many(paths, plan, {**o, "config": cfg.path}, ray, ray_address, label, github)
        return
    with engine_for(ray, ray_address) as engine, progress_bar(label) as progress:
        # Opened once here, so that the HTML page's heatmaps read the same open checkpoint;
        # Ray's workers open it themselves from the path.
        source = paths[0] if engine is not None else _open(paths[0])
        report = inspect_checkpoint(source, **o, config=cfg.path, progress=progress, engine=engine)
    html = {"html": {"cosines": _heatmap_cosines(report, source)}} if "html" in plan.formats else {}
    write_outputs("report", report, plan, html)
    if github_wanted(github):
        to_github("report", report, [report], stdout_taken=plan.stdout not in (None, "table"))
    if report.failed:
        say_gates([report], shown_on_terminal=plan.stdout == "table")
        raise typer.Exit(EXIT_GATE)


def _open(path: Path) -> Checkpoint:
    from wcond.checkpoint.open import open_checkpoint

    return open_checkpoint(path)


def _inspect_many(
    paths: list[Path],
    plan: OutputPlan,
    options: dict[str, Any],
    ray: bool,
    ray_address: Optional[str],
    label: str,
    github: Optional[bool],
) -> None:
    """Several checkpoints: their trend in every output asked for; exit 1 if any gate tripped."""
    from wcond.trend import trend

    with engine_for(ray, ray_address) as engine, progress_bar(label) as progress:
        result = trend(paths, **options, progress=progress, engine=engine)
    write_outputs("trend", result, plan)  # parquet: the trend in long form
    if github_wanted(github):
        to_github("trend", result, result.reports, stdout_taken=plan.stdout not in (None, "table"))
    if result.failed:
        say_gates(result.reports, shown_on_terminal=plan.stdout == "table")
        raise typer.Exit(EXIT_GATE)


def _heatmap_cosines(
    report: Report, source: Path | Checkpoint
) -> dict[str, CosMatrix | str] | None:
    """What the HTML page's heatmaps draw, from the checkpoint analysed (opened again only on Ray).

    None where there is nothing to draw, no matplotlib to draw it with (the page says what to
    install), or no such file any more.
    """
    from wcond.cosines import heatmap_cosines
    from wcond.render.html import heatmap_layers
    from wcond.render.plot import require_matplotlib

    layers = [layer for layer, _ in heatmap_layers(report)]
    if not layers or (isinstance(source, Path) and not Path(report.checkpoint).exists()):
        return None
    try:
        require_matplotlib()
    except UsageError:
        return None
    return heatmap_cosines(report, layers, _open(source) if isinstance(source, Path) else source)
