"""Errors that trainloop and its plugins raise on purpose."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input a user can fix: a missing file, a wrong option, a corrupt image.

    The command line turns it into one line on stderr and exit status 2, with no
    traceback (``--debug`` shows it). The message names the file or option and says
    what to do.
    """


class TrainingError(Exception):
    """Training cannot go on, for a reason the message explains (a non-finite loss, say).

    The command line prints the message as one line and exits with status 1.
    """


class CancelBatch(Exception):
    """Raise from a hook to skip the rest of the current batch; ``on_batch_end`` still fires."""


class CancelEpoch(Exception):
    """Raise from a hook to skip the rest of the current epoch; ``on_epoch_end`` still fires."""


class StopFit(Exception):
    """Raise from a hook to end ``fit`` cleanly; a training batch it interrupts counts as done."""


class Stopped(KeyboardInterrupt):
    """A run stopped on a signal, cleanly, with a checkpoint (raised after ``fit``).

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it too. ``signal`` is the
    signal's number; the command line exits with ``128 + signal`` (130 for Ctrl-C, 143
    for SIGTERM), as a shell reports a process that the signal ended.
    """

    def __init__(self, signal: int = 2) -> None:
        super().__init__(signal)
        self.signal = int(signal)
