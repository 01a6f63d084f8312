"""`inspect --format html`: one self-contained page, checked as text and in a real headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wcond.analyze import inspect
from wcond.cli import app
from wcond.cosines import CosMatrix, cos_matrix, heatmap_cosines
from wcond.render.html import heatmap_layers, to_html

runner = CliRunner()
GATES = ["near_parallel_rows>0", "acv_mean>0.9"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class _Refs(HTMLParser):
    """Every attribute that makes a browser fetch or navigate, and every tag."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "poster", "data", "xlink:href"):
                self.refs.append((tag, name, value or ""))


def make_report(tmp_path: Path, pt_file: Path) -> Path:
    out = tmp_path / "report.html"
    args = ["inspect", str(pt_file), "-o", str(out)]
    for g in GATES:
        args += ["--fail-if", g]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # near_parallel_rows>0 trips on conv2
    return out


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, its HTML report with GATES), made once: the heatmaps take a second or two."""
    from conftest import small_state_dict

    tmp = tmp_path_factory.mktemp("html")
    ckpt = tmp / "model.pt"
    torch.save(small_state_dict(), ckpt)
    return ckpt, make_report(tmp, ckpt)


def test_html_is_self_contained(page: tuple[Path, Path]) -> None:
    text = page[1].read_text(encoding="utf-8")
    assert not re.search(r"(?i)\b(?:https?|ftp)://", text), (
        "an external URL (even in a comment) in the page"
    )
    assert not re.search(r"(?i)(?:src|href)\s*=\s*[\"']?//", text), "a protocol-relative reference"
    parser = _Refs()
    parser.feed(text)
    assert not {"link", "iframe", "object", "embed"} & parser.tags
    assert all(tag == "script" for tag in parser.tags & {"script"})
    for tag, attr, value in parser.refs:
        assert value.startswith("data:") or value.startswith("#"), (
            f"<{tag} {attr}={value[:60]!r}> leaves the file"
        )
    assert not re.search(r"<script[^>]+src", text) and "@import" not in text and "url(" not in text


def test_html_shows_gates_layers_summary_and_heatmaps(page: tuple[Path, Path]) -> None:
    pytest.importorskip("matplotlib")
    text = page[1].read_text(encoding="utf-8")
    assert "FAIL: 1 of 2 gates tripped" in text
    assert "<code>near_parallel_rows&gt;0</code>" in text and "<code>acv_mean&gt;0.9</code>" in text
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        assert f'data-v="{name}">{name}</td>' in text
    assert '<tr data-i="1" class="tripped">' in text  # conv2 trips the gate
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert images, "no heatmap embedded"
    import base64

    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert "conv2.weight</code>: trips near_parallel_rows&gt;0" in text
    assert "Closest row pairs: 1&ndash;4 (cos -1.0000)" in text


def test_without_matplotlib_the_page_says_what_to_install(
    tmp_path: Path, pt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    text = make_report(tmp_path, pt_file).read_text(encoding="utf-8")
    assert "Heatmaps need matplotlib: pip install &#x27;wcond[plot]&#x27;" in text
    assert "<img" not in text and "FAIL: 1 of 2 gates tripped" in text


def test_state_dict_report_takes_its_cosines_from_the_caller(state_dict: dict) -> None:
    pytest.importorskip("matplotlib")
    report = inspect(state_dict, fail_if=["acv_mean>0"])
    assert "pass cosines= to to_html" in to_html(report)
    layers = [layer for layer, _ in heatmap_layers(report, 2)]
    cosines = heatmap_cosines(report, layers, state_dict)
    assert to_html(report, cosines, heatmaps=2).count("<img ") == 2
    assert "<img " not in to_html(report, cosines, heatmaps=0)


def test_the_renderer_never_reads_the_checkpoint(
    tmp_path: Path, pt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report of a file on disk gets no heatmaps from the renderer alone: the caller reads the weights."""
    pytest.importorskip("matplotlib")
    report = inspect(pt_file, fail_if=GATES)
    assert Path(report.checkpoint).exists()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a renderer opened a checkpoint")

    monkeypatch.setattr("wcond.checkpoint.open.open_checkpoint", refuse)
    monkeypatch.setattr("wcond.cosines.open_checkpoint", refuse)
    text = to_html(report)
    assert "<img" not in text and "pass cosines= to to_html" in text


