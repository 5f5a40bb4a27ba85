"""Figures: how each is summarised, judged against its budget, printed, and saved as JSON."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
_P90_MIN_SAMPLES = 10  # below this, p90 is just the maximum: show the range instead


@attrs.frozen
class Budget:
    """``value <= limit`` (``at_most``) or ``value >= limit``; ``text`` as DESIGN.md states it.

    With ``low`` set it is a range: ``low <= value <= limit``.
    """

    limit: float
    text: str
    at_most: bool = True
    low: float | None = None

    def met(self, value: float) -> bool:
        if self.low is not None:
            return self.low <= value <= self.limit
        return value <= self.limit if self.at_most else value >= self.limit


@attrs.frozen
class Figure:
    key: str
    label: str
    unit: str
    samples: tuple[float, ...]
    budget: Budget | None = None
    baseline: str = "—"
    details: dict[str, Any] = attrs.Factory(dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def p90(self) -> float | None:
        if len(self.samples) < _P90_MIN_SAMPLES:
            return None
        return statistics.quantiles(self.samples, n=10, method="inclusive")[-1]

    @property
    def within_budget(self) -> bool | None:
        return None if self.budget is None or not self.samples else self.budget.met(self.median)

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "label": self.label, "unit": self.unit, "n": len(self.samples),
            "median": self.median, "p90": self.p90,
            "min": min(self.samples, default=None), "max": max(self.samples, default=None),
            "samples": list(self.samples),
            "budget": None if self.budget is None else {
                "limit": self.budget.limit, "text": self.budget.text,
                "at_most": self.budget.at_most, "low": self.budget.low},
            "within_budget": self.within_budget, "baseline": self.baseline,
            "details": self.details,
        }


def number(value: float, unit: str) -> str:
    """A value at a precision that suits its unit, without the unit."""
    if unit in ("req/s", "calls/s", "sessions/s", "n"):
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}"
    if unit == "B":
        return f"{value:,.0f}"
    if unit in ("s", "ms"):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if unit == "µs":
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"
    return f"{value:.1f}"


def formatted(value: float | None, unit: str) -> str:
    """A value with its unit (``—`` when there is none)."""
    if value is None or math.isnan(value):
        return "—"
    return f"{number(value, unit)}x" if unit == "x" else f"{number(value, unit)} {unit}"


def _spread(figure: Figure) -> str:
    """p90 when there are enough samples, else the range; nothing for a single sample."""
    if len(figure.samples) < 2:
        return "—"
    if figure.p90 is not None:
        return "p90 " + formatted(figure.p90, figure.unit)
    low = number(min(figure.samples), figure.unit)
    return f"{low} - {formatted(max(figure.samples), figure.unit)}"


def _budget_cell(figure: Figure) -> str:
    if figure.budget is None:
        return "—"
    return f"{figure.budget.text} {'ok' if figure.within_budget else 'OVER'}"


def table(figures: Sequence[Figure]) -> str:
    """The figures as an aligned plain-text table."""
    rows = [("figure", "median", "p90 / range", "n", "budget", "baseline")]
    for figure in figures:
        rows.append((figure.label, formatted(figure.median, figure.unit), _spread(figure),
                     str(len(figure.samples)), _budget_cell(figure), figure.baseline))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.rjust(width) if 0 < column < 4 else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def save(document: dict[str, Any], path: Path = RESULTS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path
