"""interrupt: Ctrl-C and a scheduler's stop signals finish the batch, save a checkpoint, quit.

See docs/plugins/interrupt.md. On by default (``-p no:interrupt`` turns it off).
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from trainloop import Learner, RunConfig, UsageError, hookimpl
from trainloop.errors import Stopped

CHECKPOINT_NAME = "interrupt"
STOP_FILE = "stopped.json"
FIRST_LINE = (
    "trainloop: Ctrl-C: finishing the current batch, then saving a checkpoint; "
    "Ctrl-C again to quit now"
)
DEFAULT_STOP_SIGNALS = "SIGTERM,SIGUSR1"
AGREEMENT_NAME = "interrupt.agreement"


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("interrupt")
    group.add_argument(
        "--stop-signals",
        default=DEFAULT_STOP_SIGNALS,
        metavar="NAMES",
        help="signals that stop the run like Ctrl-C: finish the batch, save a checkpoint, "
        f"exit with 128 + the signal's number (default: {DEFAULT_STOP_SIGNALS}; none: only Ctrl-C)",
    )
    group.add_argument(
        "--stop-check-every",
        type=int,
        default=10,
        metavar="N",
        help="under torchrun, agree on a stop across the processes every N training batches "
        "(default: 10)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    if options.stop_check_every < 1:
        raise UsageError(
            f"--stop-check-every {options.stop_check_every}: give a number of batches, 1 or more"
        )
    plugin = Interrupt(
        announce=config.is_main_process,
        stop_signals=parse_signals(options.stop_signals),
        check_every=options.stop_check_every,
    )
    config.plugin_manager.register(plugin, "interrupt.handler")


def parse_signals(text: str) -> tuple[signal.Signals, ...]:
    """``"SIGTERM,SIGUSR1"`` (or ``TERM``, ``15``) as signals; ``"none"``: no signal."""
    if text.strip().lower() in ("", "none"):
        return ()
    found = []
    for name in text.split(","):
        name = name.strip().upper()
        try:
            number = (
                signal.Signals(int(name))
                if name.isdigit()
                else signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
            )
        except (KeyError, ValueError):
            raise UsageError(
                f"--stop-signals {text}: {name!r} is not a signal; give names such as "
                "SIGTERM,SIGUSR1, or none"
            ) from None
        if number in (signal.SIGKILL, signal.SIGSTOP, signal.SIGINT):
            raise UsageError(
                f"--stop-signals {text}: {number.name} cannot be one (SIGINT is Ctrl-C, always "
                "handled; SIGKILL and SIGSTOP cannot be caught)"
            )
        found.append(number)
    return tuple(found)


class Interrupt:
    """Turns the first Ctrl-C, or a stop signal, during ``fit`` into a clean stop.

    The current batch finishes, every plugin's ``on_fit_end`` runs, a checkpoint is
    saved (``checkpoints/interrupt.pt``), ``stopped.json`` in the run folder says why,
    and :class:`~trainloop.errors.Stopped` (a ``KeyboardInterrupt``) tells the command
    line to exit with 128 + the signal's number. A second Ctrl-C quits at once.

    Args:
        announce: print what happens on standard error (``False`` on all but the
            main process of a distributed run).
        stop_signals: the signals handled like the first Ctrl-C (default SIGTERM and
            SIGUSR1, which schedulers send before they preempt a job).
        check_every: in a distributed run, every how many training batches the
            processes agree on whether any of them got a signal (one ``all_reduce`` of
            one number), so that they all stop after the same batch.

    Attributes:
        requested: the signal that asked for the stop in the current ``fit``, or ``None``.
        path: the checkpoint written on the interruption, or ``None``.
    """

    def __init__(
        self,
        announce: bool = True,
        stop_signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1),
        check_every: int = 10,
    ) -> None:
        if check_every < 1:
            raise ValueError(f"Interrupt(check_every={check_every}): give 1 or more")
        self.announce = announce
        self.stop_signals = tuple(stop_signals)
        self.check_every = check_every
        self.requested: signal.Signals | None = None
        self.path: Any = None
        self._learner: Learner | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._pid = 0
        self._distributed = False
        self._pending: tuple[Any, Any] | None = None  # the all_reduce of the last check

    def on_fit_begin(self, learner: Learner) -> None:
        self.requested = None
        self.path = None
        self._pending = None
        self._learner = learner
        self._distributed = _world_size() > 1
        if self._distributed and not learner.plugin_manager.has_plugin(AGREEMENT_NAME):
            # A per-batch hook only where it is needed: one process alone stops at once.
            learner.add_plugin(_StopAgreement(self), AGREEMENT_NAME, origin="interrupt")
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may handle signals
        self._pid = os.getpid()
        for number in (signal.SIGINT, *self.stop_signals):
            self._previous[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides
        if self.requested is not None:
            if signum == signal.SIGINT and self.requested == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: quit now
            return  # a scheduler repeating its signal: the stop is under way
        self.requested = signal.Signals(signum)
        if self._learner is not None and not self._distributed:
            self._learner.should_stop = True  # with several processes, on_batch_end agrees
        if signum == signal.SIGINT:
            self._say(FIRST_LINE)
        else:
            self._say(
                f"trainloop: {self.requested.name}: finishing the current batch, then saving a "
                "checkpoint"
            )

    def agree(self, learner: Learner) -> None:
        """Stop on every process if any process had got a signal at the previous check.

        Each check starts an asynchronous ``all_reduce`` of this process's flag and reads
        the one started at the check before, which has long finished: no process waits
        for the others here, and all of them decide on the same batch.
        """
        import torch
        import torch.distributed as dist

        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            if flag.item():
                self.requested = self.requested or signal.Signals(int(flag.item()))
                learner.should_stop = True
                self._pending = None
                return
        flag = torch.tensor([int(self.requested or 0)], device=_device_of(learner))
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)

    @hookimpl(wrapper=True)  # after every other on_fit_end: logs flushed, files written
    def on_fit_end(self, learner: Learner) -> Iterator[None]:
        self._restore()
        self._learner = None
        if learner.plugin_manager.has_plugin(AGREEMENT_NAME):
            learner.plugin_manager.unregister(name=AGREEMENT_NAME)
        if self._pending is not None:  # every process started it: every process waits for it
            try:
                self._pending[0].wait()
            except Exception:
                if learner.exception is None:
                    raise  # otherwise the error that ended fit is the one to report
            self._pending = None
        result = yield
        if self.requested is not None and learner.exception is None:
            self.path = learner.hook.save_checkpoint(learner=learner, name=CHECKPOINT_NAME)
            if self.path is not None:
                self._say(f"trainloop: saved {self.path}; continue with --resume {self.path}")
            else:
                self._say("trainloop: no checkpoint plugin is enabled, so nothing was saved")
            self._record(learner)
            raise Stopped(self.requested)
        return result

    def _record(self, learner: Learner) -> None:
        """Say in the run folder why the run stopped (``stopped.json``)."""
        if not self.announce or learner.run_dir is None:
            return
        from trainloop.run_folder import write_json_atomic

        record = {
            "reason": self.requested.name,
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "epoch": learner.epoch,
            "step": learner.step,
            "checkpoint": str(self.path) if self.path is not None else None,
            "exit_status": 128 + int(self.requested),
        }
        write_json_atomic(learner.run_dir / STOP_FILE, record)

    def _restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

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


class _StopAgreement:
    """The per-batch half of :class:`Interrupt` in a distributed run.

    The processes must stop after the same batch, or the next collective waits forever:
    every ``check_every`` training batches they compare their flags (asynchronously).
    """

    def __init__(self, interrupt: Interrupt) -> None:
        self.interrupt = interrupt

    def on_batch_end(self, learner: Learner) -> None:
        if learner.training and (learner.step + 1) % self.interrupt.check_every == 0:
            self.interrupt.agree(learner)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device_of(learner: Learner) -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
