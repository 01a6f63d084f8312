"""Hostile tensor names cannot act on the output: every renderer, checked by parsing what it writes.

The names carry what an attacker would put in a checkpoint: terminal escape sequences, BEL, NUL,
CR/LF followed by a GitHub Actions workflow command, rich markup, spreadsheet formulas, HTML, and
characters XML 1.0 cannot hold. The file name itself is hostile too.
"""

from __future__ import annotations

import csv
import html.parser
import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

from wcond.analyze import Report, inspect
from wcond.cli import app
from wcond.diff import diff
from wcond.render.diff import diff_to_markdown, render_diff_table
from wcond.render.html import to_html
from wcond.render.json import to_json
from wcond.render.junit import to_junit
from wcond.render.report import render_table, to_csv, to_markdown
from wcond.text import csv_cell, md_code, one_line, visible, xml_text

runner = CliRunner()

HOSTILE = [
    "\x1b[31mred\x1b[0m\x1b]0;title\x07.weight",
    "bel\x07nul\x00.weight",
    "cr\rlf\n::error::forged.weight",
    "::error file=x::forged",
    "[bold]x[/].weight",
    "[link=http://x]y[/link].weight",
    "=cmd|' /C calc'!A0",
    "+1",
    "@SUM(A1)",
    "-2+3",
    "<script>alert(1)</script>.weight",
    "a&b\"'.weight",
    "xml\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x1f.weight",
    "rtl\u202egnp.exe.weight",
    "tab\tbs\x08del\x7f.weight",
    "c1\x85\x9b.weight",
    "ls\u2028ps\u2029.weight",
    "pipe|tick`s``.weight",
]
DEAD = HOSTILE[0]  # gets an all-zero row, so a note is printed beside a hostile name


def hostile_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {name: torch.randn(4, 3, 3, 3, generator=g) for name in HOSTILE}
    sd[DEAD][1] = 0.0
    return sd


@pytest.fixture
def hostile_file(tmp_path: Path) -> Path:
    # The file name is the attacker's too: a newline and a workflow command in it.
    path = tmp_path / "ck\x1b[2J\n::warning::path.safetensors"
    save_file(hostile_state_dict(), str(path), metadata={"note": "\x1b]0;pwned\x07"})
    return path


def hostile_report(path: Path) -> Report:
    report = inspect(path, fail_if=["acv_mean>0", "conv_similarity_norm>0"])
    # A note that quotes a name, as loaders' notes do.
    report.layers[0].notes.append(f"quoting {HOSTILE[2]!s} and [bold]{HOSTILE[4]}")
    return report


def assert_inert(text: str) -> None:
    """No raw control/format character but newline; no line a CI runner would read as a command."""
    bad = sorted({hex(ord(c)) for c in text if c != "\n" and not (c.isprintable() or c == " ")})
    assert not bad, f"raw control characters reached the output: {bad}"
    commands = [line for line in text.split("\n") if line.lstrip().startswith("::")]
    assert not commands, f"lines that are workflow commands: {commands}"


# --- the escaping functions ------------------------------------------------------------------


def test_visible_escapes_every_non_printable_character() -> None:
    assert visible("a\x1b[2Jb\x07\x00\r\n\t\x7f\x85\u2028\u202e\udcff") == (
        "a\\x1b[2Jb\\x07\\x00\\r\\n\\t\\x7f\\x85\\u2028\\u202e\\udcff"
    )
    assert visible("layer1.0.conv1.weight ü 中") == "layer1.0.conv1.weight ü 中"
    assert one_line("::error::x") == ":\\x3aerror:\\x3ax"
    assert "::" not in one_line(":::::")


def test_csv_cell_neutralises_formulas_but_keeps_numbers() -> None:
    assert [csv_cell(s) for s in ("=1+1", "+1", "-1", "@A1", "\tx", "ok", "a=b")] == [
        "'=1+1",
        "'+1",
        "'-1",
        "'@A1",
        "\\tx",  # the tab is escaped first: a cell starting with a backslash is no formula
        "ok",
        "a=b",
    ]
    assert csv_cell(-0.5) == -0.5 and csv_cell(-3) == -3


