"""progress: a rich progress bar per epoch and a table of each epoch's metrics.

On a terminal it draws a bar with the running loss and speed; when output is not a
terminal (CI logs, files) it prints plain lines instead: one every ``--progress-every``
seconds during an epoch and one per epoch with its metrics.

A background thread refreshes the bar ten times a second (plain lines: every
``--progress-every`` seconds), reading the learner's state then: the plugin implements
no per-batch hook, so it adds nothing to the per-batch path and no per-batch device
sync.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any, TextIO

from trainloop import Learner, RunConfig, UsageError, hookimpl

REFRESH_SECONDS = 0.1


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("progress")
    group.add_argument(
        "--progress",
        choices=("auto", "bar", "plain"),
        default="auto",
        help="bar on a terminal, plain lines otherwise (default: auto)",
    )
    group.add_argument(
        "--progress-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="plain mode: seconds between lines within an epoch (default: 30)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    if not config.is_main_process:  # only rank 0 of a distributed run shows progress
        return
    options = config.options
    if not options.progress_every > 0:
        raise UsageError(
            f"--progress-every {options.progress_every}: give a number of seconds above 0"
        )
    plugin = Progress(mode=options.progress, plain_every=options.progress_every)
    config.plugin_manager.register(plugin, "progress.display")


class Progress:
    """Shows training progress.

    Args:
        mode: ``"bar"`` (rich), ``"plain"`` (lines), or ``"auto"``: a bar when
            ``stream`` is a terminal.
        plain_every: in plain mode, seconds between progress lines within an epoch.
        stream: where to write (default: standard output).
    """

    def __init__(self, mode: str = "auto", plain_every: float = 30.0, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "plain"
        self.mode = mode
        self.plain_every = plain_every
        self._bar: Any = None
        self._task: Any = None
        self._columns: list[str] = []

    # --- fit ---------------------------------------------------------------------------

    def on_fit_begin(self, learner: Learner) -> None:
        self._columns = []
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._console = Console(file=self.stream)
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[speed]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self._console,
                transient=True,
            )
            self._bar.start()

    def on_fit_end(self, learner: Learner) -> None:
        self._stop_refreshing()  # training may have ended with an error mid-epoch
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    # --- epochs ------------------------------------------------------------------------

    def on_train_begin(self, learner: Learner) -> None:
        self._epoch_start = time.perf_counter()
        self._first_iteration = learner.iteration
        self._total = _length(learner.train_data)
        self._label = f"epoch {learner.epoch + 1}/{learner.epochs}"
        if self._bar is not None:
            self._task = self._bar.add_task(
                self._label, total=self._total, completed=learner.iteration, loss="-", speed=""
            )
        # A thread refreshes the display, so the plugin needs no per-batch hook at all.
        self._stop = threading.Event()
        self._refresher = threading.Thread(
            target=self._refresh_until_stopped, args=(learner,), daemon=True
        )
        self._refresher.start()

    def _refresh_until_stopped(self, learner: Learner) -> None:
        seconds = REFRESH_SECONDS if self._bar is not None else self.plain_every
        while not self._stop.wait(seconds):
            self._refresh(learner)

    def _refresh(self, learner: Learner) -> None:
        done = learner.iteration  # read from another thread: close enough for a display
        rate = (done - self._first_iteration) / max(time.perf_counter() - self._epoch_start, 1e-9)
        loss = learner.loss
        text = f"{loss.item():.4f}" if loss is not None else "-"
        if self._bar is not None:
            self._bar.update(self._task, completed=done, loss=text, speed=f"{rate:.1f} batch/s")
        else:
            of_total = f"/{self._total}" if self._total else ""
            print(
                f"{self._label} batch {done}{of_total} loss {text} {rate:.1f} batch/s",
                file=self.stream,
                flush=True,
            )

    def on_train_end(self, learner: Learner) -> None:
        self._stop_refreshing()
        if self._bar is not None and self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None

    def _stop_refreshing(self) -> None:
        refresher = getattr(self, "_refresher", None)
        if refresher is not None:
            self._stop.set()
            refresher.join()
            self._refresher = None

    @hookimpl(trylast=True)  # after every plugin has added its metrics
    def on_epoch_end(self, learner: Learner) -> None:
        seconds = time.perf_counter() - getattr(self, "_epoch_start", time.perf_counter())
        row = {"epoch": learner.epoch + 1, **learner.metrics, "time": seconds}
        if not self._columns:
            self._columns = list(row)
            self._print(_format_row(self._columns, self._columns))
        self._print(_format_row(self._columns, [row.get(column, "") for column in self._columns]))

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def _format_row(columns: list[str], values: list[Any]) -> str:
    cells = []
    for column, value in zip(columns, values):
        width = max(len(column), 10)
        if isinstance(value, float):
            text = f"{value:.2f}s" if column == "time" else f"{value:.6g}"
        else:
            text = str(value)
        cells.append(text.rjust(width))
    return "  ".join(cells)