def test_heatmaps_draw_what_the_caller_hands_over(state_dict: dict) -> None:
    pytest.importorskip("matplotlib")
    report = inspect(state_dict, fail_if=["acv_mean>0"])
    first, second = (layer.name for layer, _ in heatmap_layers(report, 2))
    w = torch.randn(6, 5)
    drawn: dict[str, CosMatrix | str] = {first: cos_matrix(first, w), second: "no tensor here"}
    text = to_html(report, drawn, heatmaps=2)
    assert text.count("<img ") == 1 and f'alt="cosine heatmap of {first}"' in text
    assert f"<code>{second}</code>: not drawn (no tensor here)" in text
    # a layer the caller left out is named as a missing key, as a weights dict without it was
    assert f"<code>{second}</code>: not drawn (&#x27;{second}&#x27;)" in to_html(
        report, {first: drawn[first]}, heatmaps=2
    )


def test_heatmap_cosines_reads_each_layer_or_says_why_not(state_dict: dict) -> None:
    report = inspect(state_dict)
    layers = [layer for layer, _ in heatmap_layers(report, 2)]
    got = heatmap_cosines(report, layers, {layers[0].name: state_dict[layers[0].name]})
    first = got[layers[0].name]
    assert (
        isinstance(first, CosMatrix) and first.cos.shape[0] == state_dict[layers[0].name].shape[0]
    )
    assert got[layers[1].name] == repr(layers[1].name)  # str(KeyError)


def test_no_gates_verdict(tmp_path: Path, pt_file: Path) -> None:
    out = tmp_path / "r.htm"
    assert runner.invoke(app, ["inspect", str(pt_file), "-o", str(out)]).exit_code == 0
    text = out.read_text(encoding="utf-8")
    assert "No gates set" in text and 'id="gates"' not in text


def test_names_are_escaped(tmp_path: Path) -> None:
    sd = {"<b>evil</b>.weight": torch.randn(4, 4), "ok.weight": torch.randn(4, 4)}
    text = to_html(inspect(sd), heatmaps=0)
    assert "<b>evil</b>" not in text and "&lt;b&gt;evil&lt;/b&gt;.weight" in text


# --------------------------------------------------------------------------- in a real browser


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _chromium(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_browser() is None, reason="no chromium found (apt-get install chromium)")
def test_in_headless_chromium_the_page_renders_and_sorts(
    tmp_path: Path, page: tuple[Path, Path]
) -> None:
    ckpt, html_file = page
    browser = _browser()
    assert browser is not None
    report = inspect(ckpt)
    by_acv = [r.name for r in sorted(report.layers, key=lambda r: r.acv_mean, reverse=True)]
    by_params = [r.name for r in sorted(report.layers, key=lambda r: r.params)]
    # What a person does: click "params" (ascending: numbers compare as numbers, 640 before 1152),
    # note the order, then click "acv_mean" twice (ascending, then descending). The script runs after
    # the page's own, so the dumped DOM is the page as it looks after the clicks.
    clicks = """<script>
    function head(name) {
      return Array.from(document.querySelectorAll("#layers th")).find(function (h) { return h.textContent === name; });
    }
    function order() {
      return Array.from(document.querySelectorAll("#layers tbody tr")).map(function (r) { return r.cells[0].textContent; });
    }
    head("params").click();
    document.body.setAttribute("data-after-params", order().join(","));
    head("acv_mean").click(); head("acv_mean").click();
    </script>"""
    clicked = tmp_path / "clicked.html"
    clicked.write_text(
        html_file.read_text(encoding="utf-8").replace("</body>", clicks + "</body>"),
        encoding="utf-8",
    )

    dom = _chromium(browser, tmp_path, "--dump-dom", clicked.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "FAIL: 1 of 2 gates tripped" in html
    body = html[html.index('<table class="sortable" id="layers">') :]
    body = body[: body.index("</table>")]
    order = re.findall(r'<tr data-i="\d+"[^>]*><td class="t" data-v="([^"]+)"', body)
    assert order == by_acv, f"rows after sorting by acv_mean descending: {order}"
    assert (
        re.search(r'<th [^>]*aria-sort="descending"[^>]*>acv_mean</th>', body)
        and body.count("aria-sort=") == 1
    )
    assert f'data-after-params="{",".join(by_params)}"' in html
    assert by_params != sorted(
        by_params, key=lambda n: str(next(r.params for r in report.layers if r.name == n))
    )

    shot = tmp_path / "page.png"
    result = _chromium(
        browser, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", html_file.as_uri()
    )
    assert result.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- a run's page

HOSTILE = "<img src=x onerror=alert(1)>\n::error::x %0A.weight"


@pytest.fixture(scope="module")
def run_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, str]:
    """(TrendReport, its page): three checkpoints, conv2 drifting away from its parallel pair."""
    from conftest import small_state_dict

    from wcond.render.html import to_run_html
    from wcond.trend import expand_paths, trend

    tmp = tmp_path_factory.mktemp("run")
    base = small_state_dict()
    base[HOSTILE] = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    for k, step in enumerate((100, 200, 300)):
        sd = {key: t.clone() for key, t in base.items()}
        g = torch.Generator().manual_seed(k)
        sd["conv2.weight"] += 0.05 * k * torch.randn(sd["conv2.weight"].shape, generator=g)
        torch.save(sd, tmp / f"step_{step}.pt")
    t = trend(expand_paths([tmp / "step_*.pt"]), fail_if=["near_parallel_rows>0"])
    return t, to_run_html(t)


