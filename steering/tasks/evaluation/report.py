"""Evaluation reports: one row per condition (the unsteered baseline first), as JSON and as a Markdown table.

Means come with their standard error. Steered conditions carry their difference from the baseline (or ratio,
for perplexity) and, for 0/1 metrics scored on the same questions, the paired counts of questions gained and
lost with an exact two-sided McNemar (sign test) p-value: whether the change is more than noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    compare: Literal["diff", "ratio", None] = None
    digits: int = 3


@dataclass
class ConditionResult:
    label: str
    steering: list[dict] | None
    metrics: dict[str, float]
    stderr: dict[str, float] = field(default_factory=dict)
    versus_baseline: dict[str, dict[str, float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationReport:
    kind: str
    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    columns: list[Column]
    conditions: list[ConditionResult]
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "model": self.model, "data": self.data, "settings": self.settings,
            "seconds": round(self.seconds, 3), "baseline": self.conditions[0].label if self.conditions else None,
            "conditions": [{"label": c.label, "steering": c.steering, "metrics": c.metrics, "stderr": c.stderr,
                            "versus_baseline": c.versus_baseline, **c.details} for c in self.conditions],
        }

    def markdown(self) -> str:
        """A table: one row per condition, each column with its difference (or ratio) to the baseline."""
        head = ["condition"]
        for col in self.columns:
            head.append(col.header)
            if col.compare == "diff":
                head.append("Δ")
            elif col.compare == "ratio":
                head.append("ratio")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in self.conditions:
            row = [c.label.replace("|", "\\|")]
            for col in self.columns:
                v = c.metrics.get(col.key)
                se = c.stderr.get(col.key)
                cell = "–" if v is None else f"{v:.{col.digits}f}" + (f" ± {se:.{col.digits}f}" if se else "")
                row.append(cell)
                if col.compare:
                    cmp = c.versus_baseline.get(col.key)
                    if cmp is None:
                        row.append("")
                    elif col.compare == "diff":
                        p = cmp.get("p_value")
                        row.append(f"{cmp['diff']:+.{col.digits}f}" + (f" (p={p:.2g})" if p is not None else ""))
                    else:
                        row.append(f"{cmp['ratio']:.{col.digits}f}")
            lines.append("| " + " | ".join(row) + " |")
        n = self.data.get("examples")
        caption = f"{self.kind} on {n} examples" if n else self.kind
        tested = any("p_value" in v for c in self.conditions for v in c.versus_baseline.values())
        note = f"; p: exact McNemar test against {self.conditions[0].label}" if tested else ""
        return f"**{caption}** (± standard error{note})\n\n" + "\n".join(lines) + "\n"


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), 0.0
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided sign test on the discordant pairs."""
    n = gained + lost
    if n == 0:
        return 1.0
    k = min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(base: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """For 0/1 scores on the same examples: the difference of means, gained and lost examples, p-value."""
    gained = sum(1 for b, o in zip(base, other) if o > b)
    lost = sum(1 for b, o in zip(base, other) if o < b)
    n = len(base)
    return {"diff": (sum(other) - sum(base)) / n, "gained": gained, "lost": lost,
            "p_value": mcnemar_p(gained, lost)}
