"""early_stopping: end ``fit`` when the monitored metric stops improving.

With ``--early-stop-patience N`` (0, the default, is off and registers nothing), fit
ends after N epochs in a row in which the monitored metric (``--monitor``, default
``valid_loss``; ``--mode`` min, max or auto, shared with the best checkpoint and the
plateau schedule) did not improve on its best by more than ``--early-stop-min-delta``.
A non-finite value (NaN) never counts as an improvement.

It stops by setting ``learner.should_stop`` in ``on_epoch_end`` (``trylast``, so it
sees the metrics every plugin added), so the epoch still ends normally for every
other plugin (metrics, checkpoints, TensorBoard), and ``fit`` returns after it. It
prints one line saying why (on the main process) and keeps it in
``EarlyStopping.reason``; ``stopped_epoch`` is the epoch after which it stopped.

Checkpoints: its best value, the epoch of the best and the count of epochs without
improvement go under the key ``early_stopping``, so a resumed run keeps counting.

Python API::

    EarlyStopping(monitor=Monitor("valid_accuracy", min_delta=0.001), patience=3)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from trainloop import Learner, RunConfig, UsageError, hookimpl
from trainloop.monitor import Monitor, add_monitor_options

CHECKPOINT_KEY = "early_stopping"


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("early_stopping")
    group.add_argument(
        "--early-stop-patience",
        type=int,
        default=0,
        metavar="N",
        help="stop after N epochs without improvement of --monitor (default: 0, off)",
    )
    group.add_argument(
        "--early-stop-min-delta",
        type=float,
        default=0.0,
        metavar="DELTA",
        help="how much better --monitor must get to count as an improvement (default: 0)",
    )
    add_monitor_options(parser)


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    patience, min_delta = options.early_stop_patience, options.early_stop_min_delta
    if patience < 0:
        raise UsageError(f"--early-stop-patience {patience}: give a number of epochs (0 is off)")
    if min_delta < 0:
        raise UsageError(f"--early-stop-min-delta {min_delta}: give a number, 0 or more")
    if patience > 0:
        monitor = Monitor(options.monitor, options.mode, min_delta=min_delta)
        plugin = EarlyStopping(monitor, patience, verbose=config.is_main_process)
        config.plugin_manager.register(plugin, "early_stopping.stopper")


class EarlyStopping:
    """Ends ``fit`` once ``monitor`` has not improved for ``patience`` epochs.

    Args:
        monitor: the metric to watch (a :class:`~trainloop.monitor.Monitor`, whose
            ``min_delta`` sets how much better counts as better), or its name.
        patience: epochs without improvement to allow (at least 1).
        verbose: print a line when it stops.

    Attributes:
        wait: epochs in a row without improvement so far.
        best_epoch: the epoch of the best value (``monitor.best``), or ``None``.
        stopped_epoch: the epoch after which it stopped ``fit``, or ``None``.
        reason: why it stopped, or ``None``.
    """

    def __init__(
        self, monitor: Monitor | str = "valid_loss", patience: int = 3, verbose: bool = True
    ) -> None:
        if patience < 1:
            raise ValueError(f"EarlyStopping(patience={patience}): patience must be at least 1")
        self.monitor = Monitor(monitor) if isinstance(monitor, str) else monitor
        self.patience = patience
        self.verbose = verbose
        self.wait = 0
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.reason: str | None = None

    @hookimpl(tryfirst=True)  # reset before the checkpoint plugin restores the state
    def on_fit_begin(self, learner: Learner) -> None:
        if self.monitor.metric.startswith("valid_") and learner.valid_data is None:
            raise UsageError(
                f"--monitor {self.monitor.metric}: this learner has no validation data; "
                "monitor a training metric such as train_loss"
            )
        self.monitor.best = None
        self.wait = 0
        self.best_epoch = self.stopped_epoch = None
        self.reason = None

    @hookimpl(trylast=True)  # after every plugin has added its metrics
    def on_epoch_end(self, learner: Learner) -> None:
        if self.monitor.update(learner.metrics):
            self.wait = 0
            self.best_epoch = learner.epoch
            return
        self.wait += 1
        if self.wait < self.patience:
            return
        learner.should_stop = True
        self.stopped_epoch = learner.epoch
        if self.monitor.best is None:
            best = "no finite value yet"
        else:
            best = f"best {self.monitor.best:.6g} at epoch {self.best_epoch}"
        self.reason = (
            f"early stopping after epoch {learner.epoch}: {self.monitor.metric} has not "
            f"improved for {self.wait} epoch(s) ({best}; mode {self.monitor.mode}, "
            f"min delta {self.monitor.min_delta:g})"
        )
        if self.verbose:
            print(self.reason, file=sys.stdout, flush=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "best": self.monitor.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is not None:
            self.monitor.best = state["best"]
            self.best_epoch = state["best_epoch"]
            self.wait = int(state["wait"])
