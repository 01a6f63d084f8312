"""wcond.render: one table from kind and format to renderer, one dispatch; importing it loads no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from wcond._version import __version__
from wcond.analyze import inspect
from wcond.defaults import DIFF_FORMATS, INSPECT_FORMATS, TREND_FORMAT_NAMES
from wcond.render import RENDERERS, render
from wcond.render.report import render_table
from wcond.render.text import table_text

RENDER_MODULES = [
    "wcond.render",
    "wcond.render.report",
    "wcond.render.diff",
    "wcond.render.trend",
    "wcond.render.html",
    "wcond.render.junit",
    "wcond.render.init_cs",
    "wcond.render.shrink",
    "wcond.render.plot",
]


@pytest.mark.parametrize("module", RENDER_MODULES)
def test_importing_a_renderer_imports_no_torch(module: str) -> None:
    probe = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        "print(json.dumps(sorted(m for m in ('torch', 'safetensors', 'matplotlib') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == [], f"import {module} loaded {out.strip()}"


def test_the_table_offers_exactly_the_formats_the_cli_accepts() -> None:
    assert RENDERERS["report"].names == tuple(f for f in INSPECT_FORMATS if f != "parquet")
    assert RENDERERS["diff"].names == DIFF_FORMATS
    assert RENDERERS["trend"].names == TREND_FORMAT_NAMES


def test_render_dispatches_by_kind_and_format(state_dict: dict[str, torch.Tensor]) -> None:
    report = inspect(state_dict)
    assert render("report", report, "table") == table_text(render_table, report, 120)
    doc = json.loads(render("report", report, "json"))
    assert doc["wcond_version"] == __version__ and doc["checkpoint"] == "<state_dict>"
    assert render("report", report, "csv").startswith("name,kind,shape,")
    with pytest.raises(KeyError):
        render("diff", report, "csv")  # a diff has no CSV
    # options reach the format's renderer: the HTML page's heatmap data
    page = render("report", report, "html", cosines={}, heatmaps=1)
    assert "not drawn" in page or "Heatmaps need matplotlib" in page
