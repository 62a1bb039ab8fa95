"""nan_guard: stop a run whose loss is NaN or infinite, with one clear line.

See docs/plugins/nan_guard.md.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from typing import Any

import torch

from trainloop import Learner, RunConfig, TrainingError, hookimpl


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("nan_guard")
    group.add_argument(
        "--nan-guard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop at the first non-finite training loss (default: on)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    if config.options.nan_guard:
        config.plugin_manager.register(NanGuard(), "nan_guard.checker")


class NanGuard:
    """Raises :class:`~trainloop.TrainingError` on the first non-finite training loss.

    Args:
        every_batch: check every batch by reading the loss (a device sync off the CPU).
            ``None`` (the default) checks every batch when the loss is on the CPU and
            once per epoch and before each checkpoint otherwise.
    """

    def __init__(self, every_batch: bool | None = None) -> None:
        self.every_batch = every_batch
        self._flags: list[tuple[int, int, torch.Tensor]] = []  # (epoch, batch, isfinite)

    def on_fit_begin(self) -> None:
        self._flags = []

    @hookimpl(tryfirst=True)  # before anything else sees this batch's gradients
    def on_backward_end(self, learner: Learner) -> None:
        loss = learner.loss
        if self.every_batch or (self.every_batch is None and loss.device.type == "cpu"):
            value = loss.item()  # on the CPU: no device sync
            if not math.isfinite(value):
                raise TrainingError(
                    _message(learner.epoch, learner.iteration, f"is {value}")
                    + "; stopped before the optimizer step, nothing was saved from it"
                    + _ADVICE
                )
        else:  # kept on the device: read once per epoch, not once per batch
            self._flags.append(
                (learner.epoch, learner.iteration, torch.isfinite(loss.detach()).all())
            )

    @hookimpl(tryfirst=True)
    def on_epoch_end(self) -> None:
        self.check()

    @hookimpl(tryfirst=True)  # raise before the checkpoint plugin writes anything
    def on_save_checkpoint(self) -> None:
        self.check()

    @hookimpl(wrapper=True)
    def on_fit_end(self, learner: Learner) -> Iterator[None]:
        # A run stopped mid-epoch has unread flags: read them before any plugin saves,
        # so that they see the failure (learner.exception) and save nothing.
        error = None
        if learner.exception is None:
            try:
                self.check()
            except TrainingError as found:
                error = learner.exception = found
        result = yield
        if error is not None:
            raise error
        return result

    def check(self) -> None:
        """Read the pending device flags; raise TrainingError if a loss was non-finite."""
        flags, self._flags = self._flags, []
        if not flags:
            return
        finite = torch.stack([flag for _, _, flag in flags]).cpu()
        if bool(finite.all()):
            return
        epoch, batch, _ = flags[int((~finite).nonzero()[0])]
        raise TrainingError(
            _message(epoch, batch, "is not finite")
            + "; found at the next check (once per epoch and before each checkpoint on an "
            "accelerator): the weights in memory are corrupt, nothing was saved after it" + _ADVICE
        )


_ADVICE = " (lower the learning rate, clip gradients or check the data; --no-nan-guard turns this check off)"


def _message(epoch: int, batch: int, what: Any) -> str:
    return f"training loss {what} at epoch {epoch + 1}, batch {batch + 1} (both counted from 1)"
