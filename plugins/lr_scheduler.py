"""lr_scheduler: any ``torch.optim.lr_scheduler`` schedule, stepped per batch or per epoch.

The scheduler is made when ``fit`` begins (the optimizer exists and ``learner.epochs``
is known) by a factory: ``factory(optimizer)``, or ``factory(optimizer, learner=...)``
when the factory has a ``learner`` parameter (for schedules whose length depends on
``learner.epochs`` or ``len(learner.train_data)``).

* ``interval="batch"``: stepped in ``on_step_end``, i.e. after every optimizer step
  (with gradient accumulation, once per group of batches).
* ``interval="epoch"``: stepped in ``on_epoch_end``. ``ReduceLROnPlateau`` is stepped
  with the monitored metric (``--monitor``/``--mode``, shared with early stopping and
  the best checkpoint; default ``valid_loss``).
* Each epoch it adds ``lr`` to ``learner.metrics``: the first parameter group's
  learning rate when the epoch began (for a per-batch schedule, that of the epoch's
  first batch), so ``metrics.jsonl``, the progress table and TensorBoard show it.
* Checkpoints: the scheduler's ``state_dict`` goes under the key ``scheduler`` (and the
  ``lr`` metric of the epoch in progress under ``scheduler_epoch_lr``, so an epoch
  resumed in its middle reports the lr it began with). The
  scheduler is made in ``on_fit_begin`` with ``tryfirst``, before the checkpoint
  plugin restores states (a plain ``on_fit_begin``), so a resumed run continues the
  schedule where it stopped. A checkpoint loaded outside ``fit`` is applied to the
  scheduler the next ``fit`` makes.

Options (``--lr-schedule none`` is the default and registers nothing):

========================  ==========================================================
``--lr-schedule NAME``    ``none``, ``cosine``, ``onecycle``, ``step`` or ``plateau``
``--lr-step-size N``      step: epochs between decays (default: a third of the epochs)
``--lr-gamma G``          step: decay factor; plateau: factor on a plateau (0.1)
``--lr-max LR``           onecycle: the peak lr (default: the optimizer's lr)
``--lr-patience N``       plateau: epochs without improvement before a decay (2)
========================  ==========================================================

``cosine`` anneals from the optimizer's lr to 0 over the whole run and ``onecycle``
warms up then anneals (``OneCycleLR``), both stepped per optimizer step when
``len(train_data)`` is known (the number of steps accounts for ``--accumulate``) and
per epoch otherwise; ``step`` (``StepLR``) and ``plateau`` (``ReduceLROnPlateau``) are
stepped per epoch.

Python API::

    LRScheduler(functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3))
    LRScheduler(lambda optimizer, learner: OneCycleLR(
        optimizer, max_lr=0.1, total_steps=learner.epochs * len(learner.train_data)),
        interval="batch")
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    OneCycleLR,
    ReduceLROnPlateau,
    StepLR,
)

from trainloop import Learner, RunConfig, UsageError, hookimpl
from trainloop.monitor import Monitor, add_monitor_options

SCHEDULES = ("none", "cosine", "onecycle", "step", "plateau")
CHECKPOINT_KEY = "scheduler"
EPOCH_LR_KEY = "scheduler_epoch_lr"  # the ``lr`` metric of the epoch in progress
SHAPE_KEYS = (
    "T_max",
    "total_steps",
    "_schedule_phases",
    "step_size",
    "gamma",
    "factor",
    "patience",
)
"""Scheduler attributes that a resume takes from this run's options, not the checkpoint."""
Factory = Callable[..., Any]


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("lr_scheduler")
    group.add_argument(
        "--lr-schedule",
        choices=SCHEDULES,
        default="none",
        help="learning-rate schedule (default: none)",
    )
    group.add_argument(
        "--lr-step-size",
        type=int,
        default=None,
        metavar="N",
        help="step: epochs between decays (default: a third of the epochs)",
    )
    group.add_argument(
        "--lr-gamma",
        type=float,
        default=0.1,
        metavar="G",
        help="step: decay factor; plateau: factor applied on a plateau (default: 0.1)",
    )
    group.add_argument(
        "--lr-max",
        type=float,
        default=None,
        metavar="LR",
        help="onecycle: the peak learning rate (default: the optimizer's lr)",
    )
    group.add_argument(
        "--lr-patience",
        type=int,
        default=2,
        metavar="N",
        help="plateau: epochs without improvement before a decay (default: 2)",
    )
    add_monitor_options(parser)


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    if options.lr_schedule == "none":
        return
    if options.lr_step_size is not None and options.lr_step_size < 1:
        raise UsageError(
            f"--lr-step-size {options.lr_step_size}: give a number of epochs, at least 1"
        )
    if not 0 < options.lr_gamma <= 1:
        raise UsageError(f"--lr-gamma {options.lr_gamma}: give a factor in (0, 1]")
    if options.lr_max is not None and not options.lr_max > 0:
        raise UsageError(f"--lr-max {options.lr_max}: give a positive learning rate")
    if options.lr_patience < 0:
        raise UsageError(f"--lr-patience {options.lr_patience}: give a number of epochs, 0 or more")
    monitor = Monitor(options.monitor, options.mode) if options.lr_schedule == "plateau" else None
    schedule = NamedSchedule(
        options.lr_schedule,
        step_size=options.lr_step_size,
        gamma=options.lr_gamma,
        max_lr=options.lr_max,
        patience=options.lr_patience,
        mode=monitor.mode if monitor is not None else "min",
        accumulate=getattr(options, "accumulate", 1),
    )
    plugin = LRScheduler(schedule, interval=schedule.interval, monitor=monitor)
    config.plugin_manager.register(plugin, "lr_scheduler.schedule")


