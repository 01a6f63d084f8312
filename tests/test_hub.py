"""Hugging Face repo ids read from a Hub cache built here in huggingface_hub's layout; never the network."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import wcond
from wcond import hub
from wcond.checkpoint import hub as hub_module
from wcond.cli import app

MAIN = "a" * 40
V1 = "b" * 40


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)


def _add_file(storage: Path, commit: str, name: str, data: bytes) -> None:
    """A blob named by its hash and a relative symlink to it in the snapshot, as huggingface_hub stores files."""
    blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = storage / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def _st_bytes(tmp: Path, tensors: dict[str, torch.Tensor]) -> bytes:
    f = tmp / "scratch.safetensors"
    save_file(tensors, str(f))
    return f.read_bytes()


def _repo(cache: Path, repo_id: str) -> Path:
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    return storage


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """org/tiny with main and a v1 tag; org/sharded with an index over two shards; org/partial missing a shard."""
    cache = tmp_path / "hub"
    g = torch.Generator().manual_seed(0)
    tiny = _repo(cache, "org/tiny")
    _add_file(
        tiny,
        MAIN,
        "model.safetensors",
        _st_bytes(tmp_path, {"fc.weight": torch.randn(6, 4, generator=g)}),
    )
    _add_file(tiny, MAIN, "config.json", b"{}")
    (tiny / "refs" / "main").write_text(MAIN)
    _add_file(
        tiny,
        V1,
        "model.safetensors",
        _st_bytes(tmp_path, {"old.weight": torch.randn(5, 3, generator=g)}),
    )
    (tiny / "refs" / "v1").write_text(V1)
    for repo, shards in (("org/sharded", 2), ("org/partial", 1)):
        storage = _repo(cache, repo)
        index = {"metadata": {}, "weight_map": {}}
        for i in (1, 2):
            name = f"model-0000{i}-of-00002.safetensors"
            index["weight_map"][f"layer{i}.weight"] = name
            if i <= shards:
                _add_file(
                    storage,
                    MAIN,
                    name,
                    _st_bytes(tmp_path, {f"layer{i}.weight": torch.randn(4, 4, generator=g)}),
                )
        _add_file(storage, MAIN, "model.safetensors.index.json", json.dumps(index).encode())
        (storage / "refs" / "main").write_text(MAIN)
    return cache


def test_parse_repo_id() -> None:
    assert hub.parse_repo_id("org/name") == hub.RepoRef("org/name")
    assert hub.parse_repo_id("org/name@v1.0") == hub.RepoRef("org/name", "v1.0")
    assert hub.parse_repo_id("org/name@refs/pr/3") == hub.RepoRef("org/name", "refs/pr/3")
    for not_a_repo in (
        "model.pt",
        "runs/model.pt",
        "a/b/c",
        "/abs/path",
        "./org/name",
        "org/..",
        "org/n@../x",
        "org/n@",
    ):
        assert hub.parse_repo_id(not_a_repo) is None, not_a_repo


def test_repo_id_from_cache_main_and_revisions(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    report = wcond.inspect("org/tiny")
    assert [r.name for r in report.layers] == ["fc.weight"]
    assert report.checkpoint.endswith(f"models--org--tiny/snapshots/{MAIN}/model.safetensors")
    for rev in ("v1", V1):
        assert [r.name for r in wcond.inspect(f"org/tiny@{rev}").layers] == ["old.weight"]
    assert wcond.load_checkpoint("org/tiny")["fc.weight"].shape == (6, 4)


def test_hf_home_is_honoured(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = cache.parent / "home"
    home.mkdir()
    cache.rename(home / "hub")
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub.cache_dir() == home / "hub"
    assert [r.name for r in wcond.inspect("org/tiny").layers] == ["fc.weight"]


def test_sharded_repo(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ck = wcond.open_checkpoint("org/sharded")
    assert ck.format == "sharded" and ck.keys() == ["layer1.weight", "layer2.weight"]
    assert len(ck.files) == 2


def test_existing_path_wins_over_repo_id(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    local = tmp_path / "work" / "org" / "tiny"
    local.mkdir(parents=True)
    torch.save({"local.weight": torch.randn(3, 3)}, local / "model.pt")
    monkeypatch.chdir(tmp_path / "work")
    assert [r.name for r in wcond.inspect("org/tiny").layers] == ["local.weight"]


def test_cli_not_cached_exits_2_with_one_line(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    result = CliRunner().invoke(app, ["inspect", "org/absent"])
    assert result.exit_code == 2
    assert result.output == (
        f"error: org/absent: no such file or directory, and not in the Hugging Face cache ({cache}); "
        "fetch its weight files with --download\n"
    )
    with pytest.raises(
        wcond.CheckpointError,
        match=r"not in the Hugging Face cache .*; fetch its weight files with download=True$",
    ):
        wcond.inspect("org/absent")
    result = CliRunner().invoke(app, ["inspect", "org/tiny@v2"])
    assert (
        result.exit_code == 2
        and "org/tiny@v2: no such file or directory, and not in" in result.output
    )


def test_cli_reads_repo_id_and_partial_repo_says_what_is_missing(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    result = CliRunner().invoke(app, ["inspect", "org/sharded", "-f", "csv"])
    assert result.exit_code == 0, result.output
    assert "layer1.weight" in result.output and "layer2.weight" in result.output
    result = CliRunner().invoke(app, ["diff", "org/tiny", "org/partial"])
    assert result.exit_code == 2
    assert (
        "org/partial: no such file or directory, and shard 'model-00002-of-00002.safetensors' missing from"
        in result.output
    )


def test_weight_files_prefers_safetensors() -> None:
    files = [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "training_args.bin",
        "onnx/model.safetensors",
    ]
    assert hub.weight_files(files) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert hub.weight_files(["pytorch_model.bin", "training_args.bin", "config.json"]) == [
        "pytorch_model.bin"
    ]
    assert hub.weight_files(
        [
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json",
        ]
    ) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
    ]
    assert hub.weight_files(["README.md"]) == []


def test_download_fetches_only_weight_files(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--download goes through huggingface_hub; here its two calls are replaced by a fake Hub that fills the cache."""
    hf = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    data = _st_bytes(tmp_path, {"new.weight": torch.randn(4, 2)})
    calls: list[dict] = []

    def list_repo_files(self: object, repo_id: str, revision: str | None = None) -> list[str]:
        return ["config.json", "model.safetensors", "pytorch_model.bin"]

    def snapshot_download(
        repo_id: str, *, revision: str | None, allow_patterns: list[str], cache_dir: Path
    ) -> str:
        calls.append(
            {
                "repo_id": repo_id,
                "revision": revision,
                "allow_patterns": allow_patterns,
                "cache_dir": cache_dir,
            }
        )
        storage = _repo(Path(cache_dir), repo_id)
        _add_file(storage, MAIN, "model.safetensors", data)
        (storage / "refs" / "main").write_text(MAIN)
        return str(storage / "snapshots" / MAIN)

    monkeypatch.setattr(hf.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub_module.socket, "create_connection", lambda *a, **k: io.BytesIO())
    result = CliRunner().invoke(app, ["inspect", "org/fresh", "-f", "csv"])
    assert result.exit_code == 2 and not calls
    result = CliRunner().invoke(app, ["inspect", "org/fresh", "--download", "-f", "csv"])
    assert result.exit_code == 0, result.output
    assert "new.weight" in result.output
    assert calls == [
        {
            "repo_id": "org/fresh",
            "revision": None,
            "allow_patterns": ["model.safetensors"],
            "cache_dir": cache,
        }
    ]
    # Now cached: no download needed, and the CLI's --download did not leak into the library.
    assert [r.name for r in wcond.inspect("org/fresh").layers] == ["new.weight"]
    with pytest.raises(wcond.CheckpointError, match="org/other: no such file"):
        wcond.inspect("org/other")


