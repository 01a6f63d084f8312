"""The Ray engine on a local instance: same numbers and tensors as a local run, failures named by layer.

One Ray instance (2 CPUs, no dashboard) serves the whole module and is shut down at its end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import wcond
from wcond.analyze import _inspect_task
from wcond.cli import app
from wcond.engine import RayEngine, Task, plan_tasks
from wcond.engine import workers as engine_module
from wcond.errors import CheckpointError, EngineError
from wcond.shrink import MANIFEST_KEY

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def split_like_a_large_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split even these tiny checkpoints as a large model would be: conv2 (1152 parameters) alone,
    conv1 and fc (216 and 640) grouped in a task that finishes out of stored order."""
    monkeypatch.setattr(engine_module, "TASK_MIN_PARAMS", 1000)


def assert_close(a: Any, b: Any, rel: float, where: str = "") -> None:
    """Same structure; floats equal to ``rel`` relative."""
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-12), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], rel, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, rel, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_plan_tasks_groups_small_neighbours_and_keeps_large_layers_alone() -> None:
    tasks = plan_tasks(
        "m.pt", [("a", 10), ("b", 60), ("big", 500), ("c", 30), ("d", 80), ("e", 5)], 100
    )
    assert [t.keys for t in tasks] == [("big",), ("a", "b", "c"), ("d", "e")]
    assert sum(t.params for t in tasks) == 685


def test_ray_without_the_extra_exits_2_with_the_install_line(
    pt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    result = run("inspect", pt_file, "--ray")
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == "error: running on Ray needs the ray package: pip install 'wcond[ray]'"
    )


