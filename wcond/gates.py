"""CI gates: `--fail-if "acv_mean>0.5"` expressions checked against every layer."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from wcond.errors import UsageError

if TYPE_CHECKING:
    from wcond.analyze import LayerReport

__all__ = ["Gate", "GateResult", "Violation", "evaluate_gates"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_EXPR = re.compile(
    r"^\s*([A-Za-z_]+)\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf)\s*$"
)


def gate_metrics() -> tuple[str, ...]:
    from wcond.analyze import NUMERIC_FIELDS

    return NUMERIC_FIELDS


@dataclass(frozen=True)
class Gate:
    """One parsed expression: METRIC OP NUMBER."""

    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, expr: str) -> Gate:
        m = _EXPR.match(expr)
        if not m:
            raise UsageError(
                f"--fail-if {expr!r}: expected METRIC OP NUMBER, e.g. 'acv_mean>0.5' (OP one of > >= < <= == !=)"
            )
        metric, op, number = m.groups()
        if metric not in gate_metrics():
            raise UsageError(
                f"--fail-if {expr!r}: unknown metric {metric!r}; one of: {', '.join(gate_metrics())}"
            )
        return cls(metric, op, float(number))

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


def evaluate_gates(gates: Sequence[Gate], layers: Sequence[LayerReport]) -> list[GateResult]:
    results = []
    for g in gates:
        bad = [Violation(r.name, v) for r in layers if g.trips(v := r.value(g.metric))]  # type: ignore[arg-type]
        results.append(GateResult(str(g), not bad, bad))
    return results
