"""A Report as JUnit XML, so CI systems (GitHub test reporters, GitLab, Jenkins) list failing layers natively.

Layout, chosen for how those systems display it:

- one ``<testsuite>`` named after the checkpoint;
- with gates: one ``<testcase>`` per (layer, gate), ``classname`` = the layer key and ``name`` = the
  gate expression. Jenkins turns a dotted classname into a package tree, so layers group by module
  path (``layer1.0.conv1`` / ``weight``); GitHub and GitLab show ``classname`` and ``name`` side by
  side. A tripped gate is a ``<failure>`` whose message carries the offending value; a metric that
  does not apply to the layer (CS of a matrix, any metric of a layer with NaN/Inf) is ``<skipped>``,
  as a gate never trips on it;
- without gates: one passing ``<testcase name="inspect">`` per layer, so the job still shows what
  was analyzed (and reporters that reject an empty result do not fail) without inventing a verdict.

Each testcase's ``<system-out>`` holds the layer's headline numbers. Failures and the exit code agree:
a report has failures exactly when ``wcond inspect`` exits 1.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

from wcond.gates import Gate, GateResult
from wcond.render.text import fmt_number, fmt_shape
from wcond.report import LayerReport, Report
from wcond.text import xml_text

if TYPE_CHECKING:
    from wcond.trend import TrendReport

__all__ = ["to_junit", "trend_to_junit"]

_HEADLINE = (
    "acv_mean",
    "conv_similarity_norm",
    "norm_dev_max",
    "rare_rows",
    "rare_cols",
    "near_parallel_rows",
    "near_parallel_cols",
    "dead_rows",
)


def _failure(case: ET.Element, message: str, text: str) -> None:
    """A tripped gate under a testcase: its one-line message and the exact values, escaped."""
    failure = ET.SubElement(case, "failure", type="wcond.gate", message=xml_text(message))
    failure.text = xml_text(text)


def _headline(r: LayerReport) -> str:
    return f"{xml_text(r.name)} ({r.kind} {fmt_shape(r.shape)}): " + ", ".join(
        f"{m} {fmt_number(r.value(m))}" for m in _HEADLINE
    )


def _exact(v: float) -> str:
    """Full precision for the log, counts as integers."""
    return str(int(v)) if float(v).is_integer() else repr(v)


def to_junit(report: Report) -> str:
    """JUnit XML: a testcase per (layer, gate), or per layer when no gates are set (see module docs)."""
    gates = [Gate.parse(g.expr) for g in report.gates]
    tripped = {(v.layer, g.expr): v.value for g in report.gates for v in g.violations}
    suite = ET.Element("testsuite", name=f"wcond inspect {xml_text(report.checkpoint)}")
    props = ET.SubElement(suite, "properties")
    for k, v in report.settings.items():
        ET.SubElement(
            props,
            "property",
            name=xml_text(k),
            value=xml_text(v if isinstance(v, str) else "" if v is None else json.dumps(v)),
        )
    cases: list[tuple[Gate | None, str]] = [
        (g, res.expr) for g, res in zip(gates, report.gates)
    ] or [(None, "inspect")]
    tests = failures = skipped = 0
    for r in report.layers:
        for gate, expr in cases:
            case = ET.SubElement(suite, "testcase", classname=xml_text(r.name), name=xml_text(expr))
            tests += 1
            if gate is not None:
                value = r.value(gate.metric)
                if (r.name, expr) in tripped:
                    failures += 1
                    v = fmt_number(tripped[(r.name, expr)])
                    _failure(
                        case,
                        f"{gate.metric} = {v} trips {expr}",
                        f"{r.name}: {gate.metric} = {_exact(tripped[(r.name, expr)])}, gate {expr}",
                    )
                elif value is None or value != value:
                    skipped += 1
                    why = (
                        "NaN/Inf in the weights" if r.nonfinite else f"does not apply to a {r.kind}"
                    )
                    ET.SubElement(case, "skipped", message=f"{gate.metric} {why}")
            ET.SubElement(case, "system-out").text = _headline(r)
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", str(skipped))
    root = ET.Element(
        "testsuites",
        name="wcond",
        tests=str(tests),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
    )
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def trend_to_junit(t: TrendReport) -> str:
    """A run's JUnit XML: one testsuite per checkpoint, one testcase per (checkpoint, gate).

    ``classname`` is the checkpoint's file name (its step in the suite's name) and ``name`` the gate;
    a tripped gate is a ``<failure>`` naming each layer that trips it and its value. Without gates,
    one passing ``<testcase name="inspect">`` per checkpoint.
    """
    root = ET.Element("testsuites", name="wcond")
    totals = {"tests": 0, "failures": 0}
    for r, step in zip(t.reports, t.steps):
        label = Path(r.checkpoint).name or r.checkpoint
        at = "" if step is None else f" (step {step})"
        suite = ET.SubElement(root, "testsuite", name=xml_text(f"wcond inspect {r.checkpoint}{at}"))
        failures = 0
        cases: list[GateResult | None] = [*r.gates] or [None]
        for g in cases:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=xml_text(label),
                name=xml_text("inspect" if g is None else g.expr),
            )
            if g is not None and not g.passed:
                failures += 1
                where = ", ".join(f"{v.layer} = {fmt_number(v.value)}" for v in g.violations)
                _failure(
                    case,
                    f"{len(g.violations)} layers trip {g.expr}: {where}",
                    "\n".join(f"{v.layer}: {_exact(v.value)}" for v in g.violations),
                )
            s = r.summary
            ET.SubElement(case, "system-out").text = xml_text(
                f"{r.checkpoint}: {s.layers} layers, acv_sum {fmt_number(s.acv_sum)}, "
                f"conv_similarity {fmt_number(s.conv_similarity)}, norm_loss "
                f"{fmt_number(s.norm_loss)}, near-parallel pairs {s.near_parallel_rows} rows "
                f"{s.near_parallel_cols} cols"
            )
        tests = len(suite.findall("testcase"))
        for k, v in (("tests", tests), ("failures", failures), ("errors", 0), ("skipped", 0)):
            suite.set(k, str(v))
        totals["tests"] += tests
        totals["failures"] += failures
    for k, v in (*totals.items(), ("errors", 0), ("skipped", 0)):
        root.set(k, str(v))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
