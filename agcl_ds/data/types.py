"""The task types every stage shares: what a task is, below every loader and generator that makes one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """A problem with a data file, phrased for the user in one line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    options: list[str] | None = None  # closed label set (likelihood scoring), or None (open answers)
    meta: dict[str, Any] = field(default_factory=dict)
    metric: str = "accuracy"  # how a generated answer is scored (agcl_ds.evaluation.metrics.METRICS)
