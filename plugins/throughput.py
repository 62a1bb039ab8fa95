"""throughput: samples per second and the fraction of time spent waiting for data, per epoch."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import torch

from trainloop import Learner, RunConfig, batch_size, hookimpl

SAMPLES_PER_SECOND = "train_samples_per_second"
"""The key of ``learner.metrics`` for the training phase's samples per second."""
DATA_WAIT = "train_data_wait"
"""The key of ``learner.metrics`` for the fraction of the training phase spent waiting
for the next batch (0 to 1)."""
DATA_BOUND = 0.3
"""Above this fraction of waiting the run is data-bound: one warning says what to try."""
WARN_AFTER = 2.0
"""An epoch's training phase shorter than this many seconds never warns: its figures are
mostly start-up (the first batches, the DataLoader workers), not the run's steady pace."""
_END = object()  # what next() returns once the batches are over


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("throughput")
    group.add_argument(
        "--throughput",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"measure each epoch's {SAMPLES_PER_SECOND} and {DATA_WAIT} (the fraction "
        "of time spent waiting for batches) and warn when the run is data-bound (default: on)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    if config.options.throughput:  # every process: a distributed run sums its figures
        monitor = Throughput(warn=config.is_main_process)
        config.plugin_manager.register(monitor, "throughput.monitor")


@dataclasses.dataclass
class EpochThroughput:
    """What one epoch's training phase did and how long it took (this process's share).

    Attributes:
        epoch: the epoch, from 0.
        samples: samples trained on; ``steps``: batches.
        seconds: the training phase's wall time, from the moment the loop asked for
            its batches to the end of the phase (the device's queued work included).
        waiting: the part of ``seconds`` spent getting the next batch.
    """

    epoch: int
    samples: int
    steps: int
    seconds: float
    waiting: float

    @property
    def samples_per_second(self) -> float:
        """Samples over ``seconds``."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def steps_per_second(self) -> float:
        """Batches over ``seconds`` (optimizer steps too, unless gradients accumulate)."""
        return self.steps / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait(self) -> float:
        """The fraction of ``seconds`` spent waiting for batches, from 0 to 1."""
        return min(self.waiting / self.seconds, 1.0) if self.seconds > 0 else 0.0


class Throughput:
    """Measures each epoch's training throughput and how long the loop waited for data.

    The iterator of training batches is wrapped (the ``iter_train_data`` step, as a
    wrapper around whoever owns it) so that each ``next()`` is timed: two clock reads
    per batch and no hook call, no device sync. The phase's wall time ends at
    ``on_train_end``, after one device sync per epoch, so that on a GPU it counts the
    work still queued. Adds ``train_samples_per_second`` and ``train_data_wait`` to
    ``learner.metrics`` at the end of the training phase.

    Args:
        warn: print one warning, the first time an epoch waits for data more than
            ``warn_above`` of its time, with what to try.
        warn_above: the fraction of waiting above which the run is data-bound.
        warn_after: the shortest training phase, in seconds, that may warn: a shorter
            one is mostly start-up, and a tiny run would warn on noise.
        stream: where the warning goes (default: standard error).

    Attributes:
        epochs: an :class:`EpochThroughput` per epoch measured (with steps per second).
    """

    def __init__(
        self,
        warn: bool = True,
        warn_above: float = DATA_BOUND,
        warn_after: float = WARN_AFTER,
        stream: TextIO | None = None,
    ) -> None:
        self.warn = warn
        self._warned = False
        self.warn_above = warn_above
        self.warn_after = warn_after
        self.stream = stream
        self.epochs: list[EpochThroughput] = []
        self._start: float | None = None
        self._waiting = 0.0
        self._samples = 0
        self._steps = 0

    def on_fit_begin(self) -> None:
        self.epochs = []
        self._start = None

    @hookimpl(wrapper=True)
    def iter_train_data(self, learner: Learner) -> Iterator[Iterator[Any]]:
        self._waiting = 0.0
        self._samples = self._steps = 0
        self._start = time.perf_counter()
        batches = yield  # making the iterator (starting DataLoader workers) is waiting too
        self._waiting = time.perf_counter() - self._start
        return self._timed(batches)

    def _timed(self, batches: Iterator[Any]) -> Iterator[Any]:
        # Counted in locals and stored when the iterator ends or is closed (a cancelled
        # epoch): no attribute write per batch.
        clock, waiting, samples, steps = time.perf_counter, 0.0, 0, 0
        try:
            while True:
                start = clock()
                batch = next(batches, _END)
                waiting += clock() - start
                if batch is _END:
                    return
                samples += batch_size(batch)
                steps += 1
                yield batch
        finally:
            self._waiting += waiting
            self._samples, self._steps = samples, steps

    @hookimpl(tryfirst=True)  # the phase ends here: other plugins' end-of-phase work is theirs
    def on_train_end(self, learner: Learner) -> None:
        self._finish(learner)

    def on_epoch_end(self, learner: Learner) -> None:
        if self._start is not None:  # a CancelEpoch skipped on_train_end
            self._finish(learner)

    def _finish(self, learner: Learner) -> None:
        _synchronize(learner.context.device)  # once per epoch: the queued work counts
        seconds = time.perf_counter() - self._start
        self._start = None
        record = EpochThroughput(
            learner.epoch, self._samples, self._steps, seconds, min(self._waiting, seconds)
        )
        self.epochs.append(record)
        samples_per_second, data_wait = record.samples_per_second, record.data_wait
        if learner.context.distributed:  # the run's samples per second, the mean wait
            local = torch.tensor([samples_per_second, data_wait], dtype=torch.float64)
            device = learner.context.device or torch.device("cpu")
            summed = learner.hook.reduce_tensor(learner=learner, tensor=local.to(device))
            samples_per_second, total_wait = summed.tolist()
            data_wait = total_wait / learner.context.world_size
        learner.metrics[SAMPLES_PER_SECOND] = round(samples_per_second, 1)
        learner.metrics[DATA_WAIT] = round(data_wait, 4)
        data_bound = data_wait > self.warn_above and seconds >= self.warn_after
        if self.warn and not self._warned and data_bound:
            self._warned = True  # once a run
            print(
                f"trainloop: warning: epoch {learner.epoch + 1} waited for its batches "
                f"{data_wait:.0%} of its training time: the run is data-bound. Try more "
                "DataLoader workers (num_workers; the Carvana recipe's --workers), "
                "pin_memory=True for a GPU, or uint8 batches made float on the device",
                file=self.stream or sys.stderr,
                flush=True,
            )


def _synchronize(device: torch.device | None) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device is None or device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    synchronize = getattr(backend, "synchronize", None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif synchronize is not None:
        synchronize()
