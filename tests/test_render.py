"""wcond.render: importing the renderers loads no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

RENDERERS = [
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


@pytest.mark.parametrize("module", RENDERERS)
def test_importing_a_renderer_imports_no_torch(module: str) -> None:
    probe = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        "print(json.dumps(sorted(m for m in ('torch', 'safetensors', 'matplotlib') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == [], f"import {module} loaded {out.strip()}"
