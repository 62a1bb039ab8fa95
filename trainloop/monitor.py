"""A monitored metric: which value of ``learner.metrics`` counts as "better".

Shared by the plugins that compare epochs (checkpoint's ``best.pt``, early stopping,
ReduceLROnPlateau), so ``--monitor`` and ``--mode`` mean the same thing for all.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainloop.errors import UsageError

if TYPE_CHECKING:
    from trainloop.learner import Learner

_HIGHER_IS_BETTER = ("accuracy", "dice", "iou", "f1", "precision", "recall", "auc", "score")


def add_monitor_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--monitor`` and ``--mode`` once, whichever plugin asks first."""
    if "--monitor" in parser._option_string_actions:  # noqa: SLF001 - argparse has no public lookup
        return
    group = parser.add_argument_group("monitor (best checkpoint, early stopping, plateau)")
    group.add_argument(
        "--monitor",
        default="valid_loss",
        metavar="METRIC",
        help="the metric that decides which epoch is best (default: valid_loss)",
    )
    group.add_argument(
        "--mode",
        choices=("auto", "min", "max"),
        default="auto",
        help="whether lower or higher is better; auto: max for accuracy, dice, ... (default: auto)",
    )


@dataclass
class Monitor:
    """Tracks the best value of ``metric``.

    Args:
        metric: a key of ``learner.metrics``, such as ``valid_loss``.
        mode: ``"min"``, ``"max"``, or ``"auto"`` (max when the name contains
            accuracy, dice, iou, f1, ... and min otherwise).
        min_delta: how much better a value must be to count as an improvement.
    """

    metric: str = "valid_loss"
    mode: str = "auto"
    min_delta: float = 0.0
    best: float | None = None

    def __post_init__(self) -> None:
        if self.mode == "auto":
            higher = any(word in self.metric.lower() for word in _HIGHER_IS_BETTER)
            self.mode = "max" if higher else "min"
        if self.mode not in ("min", "max"):
            raise UsageError(f"--mode {self.mode}: use min, max or auto")

    def value(self, metrics: dict[str, float]) -> float:
        """The monitored value in ``metrics``; a UsageError naming the keys there are if absent."""
        if self.metric not in metrics:
            known = ", ".join(sorted(metrics)) or "none"
            raise UsageError(
                f"--monitor {self.metric}: no such metric this epoch (there are: {known})"
            )
        return float(metrics[self.metric])

    def is_better(self, value: float) -> bool:
        """Whether ``value`` improves on the best so far by more than ``min_delta``."""
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, metrics: dict[str, float]) -> bool:
        """Record this epoch's value; return whether it is a new best."""
        value = self.value(metrics)
        improved = self.is_better(value)
        if improved:
            self.best = value
        return improved

    def state_dict(self) -> dict[str, float | None]:
        """The best value so far, for checkpoints."""
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        """Restore the best value so far."""
        self.best = state["best"]


def monitored_value(monitor: Monitor, learner: Learner) -> float | None:
    """The monitored value of this epoch, or ``None`` when it cannot exist.

    A ``valid_*`` metric is absent when the learner has no validation data: that is
    not an error (``best.pt`` and best-model tracking are simply off). Any other
    absent metric is a :class:`~trainloop.UsageError` naming the metrics there are.
    """
    if monitor.metric not in learner.metrics and learner.valid_data is None:
        if monitor.metric.startswith("valid_"):
            return None
    return monitor.value(learner.metrics)