def test_md_code_fences_longer_than_any_backtick_run() -> None:
    assert md_code("a`b``c") == "```a`b``c```"
    assert md_code("`x") == "`` `x ``"


def test_xml_text_is_valid_xml_for_every_code_point_below_0x110() -> None:
    s = "".join(map(chr, range(0x110))) + "\ufffe\uffff\ud800"
    element = ET.Element("t", a=xml_text(s))
    element.text = xml_text(s)
    ET.fromstring(ET.tostring(element))  # parses


# --- every inspect format, through the CLI, on a hostile file --------------------------------


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "html", "junit", "json"])
def test_cli_output_is_inert(hostile_file: Path, fmt: str) -> None:
    result = runner.invoke(
        app,
        ["inspect", str(hostile_file), "-f", fmt, "--fail-if", "acv_mean>0"],
        env={"COLUMNS": "250"},  # wide enough that no name is elided
    )
    assert result.exit_code == 1, result.stdout + result.stderr  # the gate trips on every layer
    assert_inert(result.stdout)
    assert_inert(result.stderr)
    if fmt == "table":
        for name in HOSTILE:  # every name shown whole, escaped, markup literal
            assert f" {one_line(name)} " in result.stdout
        assert "[bold]x[/].weight" in result.stdout
        assert "\\x1b[31mred" in result.stdout


def test_table_summary_gates_and_notes(hostile_file: Path) -> None:
    console = Console(record=True, width=100, file=io.StringIO(), color_system=None)
    render_table(hostile_report(hostile_file), console)
    text = console.export_text()
    assert_inert(text)
    assert "[bold]x[/].weight" in text  # markup printed literally in the FAIL/worst lines
    assert "[link=http://x]y[/link].weight" in text
    # The note is wrapped at 100 columns: its continuation lines joined back, it reads whole.
    whole = re.sub(r"\n  (?=\S)", " ", text)
    assert "quoting cr\\rlf\\n:\\x3aerror:\\x3aforged.weight and [bold][bold]x[/].weight" in whole
    assert "note \\x1b[31mred" in text


def test_markdown_table_rows_keep_their_cells(hostile_file: Path) -> None:
    text = to_markdown(hostile_report(hostile_file))
    assert_inert(text)
    rows = [line for line in text.split("\n") if line.startswith("| ") or line.startswith("|---")]
    width = len(re.split(r"(?<!\\)\|", rows[0]))
    assert len(rows) == 2 + len(HOSTILE)
    assert all(len(re.split(r"(?<!\\)\|", row)) == width for row in rows)
    assert "| ```pipe\\|tick`s``.weight``` |" in text
    assert "<script>" not in text.replace("`<script>alert(1)</script>.weight`", "")


def test_csv_parses_with_formulas_neutralised_and_numbers_numeric(hostile_file: Path) -> None:
    text = to_csv(hostile_report(hostile_file))
    assert_inert(text)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sorted(r["name"] for r in rows) == sorted(csv_cell(n) for n in HOSTILE)
    for r in rows:
        for cell in r.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
        float(r["acv_mean"]), int(r["params"])  # numeric cells stay numbers
    names = {r["name"] for r in rows}
    assert {"'=cmd|' /C calc'!A0", "'+1", "'@SUM(A1)", "'-2+3"} <= names


def test_junit_is_valid_xml_for_any_name(hostile_file: Path) -> None:
    text = to_junit(hostile_report(hostile_file))
    assert_inert(text)
    root = ET.fromstring(text.encode("utf-8"))
    cases = root.iter("testcase")
    assert {c.get("classname") for c in cases} == {visible(n) for n in HOSTILE}
    failures = [f.get("message") for f in root.iter("failure")]
    assert len(failures) == 2 * len(HOSTILE)
    assert visible(str(hostile_file)) in root.find("testsuite").get("name")  # type: ignore[union-attr]


