"""`wcond inspect` through the CLI: formats, wrappers, gates, and every bad-input path."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from wcond.cli import app

runner = CliRunner()
JSON_KEYS = {
    "name",
    "kind",
    "shape",
    "acv_sum",
    "acv_mean",
    "conv_similarity",
    "conv_similarity_norm",
    "norm_loss",
    "norm_dev_max",
    "rare_rows",
    "rare_cols",
    "near_parallel_rows",
    "near_parallel_cols",
    "dead_rows",
}


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def inspect_json(*args: str) -> dict:
    result = run("inspect", *args, "--format", "json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def test_table_output(pt_file: Path) -> None:
    result = run("inspect", pt_file)
    assert result.exit_code == 0
    out = result.stdout
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        assert name in out
    assert (
        "bn1.weight" not in out and "num_batches_tracked" not in out
    )  # 1-D and integer tensors are not layers
    assert "near-parallel pairs: 1 rows" in out


def test_json_is_the_stable_interface(pt_file: Path) -> None:
    doc = inspect_json(pt_file)
    assert {"checkpoint", "layers", "summary"} <= set(doc)
    assert [layer["name"] for layer in doc["layers"]] == [
        "conv1.weight",
        "conv2.weight",
        "fc.weight",
    ]
    for layer in doc["layers"]:
        assert JSON_KEYS <= set(layer)
    conv2, fc = doc["layers"][1], doc["layers"][2]
    assert conv2["kind"] == "conv2d" and conv2["shape"] == [16, 8, 3, 3]
    assert (
        fc["kind"] == "matrix"
        and fc["conv_similarity"] is None
        and fc["conv_similarity_norm"] is None
    )
    assert conv2["near_parallel_rows"] == 1 and conv2["rare_rows"] == pytest.approx(0, abs=1e-6)
    closest = conv2["closest_rows"][0]
    assert (closest["i"], closest["j"]) == (1, 4) and closest["cos"] == pytest.approx(-1, abs=1e-6)
    assert doc["summary"]["near_parallel_rows"] == 1 and doc["summary"]["worst"][
        "near_parallel"
    ] == ["conv2.weight"]


def test_markdown_and_csv(pt_file: Path) -> None:
    md = run("inspect", pt_file, "-f", "markdown").stdout
    assert md.startswith("## wcond inspect") and "| `conv2.weight` | 16x8x3x3 |" in md
    rows = list(csv.DictReader(io.StringIO(run("inspect", pt_file, "-f", "csv").stdout)))
    assert [r["name"] for r in rows] == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert rows[2]["conv_similarity"] == "" and float(rows[1]["acv_mean"]) > 0


def test_output_file_and_format_from_extension(pt_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = run("inspect", pt_file, "-o", out)
    # The file, and the table still on stdout (as pytest --junitxml keeps its terminal report).
    assert result.exit_code == 0 and result.stdout.startswith("wcond inspect:")
    assert "conv2.weight" in result.stdout and f"wrote {out}" in result.stderr
    assert json.loads(out.read_text())["summary"]["layers"] == 3
    assert not list(tmp_path.glob(".*wcond-tmp"))
    quiet = run("inspect", pt_file, "-o", out, "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and f"wrote {out}" in quiet.stderr


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict", "module"])
def test_every_wrapper(tmp_path: Path, state_dict: dict, wrapper: str) -> None:
    path = tmp_path / "w.ckpt"
    torch.save(
        {
            wrapper: state_dict,
            "epoch": 1,
            "optimizer_states": [{"state": {0: {"m": torch.ones(4, 4)}}}],
        },
        path,
    )
    doc = inspect_json(path)
    assert [layer["name"] for layer in doc["layers"]] == [
        "conv1.weight",
        "conv2.weight",
        "fc.weight",
    ]
    assert doc["wrapper"] == wrapper


def test_safetensors_fp16_bf16_and_sharded(tmp_path: Path, state_dict: dict) -> None:
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state_dict.items()}
    half["fc.weight"] = state_dict["fc.weight"].bfloat16()
    save_file(dict(list(half.items())[:4]), str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(dict(list(half.items())[4:]), str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {
        k: f"model-0000{1 if i < 4 else 2}-of-00002.safetensors" for i, k in enumerate(half)
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    doc = inspect_json(tmp_path)
    dtypes = {layer["name"]: layer["dtype"] for layer in doc["layers"]}
    assert dtypes == {"conv1.weight": "float16", "conv2.weight": "float16", "fc.weight": "bfloat16"}
    assert doc["layers"][1]["near_parallel_rows"] == 1


def test_layer_selection(pt_file: Path) -> None:
    names = [
        layer["name"]
        for layer in inspect_json(pt_file, "--layers", "conv*", "--exclude", "conv1.*")["layers"]
    ]
    assert names == ["conv2.weight"]
    result = run("inspect", pt_file, "--layers", "nothing*")
    assert result.exit_code == 2 and "no layer matches" in result.stderr
    assert "did you mean" not in result.stderr  # nothing close


@pytest.mark.parametrize("command", ["inspect", "shrink", "diff"])
def test_layers_by_module_name_in_every_command_with_a_did_you_mean(
    pt_file: Path, command: str
) -> None:
    """`conv1` selects conv1.weight as shrink always did; a near miss names the closest layers."""
    extra = {"inspect": [], "shrink": ["--dry-run"], "diff": [str(pt_file)]}[command]
    doc = json.loads(
        run(command, pt_file, *extra, "--layers", "conv1", "--exclude", "fc", "-f", "json").stdout
    )
    names = [layer["name"] for layer in doc["layers"]]
    assert names == ["conv1.weight"]
    miss = run(command, pt_file, *extra, "--layers", "cnv2")
    assert miss.exit_code == 2
    assert miss.stderr.rstrip().endswith(
        "no layer matches --layers cnv2; did you mean 'conv2', 'conv1'?"
    ), miss.stderr


def test_groups_option_and_depthwise_hint(tmp_path: Path) -> None:
    sd = {
        "stem.weight": torch.randn(8, 3, 3, 3),
        "dw.weight": torch.randn(8, 1, 3, 3),
        "pw.weight": torch.randn(16, 8, 1, 1),
    }
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    doc = inspect_json(path)
    dw = doc["layers"][1]
    assert dw["groups"] == 1 and any(
        "depthwise" in n and "--groups 'dw.weight=8'" in n for n in dw["notes"]
    )
    grouped = inspect_json(path, "--groups", "dw.weight=8")["layers"][1]
    assert grouped["groups"] == 8 and grouped["conv_similarity"] < dw["conv_similarity"]
    assert not any("depthwise" in n for n in grouped["notes"])
    bad = run("inspect", path, "--groups", "dw.weight=3")
    assert bad.exit_code == 2 and "does not divide" in bad.stderr


def test_nonfinite_and_dead_rows_are_flagged_and_the_rest_reported(
    tmp_path: Path, state_dict: dict
) -> None:
    state_dict["conv1.weight"][2, 0, 0, 0] = float("nan")
    state_dict["fc.weight"][[3, 7]] = 0.0
    path = tmp_path / "m.pt"
    torch.save(state_dict, path)
    doc = inspect_json(path)
    conv1, conv2, fc = doc["layers"]
    assert conv1["nonfinite"] == 1 and conv1["acv_mean"] is None and "NaN/Inf" in conv1["notes"][0]
    assert conv2["acv_mean"] is not None
    assert (
        fc["dead_rows"] == 2
        and doc["summary"]["dead_rows"] == 2
        and doc["summary"]["nonfinite_layers"] == 1
    )
    table = run("inspect", path)
    assert table.exit_code == 0 and "NaN/Inf" in table.stdout


def test_gates(pt_file: Path) -> None:
    ok = run("inspect", pt_file, "--fail-if", "near_parallel_rows>5")
    assert ok.exit_code == 0 and "PASS near_parallel_rows>5" in ok.stdout
    bad = run("inspect", pt_file, "--fail-if", "near_parallel_rows>0", "--fail-if", "acv_mean>10")
    assert bad.exit_code == 1
    assert (
        "FAIL near_parallel_rows>0: conv2.weight (1)" in bad.stdout
        and "PASS acv_mean>10" in bad.stdout
    )
    doc = json.loads(
        run("inspect", pt_file, "-f", "json", "--fail-if", "near_parallel_rows>0").stdout
    )
    assert doc["gates"] == [
        {
            "expr": "near_parallel_rows>0",
            "passed": False,
            "violations": [{"layer": "conv2.weight", "value": 1.0}],
        }
    ]


@pytest.mark.parametrize(
    "expr, message",
    [
        ("acv_mean >> 1", "expected METRIC OP NUMBER"),
        ("nonsense>1", "unknown metric 'nonsense'"),
        ("acv_mean>", "expected METRIC OP NUMBER"),
        ("acv_mean>inf", "the threshold must be a finite number"),
        ("norm_loss<-inf", "the threshold must be a finite number"),
    ],
)
def test_bad_gate_expressions(pt_file: Path, expr: str, message: str) -> None:
    result = run("inspect", pt_file, "--fail-if", expr)
    # The library names the parameter (fail_if=); the CLI spells it as the flag.
    assert result.exit_code == 2 and f"--fail-if {expr!r}: {message}" in result.stderr


def test_null_metrics_never_trip_gates(pt_file: Path) -> None:
    result = run("inspect", pt_file, "--fail-if", "conv_similarity_norm>0", "--layers", "fc.*")
    assert result.exit_code == 0 and "PASS conv_similarity_norm>0" in result.stdout
    doc = json.loads(
        run(
            "inspect",
            pt_file,
            "-f",
            "json",
            "--fail-if",
            "conv_similarity_norm>0",
            "--layers",
            "fc.*",
        ).stdout
    )
    assert doc["gates"] == [{"expr": "conv_similarity_norm>0", "passed": True, "violations": []}]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file or directory"),
        (b"hello, I am text\n", "looks like a text file"),
        (b"\x00\x01\x02\x03" * 64, "unknown format"),
        (b"", "file is empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    result = run("inspect", path)
    assert result.exit_code == 2
    assert message in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_safetensors_and_unsafe_pickle(tmp_path: Path) -> None:
    st = tmp_path / "c.safetensors"
    save_file({"w": torch.randn(8, 8)}, str(st))
    st.write_bytes(st.read_bytes()[:-64])
    result = run("inspect", st)
    assert result.exit_code == 2 and "corrupt or truncated safetensors" in result.stderr

    class Evil:
        def __reduce__(self):
            return (print, ("this must never print",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2, 2), "x": Evil()}, evil)
    result = run("inspect", evil)
    assert (
        result.exit_code == 2
        and "refused" in result.stderr
        and "this must never print" not in result.output
    )


def test_no_analyzable_tensors(tmp_path: Path) -> None:
    path = tmp_path / "b.pt"
    torch.save(
        {
            "bias": torch.zeros(4),
            "steps": torch.ones(3, 3, dtype=torch.int64),
            "one_row": torch.zeros(1, 9),
        },
        path,
    )
    result = run("inspect", path)
    assert result.exit_code == 2 and "no analyzable tensors" in result.stderr


def test_empty_directory(tmp_path: Path) -> None:
    result = run("inspect", tmp_path)
    assert result.exit_code == 2 and "holds no checkpoint" in result.stderr


def test_unavailable_device(pt_file: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    result = run("inspect", pt_file, "--device", "cuda")
    assert result.exit_code == 2 and "CUDA is not available" in result.stderr


def test_python_dash_m_and_version(pt_file: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "wcond", "inspect", str(pt_file), "-f", "json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["summary"]["layers"] == 3
    assert run("--version").stdout.startswith("wcond ")


def test_sample_checkpoints_inspect_cleanly() -> None:
    samples = Path(__file__).parent.parent / "sample_checkpoints"
    for name in (
        "small_cnn.pt",
        "mlp.safetensors",
        "redundant_mlp.safetensors",
        "lightning_cnn.ckpt",
    ):
        result = run("inspect", samples / name, "-f", "json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["summary"]["layers"] >= 2


def test_written_files_get_normal_permissions(pt_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    old = os.umask(0o022)
    try:
        assert run("inspect", pt_file, "-o", out).exit_code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_narrow_terminal_keeps_the_layer_column(pt_file: Path) -> None:
    from rich.console import Console

    from wcond.analyze import inspect
    from wcond.render.report import render_table

    console = Console(width=72, record=True, file=io.StringIO(), color_system=None)
    render_table(inspect(pt_file), console)
    text = console.export_text()
    assert "conv2.weight" in text and "hidden at this width" in text
    rows = [line for line in text.splitlines() if line.startswith((" conv", " fc", " layer"))]
    assert len(rows) == 4 and all(len(line.rstrip()) <= 72 for line in rows)


def test_output_to_a_device_or_pipe_writes_through(pt_file: Path, tmp_path: Path) -> None:
    """-o /dev/null (or a named pipe) must be written to, never replaced by a renamed regular file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    import threading

    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    result = run("inspect", pt_file, "-o", fifo, "-f", "json")
    reader.join(timeout=30)
    assert result.exit_code == 0, result.stderr
    assert fifo.is_fifo() and json.loads(got[0])["summary"]["layers"] == 3
    assert not list(tmp_path.glob(".*wcond-tmp"))


