"""Hostile and mutated config files (wcond.toml, pyproject.toml, --config): a report, or one line
and exit 2 naming the file; never a traceback, an internal error or a hang."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from wcond.cli import app

runner = CliRunner()

VALID = b"""[tool.wcond]
tau-cos = 1e-4
tau-euc = 0.1
top = 3
layers = ["*.weight"]
exclude = ["fc*"]
groups = { "conv.weight" = 1 }
fail-if = ["acv_mean>2"]
format = "json"
device = "cpu"
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    torch.manual_seed(0)
    save_file({"conv.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(5, 4)}, str(path))
    return path


def check(model: Path, config: Path) -> None:
    result = runner.invoke(app, ["inspect", str(model), "--config", str(config)])
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        # "config: FILE" says which config was read; then the one error line
        lines = [x for x in result.stderr.strip().splitlines() if not x.startswith("config: ")]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "internal error" not in lines[0], lines[0]
        assert lines[0].startswith("error: "), lines[0]


@pytest.mark.parametrize(
    "content",
    [
        b"a = " + b"[" * 5000 + b"]" * 5000,
        b"\xff\xfe[tool.wcond]",
        b"[tool.wcond]\ntop = 1e999\n",
        b"[tool.wcond]\ntau-cos = nan\n",
        b"[tool.wcond]\ngroups = { a = 0 }\n",
        b'[tool.wcond]\nfail-if = ["acv_mean>"]\n',
        b'[tool.wcond]\nlayers = "conv"\n',
        b"tool = 3\ntop = 1\n",
        b"[tool]\nwcond = 3\n",
        b'[tool.wcond]\n"\\u001b[31m" = 1\n',
        b"x = " + b"{a = " * 300 + b"1" + b"}" * 300,
        b"",
        b"\x00" * 64,
    ],
    ids=[
        "deep-array",
        "not-utf8",
        "huge-int",
        "nan",
        "zero-groups",
        "bad-gate",
        "string-not-list",
        "tool-not-table",
        "wcond-not-table",
        "escape-key",
        "deep-inline-tables",
        "empty",
        "nul-bytes",
    ],
)
def test_hostile_config_files(model: Path, tmp_path: Path, content: bytes) -> None:
    config = tmp_path / "wcond.toml"
    config.write_bytes(content)
    check(model, config)


def test_an_oversized_config_is_refused_without_reading_it(model: Path, tmp_path: Path) -> None:
    config = tmp_path / "wcond.toml"
    with open(config, "wb") as f:
        f.write(b"# " + b"x" * 100)
        f.truncate(20_000_000)  # sparse: no disk cost
    result = runner.invoke(app, ["inspect", str(model), "--config", str(config)])
    assert result.exit_code == 2 and "larger than 10,000,000 bytes" in result.stderr


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=0, max_size=3)),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_config_files(model: Path, tmp_path: Path, edits: list[tuple[int, bytes]]) -> None:
    data = bytearray(VALID)
    for at, replacement in edits:
        data[at : at + 1] = replacement
    config = tmp_path / "mutated.toml"
    config.write_bytes(bytes(data))
    check(model, config)
