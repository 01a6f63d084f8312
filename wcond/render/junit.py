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

from wcond.gates import Gate
from wcond.render.text import fmt_number, fmt_shape
from wcond.report import LayerReport, Report
from wcond.text import xml_text

__all__ = ["to_junit"]

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
                    failure = ET.SubElement(
                        case,
                        "failure",
                        type="wcond.gate",
                        message=xml_text(f"{gate.metric} = {v} trips {expr}"),
                    )
                    failure.text = xml_text(
                        f"{r.name}: {gate.metric} = {_exact(tripped[(r.name, expr)])}, gate {expr}"
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