def test_download_without_huggingface_hub_says_how_to_install(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(wcond.UsageError, match=r"pip install 'wcond\[hub\]'"):
        hub.resolve("org/absent", download=True)
    # Reading what is cached needs no huggingface_hub.
    assert hub.resolve("org/tiny").name == "model.safetensors"


def test_snapshot_links_may_reach_the_blob_store_only(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards in a snapshot link into the repo's blobs by design; a link anywhere else is still refused."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert hub.in_blob_store(
        cache / "models--org--sharded" / "snapshots" / MAIN,
        next((cache / "models--org--sharded" / "blobs").iterdir()).resolve(),
    )
    link = cache / "models--org--sharded" / "snapshots" / MAIN / "model-00002-of-00002.safetensors"
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(link.read_bytes())
    link.unlink()
    link.symlink_to(elsewhere)
    with pytest.raises(wcond.CheckpointError, match="is outside the index's directory"):
        wcond.open_checkpoint("org/sharded")


def test_download_without_a_network_is_one_line_at_once(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No retries for half a minute: the endpoint is tried once, with a bounded wait."""
    hf = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    waits: list[float] = []

    def no_route(address: tuple[str, int], timeout: float) -> None:
        waits.append(timeout)
        raise OSError(-2, "Name or service not known")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Hub client was called without a network")

    monkeypatch.setattr(hub_module.socket, "create_connection", no_route)
    monkeypatch.setattr(hf.HfApi, "list_repo_files", never)
    result = CliRunner().invoke(app, ["inspect", "org/fresh", "--download"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: org/fresh: download failed: cannot reach https://huggingface.co "
        "(Name or service not known)"
    ]
    assert waits == [hub_module.CONNECT_TIMEOUT]


def test_the_hub_clients_retries_and_warnings_stay_off_the_terminal(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    def flaky(self: object, repo_id: str, revision: str | None = None) -> list[str]:
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        warnings.warn("a client warning", UserWarning, stacklevel=1)
        raise ConnectionError("Max retries exceeded\nwith url: /api/models/org/fresh")

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.seen.append(record.getMessage())

    records = Records()
    logger = logging.getLogger("huggingface_hub")
    logger.addHandler(records)
    monkeypatch.setattr(hub_module.socket, "create_connection", lambda *a, **k: io.BytesIO())
    monkeypatch.setattr(hf.HfApi, "list_repo_files", flaky)
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            result = CliRunner().invoke(app, ["inspect", "org/fresh", "--download"])
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines() == [
            "error: org/fresh: download failed: Max retries exceeded"
        ]
        assert records.seen == [] and not [w for w in shown if "client warning" in str(w.message)]
        monkeypatch.setenv("WCOND_DEBUG", "1")  # shows them, and the traceback
        with (
            pytest.raises(wcond.CheckpointError),
            pytest.warns(UserWarning, match="client warning"),
        ):
            hub.resolve("org/fresh", download=True)
        assert records.seen == ["Retrying in 1s [Retry 1/5]."]
    finally:
        logger.removeHandler(records)
