"""interrupt: Ctrl-C finishes the current batch, saves a checkpoint, then quits.

On by default (``-p no:interrupt`` turns it off). While ``fit`` runs it handles
SIGINT (Ctrl-C) in the main thread, and puts the previous handler back when ``fit``
ends:

* The first Ctrl-C sets ``learner.should_stop`` and prints one line::

      trainloop: Ctrl-C: finishing the current batch, then saving a checkpoint; Ctrl-C again to quit now

  The core stops after the current training batch (during validation, once the
  epoch is over). Then, after every plugin's ``on_fit_end`` (so logs are flushed
  and ``model.pt`` is written), it asks the checkpoint plugin for
  ``checkpoints/interrupt.pt`` through the ``save_checkpoint`` hook, prints where it
  is and how to continue, and raises ``KeyboardInterrupt``: the command line prints
  ``trainloop: interrupted`` and exits with status 130.
* A second Ctrl-C raises ``KeyboardInterrupt`` at once, wherever the run is; nothing
  more is saved (the state may be half-way through a batch). Checkpoint writes are
  atomic, so no file is left truncated.

``interrupt.pt`` and ``last.pt`` hold the same state (the checkpoint plugin also
writes ``last.pt`` when ``fit`` stops cleanly): ``--resume --out RUN_DIR`` or
``--resume RUN_DIR/checkpoints/interrupt.pt`` continues exactly after the last
finished batch. ``interrupt.pt`` stays as a record of the interruption; ``last.pt``
moves on with the resumed run. Without the checkpoint plugin nothing is saved and
the line says so.

Processes forked from the main one after ``fit`` started (DataLoader workers on
Linux) inherit the handler; in them it does nothing, so a terminal's Ctrl-C, which
reaches the whole process group, leaves the workers running until the main process
has finished its batch. Workers started with ``spawn`` or ``forkserver`` (macOS,
Windows) exit on Ctrl-C as torch makes them: the stop then fails with a DataLoader
error unless the batch in hand is the last one needed. Under ``torchrun`` every rank
gets the signal and stops after its own current batch.

Python API::

    from trainloop.plugins.interrupt import Interrupt

    Learner(..., plugins=[Interrupt()])   # a notebook's "interrupt kernel" works the same
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from trainloop import Learner, RunConfig, hookimpl

CHECKPOINT_NAME = "interrupt"
FIRST_LINE = (
    "trainloop: Ctrl-C: finishing the current batch, then saving a checkpoint; "
    "Ctrl-C again to quit now"
)


@hookimpl
def configure(config: RunConfig) -> None:
    config.plugin_manager.register(Interrupt(announce=config.is_main_process), "interrupt.handler")


class Interrupt:
    """Turns the first Ctrl-C during ``fit`` into a clean stop with a checkpoint.

    Args:
        announce: print what happens on standard error (``False`` on all but the
            main process of a distributed run).

    Attributes:
        requested: whether Ctrl-C was pressed during the current ``fit``.
        path: the checkpoint written on the interruption, or ``None``.
    """

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.requested = False
        self.path: Any = None
        self._learner: Learner | None = None
        self._previous: Any = None
        self._installed = False
        self._pid = 0

    def on_fit_begin(self, learner: Learner) -> None:
        self.requested = False
        self.path = None
        self._learner = learner
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may handle signals
        self._pid = os.getpid()
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self._learner is not None:
            self._learner.should_stop = True
        self._say(FIRST_LINE)

    @hookimpl(wrapper=True)  # after every other on_fit_end: logs flushed, files written
    def on_fit_end(self, learner: Learner) -> Iterator[None]:
        self._restore()
        self._learner = None
        result = yield
        if self.requested and learner.exception is None:
            self.path = learner.hook.save_checkpoint(learner=learner, name=CHECKPOINT_NAME)
            if self.path is not None:
                self._say(f"trainloop: saved {self.path}; continue with --resume {self.path}")
            else:
                self._say("trainloop: no checkpoint plugin is enabled, so nothing was saved")
            raise KeyboardInterrupt
        return result

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _say(self, line: str) -> None:
        if not self.announce:
            return
        data = (line + "\n").encode()
        # os.write, not print: a signal handler that prints can land inside another
        # print on the same stream, which raises "reentrant call".
        try:
            os.write(sys.stderr.fileno(), data)
        except (AttributeError, OSError, ValueError):  # a stream without a file (tests)
            sys.stderr.write(line + "\n")
