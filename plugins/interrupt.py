"""interrupt: Ctrl-C and a scheduler's stop signals finish the batch, save a checkpoint, quit.

See docs/plugins/interrupt.md. On by default (``-p no:interrupt`` turns it off).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import select
import signal
import socket
import sys
import threading
import time
import weakref
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
DEFAULT_STOP_TIMEOUT = 60.0
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
    group.add_argument(
        "--stop-timeout",
        type=float,
        default=DEFAULT_STOP_TIMEOUT,
        metavar="SECONDS",
        help="after a stop signal, a run that finishes no batch for SECONDS is stuck (in a "
        "collective whose peer died, say) and ends at once by the signal, without a checkpoint "
        f"(default: {DEFAULT_STOP_TIMEOUT:g}; 0: wait for ever)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    if options.stop_check_every < 1:
        raise UsageError(
            f"--stop-check-every {options.stop_check_every}: give a number of batches, 1 or more"
        )
    if not options.stop_timeout >= 0:
        raise UsageError(
            f"--stop-timeout {options.stop_timeout:g}: give a number of seconds, 0 or more "
            "(0: wait for ever)"
        )
    plugin = Interrupt(
        announce=config.is_main_process,
        stop_signals=parse_signals(options.stop_signals),
        check_every=options.stop_check_every,
        stop_timeout=options.stop_timeout,
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
        stop_timeout: seconds without a finished batch after a stop signal (or the first
            Ctrl-C) after which the run counts as stuck, typically in a collective whose
            peer died, and the signal takes its default action: the process ends at once,
            with no checkpoint. ``0``: wait for ever.

    Attributes:
        requested: the signal that asked for the stop in the current ``fit``, or ``None``.
        path: the checkpoint written on the interruption, or ``None``.
    """

    def __init__(
        self,
        announce: bool = True,
        stop_signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1),
        check_every: int = 10,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        if check_every < 1:
            raise ValueError(f"Interrupt(check_every={check_every}): give 1 or more")
        if not stop_timeout >= 0:
            raise ValueError(f"Interrupt(stop_timeout={stop_timeout}): give 0 or more seconds")
        self.announce = announce
        self.stop_signals = tuple(stop_signals)
        self.check_every = check_every
        self.stop_timeout = stop_timeout
        self.requested: signal.Signals | None = None
        self.path: Any = None
        self._learner: Learner | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._pid = 0
        self._distributed = False
        self._pending: tuple[Any, Any] | None = None  # the all_reduce of the last check
        self._watchdog: _Watchdog | None = None

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
        if self.stop_timeout > 0:
            self._watchdog = _Watchdog(self, learner)
            if not self._watchdog.start():
                self._watchdog = None

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
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
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


class _Watchdog:
    """Ends the process by a stop signal's default action when the run is stuck after it.

    A main thread blocked in C code (a collective waiting for a process that died) cannot
    run Python's signal handlers, so the signal alone would change nothing until a
    SIGKILL. But Python writes each signal's number to the wakeup fd at once, whatever
    the main thread does: this thread reads it there and then, once a second, looks
    whether a batch has finished (the learner's counters); after ``stop_timeout`` seconds
    without one, it ends the process. Nothing runs per batch.
    """

    def __init__(self, interrupt: Interrupt, learner: Learner) -> None:
        self.interrupt = interrupt
        self.learner: Learner | None = learner
        self.watched = {int(signal.SIGINT), *map(int, interrupt.stop_signals)}
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._thread = threading.Thread(target=self._watch, name="trainloop-stop-watchdog")
        self._thread.daemon = True

    def start(self) -> bool:
        """Watch (call from the main thread); ``False`` if the wakeup fd is taken."""
        previous = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        if previous != -1:  # an event loop's (asyncio): leave it to its owner
            signal.set_wakeup_fd(previous)
            self._close()
            return False
        forget = weakref.WeakMethod(self._forget_in_child)
        os.register_at_fork(after_in_child=lambda: (method := forget()) and method())
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop watching (call from the main thread)."""
        signal.set_wakeup_fd(-1)
        self._writer.send(b"\0")  # no signal has the number 0: the thread's cue to end
        self._thread.join()
        self._close()
        self.learner = None

    def _forget_in_child(self) -> None:
        # A forked DataLoader worker inherits the wakeup fd: its signals are not the run's.
        if self.learner is not None:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:  # forked from another thread than the main one
                pass

    def _close(self) -> None:
        self._reader.close()
        self._writer.close()

    def _progress(self) -> tuple[Any, ...]:
        learner = self.learner
        return (learner.epoch, learner.training, learner.iteration, learner.step)

    def _watch(self) -> None:
        timeout = self.interrupt.stop_timeout
        signum = None
        while True:
            poll = None if signum is None else min(1.0, timeout)
            if select.select([self._reader], [], [], poll)[0]:
                received = self._reader.recv(64)
                if 0 in received:
                    return
                if signum is None:
                    signum = next((n for n in received if n in self.watched), None)
                    progress, since = self._progress(), time.monotonic()
            if signum is None:
                continue
            if self._progress() != progress:
                progress, since = self._progress(), time.monotonic()
            elif time.monotonic() - since >= timeout:
                self.interrupt._say(
                    f"trainloop: {signal.Signals(signum).name}: no batch finished in "
                    f"{timeout:g}s (stuck waiting for another process?); ending now, without "
                    "a checkpoint"
                )
                _end_by(signum)


def _end_by(signum: int) -> None:
    """End this process by the signal's default action, from any thread."""
    try:  # signal.signal works only in the main thread, and that is the stuck one
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal(signum, ctypes.c_void_p(0))  # SIG_DFL
    except (OSError, AttributeError):
        pass
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only where the signal's default action could not be had


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
