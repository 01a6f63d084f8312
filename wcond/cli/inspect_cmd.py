"""`wcond inspect`: the per-layer redundancy report with CI gates."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from wcond.checkpoint.source import check_source, expand_paths
from wcond.cli import app
from wcond.cli.common import (
    EXIT_GATE,
    DeviceOpt,
    DownloadOpt,
    ExcludeOpt,
    GroupsOpt,
    LayersOpt,
    OutputOpt,
    RayAddressOpt,
    RayOpt,
    TauCosOpt,
    TauEucOpt,
    check_gates,
    engine_for,
    handle_errors,
    load_torch,
    pick_format,
    progress_bar,
    say_gates,
    say_written,
    show,
)
from wcond.cli.project_config import ConfigOpt, read_config, with_config
from wcond.defaults import (
    DEVICE,
    INSPECT_FORMATS,
    MAX_TOP,
    TAU_COS,
    TAU_EUC,
    TOP,
    TREND_FORMAT_NAMES,
    InspectFormat,
)
from wcond.errors import UsageError

if TYPE_CHECKING:
    from wcond.cosines import CosMatrix
    from wcond.report import Report


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
        Optional[InspectFormat],
        typer.Option(
            "--format", "-f", help="Output format (default: table, or from -o's extension)."
        ),
    ] = None,
    output: OutputOpt = None,
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
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    config: ConfigOpt = None,
    download: DownloadOpt = False,
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
        device=device,
    )
    check_gates(o["fail_if"])
    # --format, then -o's extension, then the config's format, then the table.
    fmt = pick_format(INSPECT_FORMATS, format, output, cfg.values.get("format"))
    if fmt == "parquet" and output is None:
        raise UsageError("--format parquet writes a binary file: give -o FILE.parquet")
    for c in checkpoints:
        check_source(c)
    paths = expand_paths(checkpoints)
    if len(paths) > 1 and fmt not in (*TREND_FORMAT_NAMES, "parquet"):
        raise UsageError(
            f"--format {fmt} shows one checkpoint; with {len(paths)} checkpoints use "
            + ", ".join([*TREND_FORMAT_NAMES, "parquet"])
        )
    load_torch()
    from wcond.analyze import inspect as inspect_checkpoint

    if fmt == "parquet":
        from wcond.frames import require_parquet

        assert output is not None  # checked above
        require_parquet(output)  # before the analysis, not after
    label = "inspecting on Ray" if ray or ray_address else "inspecting"
    if len(paths) > 1:
        _inspect_many(paths, fmt, output, {**o, "config": cfg.path}, ray, ray_address, label)
        return
    with engine_for(ray, ray_address) as engine, progress_bar(label) as progress:
        report = inspect_checkpoint(
            paths[0], **o, config=cfg.path, progress=progress, engine=engine
        )
    if fmt == "parquet":
        _write_parquet(report.to_pandas(), output)
    else:
        html = {"cosines": _heatmap_cosines(report)} if fmt == "html" else {}
        show("report", report, fmt, output, **html)
    if report.failed:
        say_gates([report], shown_on_terminal=fmt == "table" and output is None)
        raise typer.Exit(EXIT_GATE)


def _inspect_many(
    paths: list[Path],
    fmt: str,
    output: Optional[Path],
    options: dict[str, Any],
    ray: bool,
    ray_address: Optional[str],
    label: str,
) -> None:
    """Several checkpoints: their trend as a table, JSON, CSV or Markdown; exit 1 if any gate tripped."""
    from wcond.trend import trend

    with engine_for(ray, ray_address) as engine, progress_bar(label) as progress:
        result = trend(paths, **options, progress=progress, engine=engine)
    if fmt == "parquet":
        _write_parquet(result.to_pandas(), output)  # the trend in long form
    else:
        show("trend", result, fmt, output)
    if result.failed:
        say_gates(result.reports, shown_on_terminal=fmt == "table" and output is None)
        raise typer.Exit(EXIT_GATE)


def _heatmap_cosines(report: Report) -> dict[str, CosMatrix | str] | None:
    """What the HTML page's heatmaps draw, from the checkpoint the report names.

    None where there is nothing to draw, no matplotlib to draw it with (the page says what to
    install), or no such file any more.
    """
    from wcond.checkpoint.open import open_checkpoint
    from wcond.cosines import heatmap_cosines
    from wcond.render.html import heatmap_layers
    from wcond.render.plot import require_matplotlib

    layers = [layer for layer, _ in heatmap_layers(report)]
    if not layers or not Path(report.checkpoint).exists():
        return None
    try:
        require_matplotlib()
    except UsageError:
        return None
    return heatmap_cosines(report, layers, open_checkpoint(report.checkpoint))


def _write_parquet(frame: Any, output: Optional[Path]) -> None:
    from wcond.frames import write_parquet

    assert output is not None  # checked before the analysis
    write_parquet(frame, output)
    say_written(output)
