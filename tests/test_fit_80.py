"""80 columns: what each command prints on a terminal that wide, as golden files, and no line wider.

Each command runs through the CLI with ``COLUMNS=80`` in a scratch folder (relative paths, so the
text is the same on every machine). The inputs are built to hold what the layout must handle: a
layer name too long to leave room for every column (columns dropped, and the note saying so), notes,
tripped gates listing that name, a fold chain longer than a line, checkpoint file names that fill
the multi-checkpoint table. Regenerate with ``python -m pytest tests/test_fit_80.py --update-golden``
and review the diff of tests/golden/cli80_*.txt.

Widths are measured in cells (rich's cell_len): ∥, → and Δ are one cell each.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from rich.cells import cell_len
from rich.text import Text
from safetensors.torch import save_file
from test_fold import planted_cbnet
from test_golden import GATES, POINTWISE, check, golden_state_dict
from typer.testing import CliRunner

from wcond.cli import app
from wcond.render.text import Keep, keep_name, wrap_prose

WIDTH = 80
runner = CliRunner()
_SECONDS = re.compile(r"\b\d+\.\d s\b")  # init-cs's wall time, different on every run


def run80(*args: object, code: int = 0) -> str:
    """stdout of ``wcond ARGS`` at 80 columns, its wall times replaced by 'N s'."""
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == code, result.output
    return _SECONDS.sub("N s", result.stdout)


def assert_fits(text: str) -> None:
    wide = [line for line in text.splitlines() if cell_len(line.rstrip()) > WIDTH]
    assert not wide, f"lines wider than {WIDTH} cells:\n" + "\n".join(wide)


def lines_with(text: str, start: str) -> list[str]:
    """The line starting with ``start`` and its wrapped continuations (indented by two spaces)."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(start))
    j = i + 1
    while j < len(lines) and re.match(r"  \S", lines[j]):
        j += 1
    return lines[i:j]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    torch.save(golden_state_dict(pointwise=True), "golden.pt")
    return tmp_path


def test_inspect(here: Path, update_golden: bool) -> None:
    out = run80("inspect", "golden.pt", "--tau-cos", 0.01, "--tau-euc", 1.0, *_gates(), code=1)
    assert_fits(out)
    assert "hidden at this width: shape," in out and "note conv2.weight:" in out
    # The long name is never split: whole in its table row, and whole in the wrapped FAIL line.
    assert f" {POINTWISE} " in out
    fail = lines_with(out, "FAIL near_parallel_rows>0:")
    assert len(fail) == 2 and fail[1] == f"  {POINTWISE} (1)"
    check("cli80_inspect.txt", out, update_golden)


def _gates() -> list[str]:
    return [x for g in GATES for x in ("--fail-if", g)]


def test_inspect_several_checkpoints(here: Path, update_golden: bool) -> None:
    run = here / "run"
    run.mkdir()
    names = [f"encoder_finetune_step_{k:06d}.safetensors" for k in (100, 200, 300)]
    for k, name in enumerate(names):
        sd = golden_state_dict(pointwise=True)
        sd["conv2.weight"] = sd["conv2.weight"] * (1 + k)
        sd[POINTWISE] = sd[POINTWISE] + 0.1 * k
        save_file(sd, str(run / name))
    out = run80(
        "inspect", "run", "--tau-cos", 0.01, "--tau-euc", 1.0, "--fail-if", GATES[0], code=1
    )
    assert_fits(out)
    assert out.startswith("wcond inspect: 3 checkpoints, step 100 → 300\n")
    for name in names:  # whole, on one line each, never split or cut
        assert f" {name} " in out
    # Both tables gave way: the checkpoint table and the per-layer metrics say what they hid.
    assert out.count("hidden at this width:") == 2
    assert f" {POINTWISE} " in out
    fail = lines_with(out, f"FAIL {names[0]}:")
    assert fail == [
        f"FAIL {names[0]}: near_parallel_rows>0:",
        f"  conv1.weight (1), {POINTWISE} (1)",
    ]
    check("cli80_inspect_trend.txt", out, update_golden)


