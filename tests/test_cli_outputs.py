"""-o repeated: one analysis, every report; GitHub Actions' job summary and annotations."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import wcond.analyze
import wcond.checkpoint.open
from wcond.checkpoint.torch_file import TorchFileCheckpoint
from wcond.cli import app
from wcond.render.github import escape_data, escape_property, workflow_commands

runner = CliRunner()
GATE = "near_parallel_rows>0"  # trips on conv2 of the small state dict (a planted parallel pair)
NAMES = ("report.html", "wcond.xml", "summary.md", "report.json")


def run(*args: object, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter[str], list[str]]:
    """(tensor reads by key, checkpoints opened), counted at the torch reader and at open_checkpoint."""
    gets: Counter[str] = Counter()
    opens: list[str] = []
    real_get, real_open = TorchFileCheckpoint.get, wcond.checkpoint.open.open_checkpoint

    def get(self: TorchFileCheckpoint, key: str) -> torch.Tensor:
        gets[key] += 1
        return real_get(self, key)

    def open_checkpoint(path: object) -> object:
        opens.append(str(path))
        return real_open(path)  # type: ignore[arg-type]

    monkeypatch.setattr(TorchFileCheckpoint, "get", get)
    monkeypatch.setattr(wcond.checkpoint.open, "open_checkpoint", open_checkpoint)
    monkeypatch.setattr(wcond.analyze, "open_checkpoint", open_checkpoint)
    return gets, opens


def test_four_outputs_one_read_and_the_files_of_four_single_runs(
    pt_file: Path, tmp_path: Path, reads: tuple[Counter[str], list[str]]
) -> None:
    gets, opens = reads
    together = tmp_path / "together"
    result = run(
        "inspect", pt_file, "--fail-if", GATE, *(a for n in NAMES for a in ("-o", together / n))
    )
    assert result.exit_code == 1, result.output
    assert len(opens) == 1, opens  # opened once...
    analysed = {
        layer["name"] for layer in json.loads((together / "report.json").read_text())["layers"]
    }
    # ...and each layer read once; with matplotlib the page's heatmaps read their layers again.
    again = set()
    if importlib.util.find_spec("matplotlib") is not None:
        again = {"conv2.weight", "conv1.weight", "fc.weight"} & set(gets)
    assert analysed and all(gets[k] == 1 + (k in again) for k in analysed), gets
    assert result.stdout.startswith("wcond inspect:")  # the table, as without -o
    plain = run("inspect", pt_file, "--fail-if", GATE)
    assert result.stdout == plain.stdout and plain.exit_code == 1
    for n in NAMES:
        assert f"wrote {together / n}" in result.stderr

    for n in NAMES:
        alone = tmp_path / "alone" / n.split(".")[0]
        single = run("inspect", pt_file, "--fail-if", GATE, "-o", alone / n, "--quiet")
        assert single.exit_code == 1 and single.stdout == ""
        # Nothing in these reports depends on the run (no time, no output path): byte for byte.
        assert (alone / n).read_bytes() == (together / n).read_bytes(), n
    assert len(opens) == 2 + len(NAMES)  # and once for each run since (the plain one, four single)


def test_the_exit_code_does_not_depend_on_the_outputs(pt_file: Path, tmp_path: Path) -> None:
    for extra in (
        [],
        ["-q"],
        ["-o", tmp_path / "a.md"],
        ["-o", tmp_path / "b.xml", "-o", tmp_path / "b.csv", "-q"],
    ):
        assert run("inspect", pt_file, "--fail-if", GATE, *extra).exit_code == 1, extra
        assert run("inspect", pt_file, "--fail-if", "acv_mean>2", *extra).exit_code == 0, extra


def test_diff_writes_several_outputs(pt_file: Path, tmp_path: Path) -> None:
    result = run("diff", pt_file, pt_file, "-o", tmp_path / "d.md", "-o", tmp_path / "d.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "d.json").read_text())["layers"]
    assert (tmp_path / "d.md").read_text().startswith("## wcond diff")
    assert "conv2.weight" in result.stdout  # the table too


REPORT_EXTENSIONS = ".json .md .csv .txt .html .htm .xml .parquet"
CHECKPOINT_EXTENSIONS = ".safetensors, .pt, .pth, .bin or .ckpt"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["inspect", "{ck}", "-o", "r.yaml"],
            f"r.yaml: no report format for '.yaml' here; use {REPORT_EXTENSIONS} (or --format for another name)",
        ),
        (
            ["inspect", "{ck}", "-o", "report"],
            f"report: no report format for '(no extension)' here; use {REPORT_EXTENSIONS} (or --format for another name)",
        ),
        (
            ["inspect", "{ck}", "-o", "r.json", "-o", "r.yaml"],
            f"r.yaml: no report format for '.yaml' here; use {REPORT_EXTENSIONS} (or --format for another name)",
        ),
        (
            ["diff", "{ck}", "{ck}", "-o", "r.yaml"],
            "r.yaml: no report format for '.yaml' here; use .json .md .txt (or --format for another name)",
        ),
        (  # a format inspect writes but diff does not: refused, not written as a table
            ["diff", "{ck}", "{ck}", "-o", "r.html"],
            "r.html: no report format for '.html' here; use .json .md .txt (or --format for another name)",
        ),
        (
            ["init-cs", "{ck}", "-o", "out.pt", "-n", "1", "--history", "r.yaml"],
            "--history r.yaml: the CS curve is written as JSON; give a .json file",
        ),
        (
            ["init-cs", "{ck}", "-o", "r.yaml", "-n", "1"],
            f"r.yaml: unknown output format '.yaml'; use {CHECKPOINT_EXTENSIONS}",
        ),
        (
            ["shrink", "{ck}", "-o", "r.yaml"],
            f"r.yaml: unknown output format '.yaml'; use {CHECKPOINT_EXTENSIONS}",
        ),
        (
            ["expand", "{ck}", "-o", "r.yaml"],
            f"r.yaml: unknown output format '.yaml'; use {CHECKPOINT_EXTENSIONS}",
        ),
        (
            ["plot", "{ck}", "-o", "r.yaml"],
            "r.yaml: unknown image format '.yaml'; use .png or .svg",
        ),
    ],
)
def test_an_unknown_output_extension_is_refused_in_one_line(
    pt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(*(a.format(ck=pt_file) for a in args))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: {message}"]
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_format_names_the_format_for_any_file_name(pt_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.yaml"
    result = run("inspect", pt_file, "-f", "json", "-o", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["summary"]["layers"] == 3
    result = run("diff", pt_file, pt_file, "-f", "markdown", "-o", tmp_path / "d.log")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d.log").read_text().startswith("## wcond diff")


def test_a_known_extension_still_picks_the_format(pt_file: Path, tmp_path: Path) -> None:
    result = run("diff", pt_file, pt_file, "-o", tmp_path / "d.txt")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d.txt").read_text().startswith("wcond diff")


def test_a_run_of_checkpoints_writes_its_page_and_junit_at_once(tmp_path: Path) -> None:
    from conftest import small_state_dict

    for step in (100, 200):
        torch.save(small_state_dict(seed=step), tmp_path / f"step_{step}.pt")
    outs = [tmp_path / "run.html", tmp_path / "run.xml", tmp_path / "run.json"]
    args = ["inspect", tmp_path / "step_*.pt", "--fail-if", GATE]
    result = run(*args, *(a for o in outs for a in ("-o", o)))
    assert result.exit_code == 1 and "2 checkpoints" in result.stdout
    assert outs[0].read_text().count("<svg") > 0 and outs[1].read_text().count("<testsuite ") == 2
    assert json.loads(outs[2].read_text())["failed"] is True


# --------------------------------------------------------------------------- GitHub Actions

HOSTILE = "evil\n::error::forged %0A::warning title=x::\r,: end.weight"


@pytest.fixture
def hostile_pt(tmp_path: Path) -> Path:
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    w[1] = 2 * w[0]  # a parallel pair: trips near_parallel_rows>0
    path = tmp_path / "hostile.pt"
    torch.save({HOSTILE: w, "ok.weight": torch.randn(8, 8)}, path)
    return path


def _commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("::")]


def test_in_github_actions_the_summary_is_appended_and_each_gate_annotated(
    hostile_pt: Path, tmp_path: Path
) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("previous step\n", encoding="utf-8")
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    result = run("inspect", hostile_pt, "--fail-if", GATE, "--fail-if", "acv_mean>2", env=env)
    assert result.exit_code == 1, result.output
    text = summary.read_text(encoding="utf-8")
    assert (
        text.startswith("previous step\n## wcond inspect") and "❌ `near_parallel_rows>0`" in text
    )
    assert "\nforged" not in text and "::error" not in text.replace(":\\x3aerror", "")
    commands = _commands(result.stdout)
    assert len(commands) == 1, commands  # one tripped gate (of two), and nothing forged
    cmd = commands[0]
    # What the runner parses: "::error" + properties, up to the next "::", then the message.
    head, message = cmd[2:].split("::", 1)
    assert head == "error title=wcond gate near_parallel_rows>0"
    assert "::" not in message  # the name cannot open a second command, even on this line
    assert message.startswith(
        f"{hostile_pt}: 1 layer trips near_parallel_rows>0: evil\\n:\\x3aerror"
    )
    assert "%250A" in message and "\\r%2C" not in message and "\\r," in message
    assert message.endswith(" end.weight = 1")
    # Every line of the job log that is a command is ours: the name's newline never reached it.
    assert all(
        line.startswith(("::error title=", "::warning title=")) for line in _commands(result.output)
    )


def test_the_flag_works_anywhere_and_no_github_silences_it(
    hostile_pt: Path, tmp_path: Path
) -> None:
    env = {"GITHUB_ACTIONS": "", "GITHUB_STEP_SUMMARY": ""}
    outside = run("inspect", hostile_pt, "--fail-if", GATE, env=env)
    assert outside.exit_code == 1 and not _commands(outside.stdout)
    flagged = run("inspect", hostile_pt, "--fail-if", GATE, "--github", env=env)
    assert flagged.exit_code == 1 and len(_commands(flagged.stdout)) == 1
    assert "GITHUB_STEP_SUMMARY is not set: no job summary written" in flagged.stderr
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(tmp_path / "s.md")}
    off = run("inspect", hostile_pt, "--fail-if", GATE, "--no-github", env=env)
    assert off.exit_code == 1 and not _commands(off.stdout) and not (tmp_path / "s.md").exists()


def test_a_report_on_stdout_keeps_the_commands_out_of_it(hostile_pt: Path, tmp_path: Path) -> None:
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(tmp_path / "s.md")}
    result = run("inspect", hostile_pt, "--fail-if", GATE, "-f", "json", env=env)
    assert result.exit_code == 1
    assert (
        json.loads(result.stdout)["gates"][0]["passed"] is False
    )  # valid JSON: no command line in it
    assert len(_commands(result.stderr)) == 1


def test_warnings_for_nonfinite_layers_and_dead_rows(tmp_path: Path) -> None:
    w = torch.randn(6, 6)
    w[2] = 0.0
    nan = torch.randn(6, 6)
    nan[0, 0] = float("nan")
    path = tmp_path / "m.pt"
    torch.save({"dead.weight": w, "nan,:x.weight": nan}, path)
    result = run("inspect", path, "--github", env={"GITHUB_STEP_SUMMARY": ""})
    assert result.exit_code == 0
    commands = _commands(result.stdout)
    assert len(commands) == 2
    assert commands[0].startswith("::warning title=wcond%3A NaN/Inf in weights::")
    assert commands[0].endswith(
        "1 layers hold NaN or Inf (no gate trips on their metrics): nan,:x.weight"
    )
    assert commands[1].endswith("all-zero rows in 1 layers: dead.weight (1)")


def test_escapes_as_github_specifies() -> None:
    assert escape_data("50% done") == "50%25 done"
    assert escape_data("a\nb\rc") == "a\\nb\\rc"  # shown as escapes first: no line break left
    assert escape_property("k: v, w %") == "k%3A v%2C w %25"
    assert escape_data("x::y") == "x:\\x3ay"
    assert workflow_commands([]) == ""