class _Collect(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.first_cells: list[str] = []
        self._row_cell = -1
        self._in_layers = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "table" and ("id", "layers") in attrs:
            self._in_layers = True
        if self._in_layers and tag == "tr":
            self._row_cell = 0
        elif self._in_layers and tag == "td":
            self._row_cell += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_layers = False

    def handle_data(self, data: str) -> None:
        if self._in_layers and self._row_cell == 1:
            self.first_cells.append(data)
            self._row_cell = 2


def test_html_escapes_everything(hostile_file: Path) -> None:
    text = to_html(hostile_report(hostile_file), heatmaps=0)
    assert_inert(text)
    parser = _Collect()
    parser.feed(text)
    assert parser.tags.count("script") == 1  # ours, the table sorter; none from a name
    assert "a" not in parser.tags  # [link=...] made no link
    assert sorted(parser.first_cells) == sorted(visible(n) for n in HOSTILE)


def test_json_keeps_exact_names(hostile_file: Path) -> None:
    text = to_json(hostile_report(hostile_file))
    assert_inert(text)
    doc = json.loads(text)
    assert sorted(layer["name"] for layer in doc["layers"]) == sorted(HOSTILE)
    assert doc["checkpoint"] == str(hostile_file)


# --- diff, init-cs, shrink, errors, progress -------------------------------------------------


def test_diff_renderers(hostile_file: Path, tmp_path: Path) -> None:
    sd = hostile_state_dict()
    sd["only\x1b[2J::error::b"] = sd.pop(HOSTILE[1])
    sd[HOSTILE[2]] = torch.randn(5, 3, 3, 3)  # a shape change
    other = tmp_path / "b.safetensors"
    save_file(sd, str(other))
    d = diff(hostile_file, other)
    console = Console(record=True, width=90, file=io.StringIO(), color_system=None)
    render_diff_table(d, console)
    table = console.export_text()
    markdown = diff_to_markdown(d)
    for text in (table, markdown):
        assert_inert(text)
    assert "[bold]x[/].weight" in table
    rows = [line for line in markdown.split("\n") if line.startswith("| `")]
    assert all(len(re.split(r"(?<!\\)\|", row)) == 8 for row in rows)
    doc = json.loads(to_json(d))
    assert doc["only_a"] == [HOSTILE[1]] and doc["only_b"] == ["only\x1b[2J::error::b"]


def test_init_cs_and_shrink_tables(hostile_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cs.safetensors"
    wide = {"COLUMNS": "200"}  # no folding, so that whole names can be looked for
    result = runner.invoke(
        app, ["init-cs", str(hostile_file), "-o", str(out), "-n", "1", "--device", "cpu"], env=wide
    )
    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout + result.stderr)
    assert "[bold]x[/].weight" in result.stdout
    result = runner.invoke(app, ["shrink", str(hostile_file), "--dry-run"], env=wide)
    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout + result.stderr)
    assert "[link=http://x]y[/link]" in result.stdout