def test_run_page_is_self_contained_and_escapes_names(run_page: tuple[object, str]) -> None:
    _, text = run_page
    assert not re.search(r"(?i)\b(?:https?|ftp)://", text.replace("http://www.w3.org/2000/svg", ""))
    parser = _Refs()
    parser.feed(text)
    assert (
        not parser.refs and not {"script", "link", "iframe", "object", "embed", "img"} & parser.tags
    )
    assert (
        "<img src=x" not in text
        and "<code>&lt;img src=x onerror=alert(1)&gt;\\n::error::x %0A.weight</code>" in text
    )


def test_run_page_shows_verdicts_charts_movers_first_and_the_table(
    run_page: tuple[object, str],
) -> None:
    from wcond.report import TREND_METRICS
    from wcond.trend import TrendReport

    t, text = run_page
    assert isinstance(t, TrendReport)
    assert 'id="verdict">FAIL: gates tripped in 1 of 3 checkpoints</div>' in text
    checkpoints = text[text.index('id="checkpoints"') : text.index('id="charts"')]
    assert checkpoints.count('<td class="t pass">PASS</td>') == 2 * 2  # verdict + gate, twice
    assert "<code>conv2.weight</code> (1)" in checkpoints  # step 100's parallel pair, its value
    charts = text[text.index('id="charts"') : text.index('id="terminal"')]
    rows = re.findall(r"<tr><td class=\"t\"><code>(.*?)</code></td>", charts)
    assert rows[0] == "conv2.weight" and len(rows) == len(t.trend)  # the mover first
    drawn = sum(
        1 for name in t.trend for m in TREND_METRICS if any(v is not None for v in t.trend[name][m])
    )
    assert charts.count("<svg ") == drawn and charts.count("<polyline ") == drawn
    assert "<title>step 300: " in charts
    assert "gates: 2 of 3 checkpoints pass" in text[text.index('id="terminal"') :]


@pytest.mark.skipif(_browser() is None, reason="no chromium found (apt-get install chromium)")
def test_in_headless_chromium_the_run_page_draws_its_charts(
    tmp_path: Path, run_page: tuple[object, str]
) -> None:
    browser = _browser()
    assert browser is not None
    _, text = run_page
    # Errors are caught from the first line on; after the page, what was drawn and fetched is noted.
    catch = """<script>window.__errors = [];
    window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
    var __ce = console.error; console.error = function (m) { window.__errors.push(String(m)); __ce.apply(console, arguments); };
    </script>"""
    report = """<script>
    var lines = Array.from(document.querySelectorAll("#charts polyline"));
    var drawn = lines.filter(function (l) { var b = l.getBBox(); return b.width > 100 && l.getTotalLength() > 0; });
    document.body.setAttribute("data-lines", lines.length + "/" + drawn.length);
    document.body.setAttribute("data-fetched", performance.getEntriesByType("resource").map(function (r) { return r.name; }).join(" "));
    document.body.setAttribute("data-errors", window.__errors.join(" | "));
    </script>"""
    page = tmp_path / "run.html"
    page.write_text(
        text.replace("<head>", "<head>" + catch, 1).replace("</body>", report + "</body>"),
        encoding="utf-8",
    )
    dom = _chromium(
        browser, tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    lines = re.search(r'data-lines="(\d+)/(\d+)"', dom.stdout)
    assert lines and int(lines.group(1)) > 0 and lines.group(1) == lines.group(2), lines
    assert 'data-fetched=""' in dom.stdout and 'data-errors=""' in dom.stdout
    assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr
    assert "FAIL: gates tripped in 1 of 3 checkpoints" in dom.stdout
