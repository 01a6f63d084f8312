"""CI gates: expressions such as ``acv_mean>0.5`` checked against every layer's metrics.

A gate knows nothing of reports: it evaluates any mapping of metric names to numbers, so the
modules that make reports use it and it uses none of them.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable

from wcond.errors import UsageError

__all__ = ["OPERATORS", "Gate", "GateResult", "Violation", "evaluate_gates"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
# The comparisons a gate may use, as they are written.
OPERATORS = tuple(_OPS)
_EXPR = re.compile(
    r"^\s*([A-Za-z_]+)\s*(>=|<=|==|!=|>|<)\s*"
    r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf)\s*$"
)


@dataclass(frozen=True)
class Gate:
    """One parsed expression: METRIC OP NUMBER."""

    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, expr: str, resolve: Callable[[str], str] | None = None) -> Gate:
        """Parse ``expr``; ``resolve`` turns the metric as written into its canonical name.

        With :func:`wcond.report.resolve_metric`, a table label is replaced by the metric it
        stands for (``acv>0.3`` is ``acv_mean>0.3``) and an unknown name is refused.
        """
        m = _EXPR.match(expr)
        if not m:
            raise UsageError(
                f"fail_if={expr!r}: expected METRIC OP NUMBER, e.g. 'acv_mean>0.5' "
                "(OP one of > >= < <= == !=)",
                params=("fail_if",),
            )
        metric, op, number = m.groups()
        if resolve is not None:
            try:
                metric = resolve(metric)
            except UsageError as e:
                raise UsageError(f"fail_if={expr!r}: {e}", params=("fail_if",)) from e
        threshold = float(number)
        if math.isinf(threshold):  # reported metrics are finite or null: such a gate is constant
            raise UsageError(
                f"fail_if={expr!r}: the threshold must be a finite number (a gate against "
                f"{number} would trip always or never)",
                params=("fail_if",),
            )
        return cls(metric, op, threshold)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def trips(self, value: float | None) -> bool:
        """Null values (a metric that does not apply) and NaN never trip a gate."""
        return value is not None and not math.isnan(value) and _OPS[self.op](value, self.threshold)


@dataclass(frozen=True)
class Violation:
    layer: str
    value: float


@dataclass
class GateResult:
    expr: str
    passed: bool
    violations: list[Violation] = field(default_factory=list)


def evaluate_gates(
    gates: Sequence[Gate], layers: Mapping[str, Mapping[str, float | None]]
) -> list[GateResult]:
    """Each gate against every layer's metrics (layer name -> metric name -> value), in order.

    Example:
        >>> evaluate_gates([Gate.parse("acv_mean>0.5")], {"fc.weight": {"acv_mean": 0.7}})
        [GateResult(expr='acv_mean>0.5', passed=False, violations=[Violation(layer='fc.weight', value=0.7)])]
    """
    results = []
    for g in gates:
        bad = []
        for name, values in layers.items():
            v = values.get(g.metric)
            if v is not None and g.trips(v):
                bad.append(Violation(name, v))
        results.append(GateResult(str(g), not bad, bad))
    return results