def test_diff(here: Path, update_golden: bool) -> None:
    after = golden_state_dict(pointwise=True)
    after["conv1.weight"] = after["conv1.weight"][[0, 1, 2, 3, 5]].contiguous()
    del after["fc.weight"]
    after["head.weight"] = torch.eye(3)
    torch.save(after, "after.pt")
    out = run80("diff", "golden.pt", "after.pt", "--tau-cos", 0.01, "--tau-euc", 1.0)
    assert_fits(out)
    assert f" {POINTWISE} " in out and "only in A: fc.weight" in out
    assert "hidden at this width: rel " in out
    assert "note A conv2.weight:" in out
    check("cli80_diff.txt", out, update_golden)


def test_init_cs(here: Path, update_golden: bool) -> None:
    out = run80("init-cs", "golden.pt", "-o", "cs.pt", "--iterations", 20, "--seed", 0)
    assert_fits(out)
    # The long name leaves no room for the last column: dropped, and the note says so.
    assert "hidden at this width: norms, dirs, cs_n, |W|, max|Δw|" in out
    assert f" {POINTWISE} " in out
    # The legend explains only the columns shown.
    assert lines_with(out, "CS before and after") == ["CS before and after"]
    check("cli80_init_cs.txt", out, update_golden)


def test_shrink(here: Path, update_golden: bool) -> None:
    out = run80(
        "shrink", "golden.pt", "-o", "small.safetensors", "--tau-cos", 0.01, "--tau-euc", 1.0
    )
    assert_fits(out)
    assert "hidden at this width: max°" in out and f" {POINTWISE} " in out
    assert "max°:" not in out  # nor explained in the legend
    note = lines_with(out, "note fc.weight:")
    assert len(note) > 1  # the protected-ends note, wrapped
    check("cli80_shrink.txt", out, update_golden)


def test_shrink_fold_chain(here: Path, update_golden: bool) -> None:
    torch.save(planted_cbnet().state_dict(), "cb.pt")
    out = run80(
        "shrink", "cb.pt", "--fold", "--chain", "conv1,bn1,conv2,bn2,fc", "-o", "narrow.safetensors"
    )
    assert_fits(out)
    # Each module stays with its first tensor, a line breaks after a "+", no name is split.
    assert lines_with(out, "chain:") == [
        "chain: conv1 = conv1.weight; bn1 = bn1.weight + bn1.bias + bn1.running_mean +",
        "  bn1.running_var; conv2 = conv2.weight + conv2.bias; bn2 = bn2.weight +",
        "  bn2.bias + bn2.running_mean + bn2.running_var; fc = fc.weight + fc.bias",
    ]
    check("cli80_fold_chain.txt", out, update_golden)


# --------------------------------------------------------------------------- the wrapping itself


def _plain(parts: list[str | Text | Keep], width: int) -> list[str]:
    return [line.plain for line in wrap_prose(parts, width)]


def test_prose_wraps_at_spaces_and_indents_what_follows() -> None:
    assert _plain(["one two three four"], 9) == ["one two", "  three", "  four"]
    assert _plain(["one two three four"], 18) == ["one two three four"]
    assert _plain(["one two three four"], 17) == ["one two three", "  four"]


def test_a_name_is_never_split_and_stands_alone_when_too_long() -> None:
    name = "model.encoder.layer 11.attention output.weight"  # spaces inside: still one name
    lines = _plain(["note ", keep_name(name), " all rows are zero"], 30)
    assert lines == ["note", f"  {name}", "  all rows are zero"]


def test_wrapping_keeps_escapes_whole_and_markup_literal() -> None:
    hostile = "a\x1b[2J b [bold]x[/] ::error::c"
    lines = wrap_prose(["x " * 5, keep_name(hostile), " y"], 12)
    shown = [line.plain for line in lines]
    assert "  a\\x1b[2J b [bold]x[/] :\\x3aerror:\\x3ac" in shown
    assert all("\x1b" not in line and not line.lstrip().startswith("::") for line in shown)
    assert all(not line.spans for line in lines)  # no style came from the name's brackets