def test_error_messages_quoting_a_key_are_one_inert_line(
    hostile_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wcond.errors import CheckpointError

    def fail(*args: object, **kwargs: object) -> None:
        raise CheckpointError(f"{hostile_file}: tensor {HOSTILE[2]} [/] is corrupt")

    monkeypatch.setattr("wcond.analyze.inspect", fail)  # imported by the command when it runs
    result = runner.invoke(app, ["inspect", str(hostile_file)])
    assert result.exit_code == 2
    assert_inert(result.stderr)
    assert result.stderr.count("\n") == 1
    assert "cr\\rlf\\n:\\x3aerror:\\x3aforged.weight [/] is corrupt" in result.stderr


def test_progress_display_shows_keys_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.progress import Progress

    from wcond.cli import common

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    class Eager(Progress):  # draw at every update, not on the refresh thread's clock
        def update(self, *args: object, **kwargs: object) -> None:
            super().update(*args, **kwargs)  # type: ignore[arg-type]
            self.refresh()

    console = Console(record=True, file=io.StringIO(), force_terminal=True, width=300)
    monkeypatch.setattr(common.sys, "stderr", Terminal())
    monkeypatch.setattr(common, "stderr", console)
    monkeypatch.setattr(common, "Progress", Eager)
    with common.progress_bar("inspecting") as update:
        for name in HOSTILE:  # a bare "[/]" would be a MarkupError if read as markup
            update(1, 2, name)
    drawn = console.export_text()
    assert "[bold]x[/].weight" in drawn and "[link=http://x]y[/link].weight" in drawn
    assert all(one_line(name)[-40:] in drawn for name in HOSTILE)  # the key's last 40 characters
    assert "\x1b[31m" not in drawn and "\x07" not in drawn


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "json"])
def test_trend_of_several_hostile_checkpoints(hostile_file: Path, tmp_path: Path, fmt: str) -> None:
    second = tmp_path / "=step\x1b[2J::error::2.safetensors"
    second.write_bytes(hostile_file.read_bytes())
    result = runner.invoke(
        app,
        ["inspect", str(hostile_file), str(second), "-f", fmt, "--fail-if", "acv_mean>0"],
        env={"COLUMNS": "250"},
    )
    assert result.exit_code == 1, result.stdout + result.stderr
    assert_inert(result.stdout)
    assert_inert(result.stderr)
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert {r["layer"] for r in rows} == {csv_cell(n) for n in HOSTILE}
        assert all(not r["checkpoint"].startswith(("=", "+", "-", "@")) for r in rows)
    if fmt == "json":
        doc = json.loads(result.stdout)
        assert set(doc["trend"]) == set(HOSTILE)
    if fmt == "markdown":
        rows = [line for line in result.stdout.split("\n") if line.startswith("| `")]
        widths = {len(re.split(r"(?<!\\)\|", row)) for row in rows}
        assert len(widths) == 2  # the checkpoint table and the layer table, each row whole


def test_readme_safety_example_is_real(tmp_path: Path) -> None:
    """docs/SAFETY.md (the README's Safety section before) shows what wcond prints for this file."""
    page = Path(__file__).resolve().parent.parent / "docs" / "SAFETY.md"
    readme = page.read_text(encoding="utf-8")
    block = re.search(r"```console\n(\$ wcond inspect evil\.safetensors.*?)```", readme, re.S)
    assert block is not None
    lines = block.group(1).strip("\n").split("\n")
    path = tmp_path / "evil.safetensors"
    names = ["conv1.weight\x1b[2J", "x\n::error::forged", '=HYPERLINK("http://x")']
    shapes = [(8, 3, 3, 3), (8, 8, 3, 3), (4, 8)]
    save_file({n: torch.randn(*s) for n, s in zip(names, shapes)}, str(path))
    csv_out = runner.invoke(app, ["inspect", str(path), "-f", "csv"]).stdout
    json_out = runner.invoke(app, ["inspect", str(path), "-f", "json"]).stdout
    shown_csv = [",".join(line.split(",")[:3]) for line in csv_out.strip("\n").split("\n")]
    shown_json = json.dumps([layer["name"] for layer in json.loads(json_out)["layers"]])
    assert lines == [
        "$ wcond inspect evil.safetensors -f csv | cut -d, -f1-3",
        *shown_csv,
        "$ wcond inspect evil.safetensors -f json | jq -c '[.layers[].name]'",
        shown_json.replace(", ", ","),
    ]


def test_plot_labels_are_literal_text(tmp_path: Path) -> None:
    """A name holding matplotlib mathtext ($...$) or control characters is drawn as plain text."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.safetensors"
    name = "w$\\frac{$\x1b[2J.weight"  # unbalanced mathtext: a ValueError if parsed
    save_file({name: torch.randn(8, 4), "b$x$.weight": torch.randn(6, 4)}, str(path))
    for extra in (["--layer", name], []):
        out = tmp_path / f"plot{len(extra)}.png"
        result = runner.invoke(app, ["plot", str(path), "-o", str(out), *extra])
        assert result.exit_code == 0, result.stderr
        assert out.read_bytes().startswith(b"\x89PNG")