def test_library_words_become_flags_at_the_cli_boundary() -> None:
    from wcond.cli.common import in_flags
    from wcond.errors import UsageError

    e = UsageError(
        "tau_cos=-1.0: must be >= 0; pass force=True, or protect_ends=False; lower lr= (it diverged)",
        params=("tau_cos", "force", "protect_ends", "lr"),
    )
    assert in_flags(e) == (
        "--tau-cos -1.0: must be >= 0; pass --force, or --no-protect-ends; lower --lr (it diverged)"
    )
    assert in_flags(UsageError("layers=['x'] names nothing")) == "layers=['x'] names nothing"


@pytest.mark.parametrize("where", [("-o", "gate.html"), ("-f", "json"), ("-o", "gate.xml")])
def test_a_tripped_gate_says_why_on_stderr_whatever_the_output(
    pt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: tuple[str, str]
) -> None:
    """The README's CI step writes a file or JSON: the log still names gate, checkpoint, layer, value."""
    monkeypatch.chdir(tmp_path)
    gates = ("--fail-if", "near_parallel_rows>0", "--fail-if", "acv_mean>10")
    result = run("inspect", pt_file, *where, *gates)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert f"FAIL near_parallel_rows>0: {pt_file} conv2.weight = 1" in lines
    assert "1 gate violation: exit 1" in lines
    assert not any("acv_mean>10" in line for line in lines)  # a gate that passed is not a failure