def test_inspect_two_checkpoints_on_ray_matches_the_local_json(
    tmp_path: Path, state_dict: dict, ray_instance: Any, split_like_a_large_model: None
) -> None:
    a = tmp_path / "step_1.pt"
    torch.save(state_dict, a)
    b = tmp_path / "step_2.safetensors"
    save_file(
        {k: (v * 1.5 if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()},
        b,
    )
    args = ("inspect", a, b, "-f", "json", "--device", "cpu", "--fail-if", "near_parallel_rows>0")
    local = run(*args)
    on_ray = run(*args, "--ray")
    assert on_ray.exit_code == local.exit_code == 1, on_ray.output
    doc_local, doc_ray = json.loads(local.stdout), json.loads(on_ray.stdout)
    for doc, engine in ((doc_local, "local"), (doc_ray, "ray")):
        for ck in doc["checkpoints"]:
            assert ck["settings"].pop("engine") == engine and ck["settings"]["device"] == "cpu"
    assert [c["checkpoint"] for c in doc_ray["checkpoints"]] == [str(a), str(b)]
    assert_close(doc_ray, doc_local, rel=1e-6)


def test_diff_on_ray_matches_local(
    tmp_path: Path, state_dict: dict, ray_instance: Any, split_like_a_large_model: None
) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(state_dict, a)
    torch.save({k: v * 2 if v.is_floating_point() else v for k, v in state_dict.items()}, b)
    local = wcond.diff.diff(a, b, device="cpu").to_dict()
    with RayEngine() as eng:
        on_ray = wcond.diff.diff(a, b, device="cpu", engine=eng).to_dict()
    assert ray_instance.is_initialized()  # an instance the engine did not start is left running
    for doc, engine in ((local, "local"), (on_ray, "ray")):
        assert doc["settings"].pop("engine") == engine and doc["settings"]["device"] == "cpu"
    assert_close(on_ray, local, rel=1e-6)


def test_init_cs_on_ray_writes_the_local_runs_tensors(
    tmp_path: Path, pt_file: Path, ray_instance: Any, split_like_a_large_model: None
) -> None:
    common = (pt_file, "--seed", "0", "-n", "30", "--device", "cpu", "--keep-norm", "-f", "json")
    local_out, ray_out = tmp_path / "local.safetensors", tmp_path / "ray.safetensors"
    hist_local, hist_ray = tmp_path / "hl.json", tmp_path / "hr.json"
    local = run("init-cs", *common, "-o", local_out, "--history", hist_local)
    on_ray = run("init-cs", *common, "-o", ray_out, "--history", hist_ray, "--ray")
    assert local.exit_code == on_ray.exit_code == 0, on_ray.output
    a, b = wcond.load_checkpoint(local_out), wcond.load_checkpoint(ray_out)
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
        moved += not torch.equal(a[k], torch.load(pt_file)[k])
    assert moved == 2  # conv1 and conv2 were optimized (the test is not comparing two copies)
    ha, hb = json.loads(hist_local.read_text()), json.loads(hist_ray.read_text())
    for h, engine in ((ha, "local"), (hb, "ray")):
        assert h["settings"].pop("engine") == engine and h["settings"]["device"] == "cpu"
    assert_close(hb, ha, rel=1e-5)


def test_a_failing_task_fails_the_run_naming_its_layer(ray_instance: Any) -> None:
    def analyze(task: Task) -> int:
        if "conv2.weight" in task.keys:
            raise RuntimeError("CUDA out of memory")
        return len(task.keys)

    tasks = plan_tasks("/data/model.pt", [("conv1.weight", 10), ("conv2.weight", 10)], 1)
    with RayEngine() as eng:
        with pytest.raises(
            EngineError, match=r"model.pt: layer 'conv2.weight': RuntimeError: CUDA out of memory"
        ):
            eng.map(analyze, tasks)


def test_a_checkpoint_the_workers_cannot_see_is_a_clear_error(ray_instance: Any) -> None:
    task = Task("/nonexistent/run/model.pt", ("conv1.weight",), 10)
    options = {"tau_cos": 1e-4, "tau_euc": 0.1, "top": 3, "device": "cpu"}
    selection = {"layers": (), "exclude": (), "groups": {}}
    with RayEngine() as eng:
        with pytest.raises(CheckpointError) as err:
            eng.map(_inspect_task, [task], selection, options)
    msg = str(err.value)
    assert (
        "layer 'conv1.weight'" in msg
        and "/nonexistent/run/model.pt: not found on the worker" in msg
    )
    assert "same path on every node" in msg


def test_a_worker_that_dies_is_retried(tmp_path: Path, ray_instance: Any) -> None:
    marker = tmp_path / "died_once"

    def flaky(task: Task) -> str:
        if not marker.exists():
            marker.touch()
            os._exit(1)  # the worker process dies, as on a lost node
        return task.keys[0]

    with RayEngine() as eng:
        assert eng.map(flaky, [Task("m.pt", ("conv1.weight",), 1)]) == ["conv1.weight"]
    assert marker.exists()


def test_shrink_on_ray_writes_the_local_runs_tensors(
    tmp_path: Path, ray_instance: Any, split_like_a_large_model: None
) -> None:
    from safetensors import safe_open

    # Enough planted parallel rows in a wide enough layer that fusing pays for its index and
    # manifest, so shrink really stores a factorized layer (OUT is never larger than IN).
    g = torch.Generator().manual_seed(3)
    sd = {
        "fc1.weight": torch.randn(64, 32, generator=g),
        "fc2.weight": torch.randn(96, 64, generator=g),
        "fc3.weight": torch.randn(10, 96, generator=g),
    }
    sd["fc2.weight"][48:] = sd["fc2.weight"][:48] * 0.5
    pt_file = tmp_path / "planted.pt"
    torch.save(sd, pt_file)
    outs = {name: tmp_path / f"{name}.safetensors" for name in ("local", "ray")}
    docs = {}
    for name, extra in (("local", ()), ("ray", ("--ray",))):
        result = run("shrink", pt_file, "-o", outs[name], "--device", "cpu", "-f", "json", *extra)
        assert result.exit_code == 0, result.output
        docs[name] = json.loads(result.stdout)
        assert docs[name]["settings"].pop("engine") == name
        docs[name].pop("output")
    assert_close(docs["ray"], docs["local"], rel=1e-6)  # every setting but the engine
    assert any(layer["fused_rows"] for layer in docs["ray"]["layers"])  # something was fused
    # The manifest records the format and the writer, not where the work ran: the tensors are
    # the same bit for bit, and so is the whole file.
    with safe_open(outs["local"], "pt") as a, safe_open(outs["ray"], "pt") as b:
        assert list(a.keys()) == list(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
        assert a.metadata() == b.metadata() and MANIFEST_KEY in a.metadata()
    assert outs["ray"].read_bytes() == outs["local"].read_bytes()


def test_fold_refuses_ray(pt_file: Path, tmp_path: Path) -> None:
    result = run("shrink", pt_file, "-o", tmp_path / "f.pt", "--fold", "--chain", "a,b", "--ray")
    assert result.exit_code == 2
    assert "--fold couples the layers of its chain, so it runs in one process" in result.stderr
