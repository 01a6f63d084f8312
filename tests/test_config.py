"""Project config: discovery upward, --config, precedence (defaults < file < flags), and every bad-file path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wcond.cli import app
from wcond.config import find_config, load_config
from wcond.errors import UsageError

runner = CliRunner()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def inspect_json(*args: object) -> tuple[dict, str]:
    result = runner.invoke(app, ["inspect", *map(str, args), "--format", "json"])
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout), result.stderr


def test_found_walking_up_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(
        tmp_path / "repo" / "pyproject.toml",
        "[project]\nname = 'x'\n[tool.wcond]\ntau-cos = 0.01\n",
    )
    deep = tmp_path / "repo" / "src" / "pkg"
    deep.mkdir(parents=True)
    assert find_config(deep) == cfg
    monkeypatch.chdir(deep)
    assert load_config().values == {"tau_cos": 0.01}


def test_pyproject_without_a_wcond_table_is_passed_over(tmp_path: Path) -> None:
    outer = write(tmp_path / "pyproject.toml", "[tool.wcond]\ntop = 1\n")
    write(tmp_path / "inner" / "pyproject.toml", "[tool.ruff]\nline-length = 100\n")
    assert find_config(tmp_path / "inner") == outer


def test_wcond_toml_wins_in_its_directory(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[tool.wcond]\ntop = 1\n")
    own = write(tmp_path / "wcond.toml", "top = 2\n")
    assert find_config(tmp_path) == own and load_config(start=tmp_path).values == {"top": 2}


def test_no_config_anywhere(tmp_path: Path) -> None:
    # tmp_path's parents hold no wcond config on a test machine; assert it rather than assume it.
    if find_config(tmp_path) is not None:
        pytest.skip("a wcond config above the temporary directory")
    assert load_config(start=tmp_path).path is None and load_config(start=tmp_path).values == {}


def test_all_keys_read(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "wcond.toml",
        """
tau-cos = 0.001
tau-euc = 0.5
top = 5
layers = ["conv*"]
exclude = ["*.bias"]
groups = { "conv2.weight" = 2 }
fail-if = ["acv_mean>0.5", "near_parallel_rows>0"]
format = "markdown"
device = "cpu"
""",
    )
    assert load_config(cfg).values == {
        "tau_cos": 0.001,
        "tau_euc": 0.5,
        "top": 5,
        "layers": ["conv*"],
        "exclude": ["*.bias"],
        "groups": {"conv2.weight": 2},
        "fail_if": ["acv_mean>0.5", "near_parallel_rows>0"],
        "format": "markdown",
        "device": "cpu",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tool.wcond]\nbogus = 1\n", "unknown key 'bogus'"),
        ("[tool.wcond]\ntau_cos = 1\n", "unknown key 'tau_cos' (did you mean 'tau-cos'?)"),
        ("[tool.wcond]\ntau-cos = 'small'\n", "tau-cos = 'small': expected number"),
        ("[tool.wcond]\ntop = -1\n", "top = -1: expected integer"),
        ("[tool.wcond]\nlayers = 'conv*'\n", "layers = 'conv*': expected list of glob strings"),
        (
            "[tool.wcond]\ngroups = { a = 0 }\n",
            "groups = {'a': 0}: expected table of glob = integer",
        ),
        ("[tool.wcond]\nformat = 'pdf'\n", "format = 'pdf': expected one of table"),
        (
            "[tool.wcond]\nfail-if = ['acv_mean>>1']\n",
            "fail-if: 'acv_mean>>1': expected METRIC OP NUMBER",
        ),
        ("[tool.wcond]\nfail-if = ['accuracy>1']\n", "unknown metric 'accuracy'"),
        ("[tool.wcond\n", "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    cfg = write(tmp_path / "pyproject.toml", text)
    with pytest.raises(UsageError) as e:
        load_config(cfg)
    assert str(cfg) in str(e.value) and message in str(e.value)


def test_bad_config_is_exit_2_with_one_line(
    tmp_path: Path, pt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "pyproject.toml", "[tool.wcond]\nbogus = 1\n")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["inspect", str(pt_file)])
    assert result.exit_code == 2
    assert (
        f"error: {tmp_path / 'pyproject.toml'}: [tool.wcond]: unknown key 'bogus'" in result.stderr
    )  # brackets survive rich


def test_named_file_must_exist_and_hold_the_table(tmp_path: Path, pt_file: Path) -> None:
    result = runner.invoke(app, ["inspect", str(pt_file), "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "nope.toml: no such file" in result.stderr
    write(tmp_path / "pyproject.toml", "[project]\nname = 'x'\n")
    result = runner.invoke(
        app, ["inspect", str(pt_file), "--config", str(tmp_path / "pyproject.toml")]
    )
    assert result.exit_code == 2 and "has no [tool.wcond] table" in result.stderr


def test_precedence_defaults_then_file_then_flags(
    tmp_path: Path, pt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    base, _ = inspect_json(pt_file)
    assert (
        base["settings"]["tau_cos"] == 1e-4
        and base["gates"] == []
        and base["settings"]["config"] is None
    )

    cfg = write(
        tmp_path / "pyproject.toml",
        """[tool.wcond]
