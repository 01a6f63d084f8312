"""`inspect --format junit`: valid XML with one testcase per (layer, gate), failures carrying the value."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import torch
from typer.testing import CliRunner

from wcond.analyze import inspect
from wcond.cli import app
from wcond.render.junit import to_junit, trend_to_junit
from wcond.trend import TrendReport

runner = CliRunner()


def parse(text: str) -> ET.Element:
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(text.encode("utf-8"))
    assert root.tag == "testsuites"
    return root


def test_one_testcase_per_layer_and_gate(state_dict: dict) -> None:
    report = inspect(
        state_dict, fail_if=["near_parallel_rows>0", "conv_similarity_norm>0", "acv_mean>100"]
    )
    root = parse(to_junit(report))
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        (layer, gate)
        for layer in ("conv1.weight", "conv2.weight", "fc.weight")
        for gate in ("near_parallel_rows>0", "conv_similarity_norm>0", "acv_mean>100")
    ]
    failed = {
        (c.get("classname"), c.get("name")): c.find("failure")
        for c in cases
        if c.find("failure") is not None
    }
    want = {(v.layer, g.expr) for g in report.gates for v in g.violations}
    assert (
        set(failed)
        == want
        == {
            ("conv2.weight", "near_parallel_rows>0"),
            ("conv1.weight", "conv_similarity_norm>0"),
            ("conv2.weight", "conv_similarity_norm>0"),
        }
    )
    f = failed[("conv1.weight", "conv_similarity_norm>0")]
    cs = report.layers[0].conv_similarity_norm
    assert f.get("message") == f"conv_similarity_norm = {cs:.4g} trips conv_similarity_norm>0"
    assert f.text == f"conv1.weight: conv_similarity_norm = {cs!r}, gate conv_similarity_norm>0"
    assert (
        failed[("conv2.weight", "near_parallel_rows>0")].get("message")
        == "near_parallel_rows = 1 trips near_parallel_rows>0"
    )
    # CS does not apply to the Linear layer: skipped, like the gate that never trips on it
    fc_cs = next(
        c
        for c in cases
        if c.get("classname") == "fc.weight" and c.get("name") == "conv_similarity_norm>0"
    )
    assert fc_cs.find("skipped").get("message") == "conv_similarity_norm does not apply to a matrix"
    for el in (root, suite):
        assert (el.get("tests"), el.get("failures"), el.get("errors"), el.get("skipped")) == (
            "9",
            "3",
            "0",
            "1",
        )
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["tau_cos"] == "0.0001" and props["layers"] == "[]"


def test_without_gates_one_passing_case_per_layer(state_dict: dict) -> None:
    root = parse(to_junit(inspect(state_dict)))
    cases = root.find("testsuite").findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("conv1.weight", "inspect"),
        ("conv2.weight", "inspect"),
        ("fc.weight", "inspect"),
    ]
    assert all(c.find("failure") is None and c.find("skipped") is None for c in cases)
    assert "near_parallel_rows 1" in cases[1].find("system-out").text
    assert root.get("failures") == "0"


def test_nonfinite_layer_is_skipped_not_failed() -> None:
    sd = {"a.weight": torch.randn(4, 4), "b.weight": torch.full((4, 4), float("nan"))}
    root = parse(to_junit(inspect(sd, fail_if=["acv_mean>0"])))
    cases = {c.get("classname"): c for c in root.iter("testcase")}
    assert cases["a.weight"].find("failure") is not None
    assert cases["b.weight"].find("skipped").get("message") == "acv_mean NaN/Inf in the weights"


def test_cli_writes_xml_by_extension_and_exit_code_agrees(tmp_path: Path, pt_file: Path) -> None:
    out = tmp_path / "wcond.xml"
    result = runner.invoke(
        app, ["inspect", str(pt_file), "-o", str(out), "--fail-if", "near_parallel_rows>0"]
    )
    assert result.exit_code == 1 and f"wrote {out}" in result.stderr
    root = parse(out.read_text(encoding="utf-8"))
    assert root.get("failures") == "1"
    result = runner.invoke(
        app, ["inspect", str(pt_file), "-f", "junit", "--fail-if", "dead_rows>0"]
    )
    assert result.exit_code == 0 and parse(result.stdout).get("failures") == "0"


def test_names_needing_escapes_stay_valid_xml() -> None:
    sd = {'m<0>&"x".weight': torch.randn(4, 4), "ok.weight": torch.randn(4, 4)}
    root = parse(to_junit(inspect(sd, fail_if=["acv_mean>0"])))
    assert {c.get("classname") for c in root.iter("testcase")} == {'m<0>&"x".weight', "ok.weight"}


def _run(state_dict: dict, fail_if: list[str]) -> TrendReport:
    """Three reports of a run (no files: TrendReport's parts), conv2's parallel pair gone at the last."""
    sd = dict(state_dict)
    sd["<bad>\n::error::x.weight"] = torch.randn(5, 5)
    last = {**sd, "conv2.weight": torch.randn(sd["conv2.weight"].shape)}
    reports = [inspect(s, fail_if=fail_if) for s in (sd, sd, last)]
    for r, name in zip(reports, ("run/step_1.pt", "run/step_2.pt", "run/step_3.pt")):
        r.checkpoint = name
    return TrendReport(reports=reports, steps=[1, 2, 3], trend={})


def test_a_run_has_one_testcase_per_checkpoint_and_gate(state_dict: dict) -> None:
    t = _run(state_dict, ["near_parallel_rows>0", "acv_mean>2"])
    root = parse(trend_to_junit(t))
    assert root.get("tests") == "6" and root.get("failures") == "2"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [
        f"wcond inspect run/step_{i}.pt (step {i})" for i in (1, 2, 3)
    ]
    cases = [(c.get("classname"), c.get("name"), c.find("failure")) for s in suites for c in s]
    assert [(a, b) for a, b, _ in cases] == [
        (f"step_{i}.pt", g) for i in (1, 2, 3) for g in ("near_parallel_rows>0", "acv_mean>2")
    ]
    failed = [(a, b) for a, b, f in cases if f is not None]
    assert failed == [("step_1.pt", "near_parallel_rows>0"), ("step_2.pt", "near_parallel_rows>0")]
    failure = cases[0][2]
    assert failure is not None and "conv2.weight = 1" in (failure.get("message") or "")
    assert all(s.get("failures") == f for s, f in zip(suites, ("1", "1", "0")))


def test_a_run_without_gates_and_hostile_names(state_dict: dict) -> None:
    t = _run(state_dict, [])
    root = parse(trend_to_junit(t))
    assert [c.get("name") for c in root.iter("testcase")] == ["inspect"] * 3
    assert root.get("failures") == "0"
    t = _run(state_dict, ["acv_mean>=0"])  # every layer trips, the hostile one too
    text = trend_to_junit(t)
    parse(text)
    assert "<bad>" not in text and "\n::error" not in text
