"""wcond/report.py: one canonical name per metric, the labels that stand for them, and the guide."""

from __future__ import annotations

import pytest

import wcond
from wcond.report import (
    DERIVED_LABELS,
    METRIC_ALIASES,
    NUMERIC_FIELDS,
    resolve_metric,
    resolve_metrics,
)


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