tau-cos = 0.02
tau-euc = 3.0
top = 1
exclude = ["fc.*"]
fail-if = ["acv_mean>100"]
""",
    )
    doc, err = inspect_json(pt_file)
    assert f"config: {cfg}" in err
    s = doc["settings"]
    assert (s["tau_cos"], s["tau_euc"], s["top"], s["exclude"], s["config"]) == (
        0.02,
        3.0,
        1,
        ["fc.*"],
        str(cfg),
    )
    assert [g["expr"] for g in doc["gates"]] == ["acv_mean>100"]
    assert [layer["name"] for layer in doc["layers"]] == ["conv1.weight", "conv2.weight"]
    assert all(len(layer["closest_rows"]) <= 1 for layer in doc["layers"])

    # Flags override the file, keys not given on the command line still come from it.
    doc, _ = inspect_json(
        pt_file, "--tau-cos", "0.5", "--exclude", "conv1.*", "--fail-if", "acv_mean>0"
    )
    s = doc["settings"]
    assert (s["tau_cos"], s["tau_euc"], s["exclude"]) == (0.5, 3.0, ["conv1.*"])
    assert [g["expr"] for g in doc["gates"]] == ["acv_mean>0"]
    assert [layer["name"] for layer in doc["layers"]] == ["conv2.weight", "fc.weight"]


def test_config_gates_set_the_exit_code(tmp_path: Path, pt_file: Path) -> None:
    cfg = write(tmp_path / "wcond.toml", 'fail-if = ["near_parallel_rows>0"]\n')
    result = runner.invoke(app, ["inspect", str(pt_file), "--config", str(cfg)])
    assert result.exit_code == 1 and "FAIL near_parallel_rows>0: conv2.weight" in result.stdout


def test_config_format_is_a_default_below_flag_and_extension(tmp_path: Path, pt_file: Path) -> None:
    cfg = write(tmp_path / "wcond.toml", 'format = "csv"\n')
    result = runner.invoke(app, ["inspect", str(pt_file), "--config", str(cfg)])
    assert result.exit_code == 0 and result.stdout.startswith("name,kind,shape")
    result = runner.invoke(
        app, ["inspect", str(pt_file), "--config", str(cfg), "-o", str(tmp_path / "r.md")]
    )
    assert result.exit_code == 0 and (tmp_path / "r.md").read_text().startswith("## wcond inspect")
    result = runner.invoke(app, ["inspect", str(pt_file), "--config", str(cfg), "-f", "json"])
    assert json.loads(result.stdout)["layers"]


def test_config_applies_to_diff(tmp_path: Path, pt_file: Path) -> None:
    cfg = write(tmp_path / "wcond.toml", 'layers = ["conv2.*"]\ntau-cos = 0.03\n')
    result = runner.invoke(
        app, ["diff", str(pt_file), str(pt_file), "--config", str(cfg), "-f", "json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [layer["name"] for layer in doc["layers"]] == ["conv2.weight"]
    assert doc["settings"]["tau_cos"] == 0.03 and doc["settings"]["config"] == str(cfg)


README_TABLE = (
    '[tool.wcond]\ntau-cos = 1e-4\nexclude = ["fc.*"]\nfail-if = ["near_parallel_rows>0"]\n'
)
WANT = {"tau_cos": 1e-4, "exclude": ["fc.*"], "fail_if": ["near_parallel_rows>0"]}


@pytest.mark.parametrize("name", ["wcond.toml", "ci-policy.toml"])
def test_the_readme_table_works_in_any_config_file(tmp_path: Path, name: str) -> None:
    """[tool.wcond], as the README shows it, in a wcond.toml or a file named by --config."""
    cfg = write(tmp_path / name, README_TABLE)
    assert load_config(cfg).values == WANT
    if name == "wcond.toml":
        assert find_config(tmp_path) == cfg and load_config(start=tmp_path).values == WANT


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "top = 3\n" + README_TABLE,
            "holds both [tool.wcond] and top-level keys (top); use one form",
        ),
        ("[tool.ruff]\nline-length = 9\n", "has a [tool] table but no [tool.wcond]"),
        (
            "[tool.wcond]\ntau_cos = 1\n",
            "[tool.wcond]: unknown key 'tau_cos' (did you mean 'tau-cos'?)",
        ),
    ],
)
def test_a_config_file_says_which_form_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    cfg = write(tmp_path / "wcond.toml", text)
    with pytest.raises(UsageError) as e:
        load_config(cfg)
    assert str(e.value).startswith(f"{cfg}: ") and message in str(e.value)


def test_discovery_stops_at_the_repository_root(tmp_path: Path) -> None:
    """A stray wcond.toml above a clone never sets the clone's gates."""
    write(tmp_path / "wcond.toml", 'fail-if = ["acv_mean>0"]\n')
    repo = tmp_path / "clone"
    (repo / ".git").mkdir(parents=True)
    (repo / "src").mkdir()
    assert find_config(repo / "src") is None
    inside = write(repo / "wcond.toml", "top = 2\n")
    assert find_config(repo / "src") == inside
    worktree = tmp_path / "worktree"  # a linked worktree or submodule: .git is a file
    write(worktree / ".git", "gitdir: /elsewhere\n")
    assert find_config(worktree) is None