class LRScheduler:
    """Makes a learning-rate scheduler when ``fit`` begins and steps it.

    Args:
        factory: ``factory(optimizer) -> scheduler``, such as
            ``functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3)``; a
            factory with a ``learner`` parameter is called as
            ``factory(optimizer, learner=learner)``.
        interval: ``"epoch"`` (step in ``on_epoch_end``) or ``"batch"`` (step after
            each optimizer step, in ``on_step_end``).
        monitor: for ``ReduceLROnPlateau``, the metric it watches: a
            :class:`~trainloop.monitor.Monitor` or a metric name (default
            ``valid_loss``). Its mode must agree with the scheduler's.

    Attributes:
        scheduler: the scheduler of the current (or last) ``fit``, or ``None``.
    """

    def __init__(
        self, factory: Factory, interval: str = "epoch", monitor: Monitor | str | None = None
    ) -> None:
        if interval not in ("epoch", "batch"):
            raise ValueError(f"LRScheduler(interval={interval!r}): use 'epoch' or 'batch'")
        self.factory = factory
        self.interval = interval
        self.monitor = Monitor(monitor) if isinstance(monitor, str) else monitor
        self.scheduler: Any = None
        self._per_batch = interval == "batch"
        self._fitting = False
        self._pending_state: dict[str, Any] | None = None
        self._epoch_lr: float | None = None
        self._resumed_epoch_lr: float | None = None  # of an epoch resumed in its middle
        self._stepper: _StepEveryBatch | None = None

    # --- fit ---------------------------------------------------------------------------

    @hookimpl(tryfirst=True)  # before the checkpoint plugin restores the scheduler's state
    def on_fit_begin(self, learner: Learner) -> None:
        self._per_batch = self.interval == "batch"
        if isinstance(self.factory, NamedSchedule):
            self._per_batch = self._per_batch and self.factory.per_batch(learner)
        self.scheduler = self._make(learner)
        self._fitting = True
        if self._pending_state is not None:
            self.scheduler.load_state_dict(self._pending_state)
            self._pending_state = None
        if self._per_batch:  # a per-batch hook only for a per-batch schedule
            self._stepper = _StepEveryBatch(self.scheduler)
            learner.add_plugin(self._stepper, "lr_scheduler.every-batch")

    def on_fit_end(self, learner: Learner) -> None:
        self._fitting = False
        if self._stepper is not None:
            learner.plugin_manager.unregister(self._stepper)
            self._stepper = None

    def on_epoch_begin(self, learner: Learner) -> None:
        self._epoch_lr = learner.optimizer.param_groups[0]["lr"]
        if self._resumed_epoch_lr is not None:
            self._epoch_lr, self._resumed_epoch_lr = self._resumed_epoch_lr, None

    def on_epoch_end(self, learner: Learner) -> None:
        if self._epoch_lr is not None:
            learner.metrics["lr"] = float(self._epoch_lr)
        if self._per_batch:
            return
        if isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step(self.monitor.value(learner.metrics))
        else:
            self.scheduler.step()

    # --- checkpoints -------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.scheduler is not None:
            checkpoint[CHECKPOINT_KEY] = self.scheduler.state_dict()
            checkpoint[EPOCH_LR_KEY] = self._epoch_lr

    def on_load_checkpoint(self, learner: Learner, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        if learner.iteration:  # resumed in the middle of an epoch: its lr is the one it began with
            self._resumed_epoch_lr = checkpoint.get(EPOCH_LR_KEY)
        if self._fitting and self.scheduler is not None:
            self._load_keeping_shape(learner, state)
        else:  # loaded before fit: applied to the scheduler that fit makes
            self._pending_state = state

    def _load_keeping_shape(self, learner: Learner, state: dict[str, Any]) -> None:
        """Restore the schedule's position, but keep the shape this run asks for.

        A resume with more ``--epochs`` (or another ``--lr-step-size``, ``--lr-gamma``)
        rebuilds the schedule: its length and factors are this run's, its step count the
        checkpoint's, and the learning rates follow the new schedule from that step on.
        Base learning rates come from the optimizer, which the checkpoint plugin has
        given any new ``--lr``.
        """
        fresh = self.scheduler.state_dict()
        self.scheduler.load_state_dict(state)
        reshaped = False
        for key in SHAPE_KEYS:
            if key in fresh and fresh[key] != state.get(key):
                setattr(self.scheduler, key, fresh[key])
                reshaped = True
        groups = learner.optimizer.param_groups
        if hasattr(self.scheduler, "base_lrs") and all("initial_lr" in g for g in groups):
            self.scheduler.base_lrs = [group["initial_lr"] for group in groups]
        closed_form = getattr(self.scheduler, "_get_closed_form_lr", None)
        if reshaped and closed_form is not None:
            for group, lr in zip(groups, closed_form()):
                group["lr"] = lr
        if hasattr(self.scheduler, "_last_lr"):
            self.scheduler._last_lr = [group["lr"] for group in groups]

    # --- helpers -----------------------------------------------------------------------

    def _make(self, learner: Learner) -> Any:
        if _takes_learner(self.factory):
            scheduler = self.factory(learner.optimizer, learner=learner)
        else:
            scheduler = self.factory(learner.optimizer)
        if isinstance(scheduler, ReduceLROnPlateau):
            if self._per_batch:
                raise ValueError("ReduceLROnPlateau steps on epoch metrics: use interval='epoch'")
            if self.monitor is None:
                self.monitor = Monitor("valid_loss", scheduler.mode)
            if self.monitor.mode != scheduler.mode:
                raise ValueError(
                    f"ReduceLROnPlateau(mode={scheduler.mode!r}) disagrees with the monitor of "
                    f"{self.monitor.metric} (mode {self.monitor.mode!r}): make them the same"
                )
            _check_monitor_has_data(self.monitor, learner)
        return scheduler


class _StepEveryBatch:
    """Steps a per-batch schedule after each optimizer step, for an :class:`LRScheduler`."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def on_step_end(self) -> None:
        self.scheduler.step()


class NamedSchedule:
    """The factory behind ``--lr-schedule NAME``: makes the named scheduler for a learner.

    Args:
        name: ``cosine``, ``onecycle``, ``step`` or ``plateau``.
        step_size: step: epochs between decays (``None``: a third of the epochs).
        gamma: step: the decay factor; plateau: the factor applied on a plateau.
        max_lr: onecycle: the peak learning rate (``None``: the optimizer's lr).
        patience: plateau: epochs without improvement before a decay.
        mode: plateau: ``"min"`` or ``"max"``, as the monitor's.
        accumulate: batches per optimizer step (``--accumulate``), to count the steps.
    """

    def __init__(
        self,
        name: str,
        step_size: int | None = None,
        gamma: float = 0.1,
        max_lr: float | None = None,
        patience: int = 2,
        mode: str = "min",
        accumulate: int = 1,
    ) -> None:
        if name not in SCHEDULES[1:]:
            raise ValueError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES[1:])}")
        self.name = name
        self.step_size = step_size
        self.gamma = gamma
        self.max_lr = max_lr
        self.patience = patience
        self.mode = mode
        self.accumulate = max(1, accumulate)

    @property
    def interval(self) -> str:
        """``"batch"`` for the annealing schedules (cosine, onecycle), else ``"epoch"``."""
        return "batch" if self.name in ("cosine", "onecycle") else "epoch"

    def per_batch(self, learner: Learner) -> bool:
        """Whether it is stepped per optimizer step for this learner: an annealing
        schedule whose number of steps is known (the train data has a ``len()``)."""
        return self.interval == "batch" and self.steps_per_epoch(learner) is not None

    def __call__(self, optimizer: torch.optim.Optimizer, learner: Learner) -> Any:
        epochs = max(1, learner.epochs)
        steps_per_epoch = self.steps_per_epoch(learner)
        total = epochs * steps_per_epoch if steps_per_epoch is not None else epochs
        if self.name == "cosine":
            return CosineAnnealingLR(optimizer, T_max=max(1, total))
        if self.name == "onecycle":
            max_lr = self.max_lr if self.max_lr is not None else optimizer.param_groups[0]["lr"]
            return OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(1, total))
        if self.name == "step":
            step_size = self.step_size if self.step_size is not None else max(1, epochs // 3)
            return StepLR(optimizer, step_size=step_size, gamma=self.gamma)
        return ReduceLROnPlateau(
            optimizer, mode=self.mode, factor=self.gamma, patience=self.patience
        )

    def steps_per_epoch(self, learner: Learner) -> int | None:
        """Optimizer steps in one epoch, ``ceil(len(train_data) / accumulate)``, or
        ``None`` when the train data has no ``len()``."""
        try:
            batches = len(learner.train_data)
        except TypeError:
            return None
        return max(1, math.ceil(batches / self.accumulate))


def _takes_learner(factory: Factory) -> bool:
    try:
        return "learner" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def _check_monitor_has_data(monitor: Monitor, learner: Learner) -> None:
    if monitor.metric.startswith("valid_") and learner.valid_data is None:
        raise UsageError(
            f"--monitor {monitor.metric}: this learner has no validation data; "
            "monitor a training metric such as train_loss"
        )