def test_gate_lines_on_stderr_for_several_checkpoints_and_hostile_names(tmp_path: Path) -> None:
    w = torch.randn(8, 12)
    w[5] = -w[1]
    evil = "x\n::error::forged"
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({evil: w.contiguous(), "fc.weight": torch.randn(4, 8)}, str(a))
    save_file({evil: torch.randn(8, 12), "fc.weight": torch.randn(4, 8)}, str(b))
    result = run("inspect", a, b, "-f", "json", "--fail-if", "near_parallel_rows>0")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert f"FAIL near_parallel_rows>0: {a} x\\n:\\x3aerror:\\x3aforged = 1" in lines
    assert "1 gate violation in 1 of 2 checkpoints: exit 1" in lines
    assert not any(line.startswith("::") for line in lines)


def test_a_table_on_a_terminal_shows_its_fail_lines_once(
    pt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wcond.cli import common

    monkeypatch.setattr(common._GuardedStdout, "isatty", lambda self: True, raising=False)
    result = run("inspect", pt_file, "--fail-if", "near_parallel_rows>0")
    assert result.exit_code == 1 and "FAIL near_parallel_rows>0: conv2.weight (1)" in result.stdout
    assert "FAIL" not in result.stderr


def test_the_tables_labels_name_metrics_in_gates(pt_file: Path, tmp_path: Path) -> None:
    """`--fail-if "rare_r<0.5"` (the table's header) is `rare_rows<0.5`, reported by its full name."""
    short = run("inspect", pt_file, "-f", "json", "--fail-if", "rare_r<0.5", "--fail-if", "acv>10")
    full = run(
        "inspect", pt_file, "-f", "json", "--fail-if", "rare_rows<0.5", "--fail-if", "acv_mean>10"
    )
    assert short.exit_code == full.exit_code == 1
    assert json.loads(short.stdout)["gates"] == json.loads(full.stdout)["gates"]
    assert [g["expr"] for g in json.loads(short.stdout)["gates"]] == [
        "rare_rows<0.5",
        "acv_mean>10",
    ]
    cfg = tmp_path / "wcond.toml"
    cfg.write_text('fail-if = ["cs_n>100"]\n', encoding="utf-8")
    assert run("inspect", pt_file, "--config", cfg).exit_code == 0
    bad = run("inspect", pt_file, "--fail-if", "acvx>1")
    assert bad.exit_code == 2
    assert "unknown metric 'acvx' (did you mean 'acv'?)" in bad.stderr
    assert "(or the table's labels acv, cs, cs_n, normdev" in bad.stderr
