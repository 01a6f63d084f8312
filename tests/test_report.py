"""wcond/report.py: one canonical name per metric, the labels that stand for them, and the guide."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import wcond
from wcond.render import html as render_html
from wcond.render import report as render_report
from wcond.render.report import CSV_FIELDS, to_markdown
from wcond.report import (
    DERIVED_LABELS,
    METRIC_ALIASES,
    METRIC_GUIDE,
    NUMERIC_FIELDS,
    legend,
    resolve_metric,
    resolve_metrics,
)

ROOT = Path(__file__).resolve().parent.parent


def test_every_name_resolves_to_itself_and_every_label_to_its_metric() -> None:
    assert [resolve_metric(m) for m in NUMERIC_FIELDS] == list(NUMERIC_FIELDS)
    for label, name in METRIC_ALIASES.items():
        assert name in NUMERIC_FIELDS and label not in NUMERIC_FIELDS
        assert resolve_metric(label) == name
    assert resolve_metrics("cs_n") == ("conv_similarity_norm",)
    assert resolve_metrics(["acv", "acv_mean", "rare_r"]) == ("acv_mean", "rare_rows")


@pytest.mark.parametrize(
    ("typed", "hint"),
    [
        ("acv_man", " (did you mean 'acv_mean'?)"),
        ("rare", " (did you mean 'rare_r'?)"),
        ("zzz", ""),
    ],
)
def test_an_unknown_metric_names_the_choices_and_the_closest(typed: str, hint: str) -> None:
    with pytest.raises(wcond.UsageError) as e:
        resolve_metric(typed)
    assert str(e.value) == (
        f"unknown metric {typed!r}{hint}; one of: {', '.join(NUMERIC_FIELDS)} "
        f"(or the table's labels {', '.join(METRIC_ALIASES)})"
    )


def test_derived_labels_are_not_metrics() -> None:
    for label in DERIVED_LABELS:
        with pytest.raises(wcond.UsageError):
            resolve_metric(label)


def test_the_guide_covers_exactly_the_metrics_with_every_field_filled() -> None:
    assert list(METRIC_GUIDE) == list(NUMERIC_FIELDS)
    for name, g in METRIC_GUIDE.items():
        assert g.meaning and g.worse and g.measured and g.next, name


def test_every_table_header_is_a_name_or_a_declared_label() -> None:
    """Terminal, Markdown and HTML headers: each is a metric's name, its label, or a derived label."""
    terminal = [h for h, *_ in render_report._COLUMNS]
    html = [h for h, *_ in render_html._COLUMNS if h not in ("layer", "kind", "shape", "notes")]
    for h in terminal + html:
        assert h in NUMERIC_FIELDS or h in METRIC_ALIASES or h in DERIVED_LABELS, h
    assert [label for label, _, _ in legend(terminal)] == terminal
    # HTML and CSV show names, never labels
    assert not set(html) & set(METRIC_ALIASES)
    assert set(CSV_FIELDS) >= set(NUMERIC_FIELDS) and not set(CSV_FIELDS) & set(METRIC_ALIASES)


def _report() -> wcond.Report:
    g = torch.Generator().manual_seed(0)
    return wcond.inspect({"conv.weight": torch.randn(8, 3, 3, 3, generator=g)}, top=0)


def test_markdown_headers_are_names_and_its_legend_maps_each_to_label_and_meaning() -> None:
    md = to_markdown(_report())
    header = next(line for line in md.splitlines() if line.startswith("| layer"))
    cells = [c.strip() for c in header.strip("|").split("|")][2:]
    assert "acv_mean" in cells and "conv_similarity_norm" in cells and "dead_rows" in cells
    assert not set(cells) & set(METRIC_ALIASES)
    assert "cs_norm" not in md
    legend_line = next(line for line in md.splitlines() if line.startswith("**Columns**"))
    assert "`conv_similarity_norm` (`cs_n`): " + METRIC_GUIDE["conv_similarity_norm"].meaning in (
        legend_line
    )
    assert "`cs/fl` = `conv_similarity` / `conv_similarity_floor`" in legend_line


def test_html_says_the_full_name_and_has_a_legend() -> None:
    page = render_html.to_html(_report())
    assert "cs_norm" not in page.replace("conv_similarity_norm", "")
    assert '<dl class="legend" id="legend">' in page
    assert "<dt><code>conv_similarity_norm</code> (table: <code>cs_n</code>)</dt>" in page


def test_docs_numbers_covers_every_metric_with_the_guides_range() -> None:
    """docs/NUMBERS.md and `inspect --explain` say the same: each metric, and its measured range."""
    text = (ROOT / "docs" / "NUMBERS.md").read_text(encoding="utf-8")
    for name, g in METRIC_GUIDE.items():
        section = re.search(rf"^### `{name}`.*?(?=^### |\Z)", text, flags=re.S | re.M)
        assert section, f"docs/NUMBERS.md has no section for {name}"
        assert g.measured in section.group(0), f"{name}: {g.measured!r} not in its section"
