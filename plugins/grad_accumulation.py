"""grad_accumulation: step the optimizer once every N training batches.

With ``--accumulate N`` the gradients of N consecutive batches add up before the
optimizer steps, and are divided by the number of batches accumulated just before the
step, so the update is the one a single batch N times as large would give (for a loss
that is a mean over the batch and batches of equal size: the update uses the mean of
the batch losses).

* The optimizer steps on every N-th training batch of the epoch (counted from the
  start of the epoch, so a resumed run keeps the same groups) and on the epoch's last
  batch when ``len(train_data)`` is known. An uneven last group (say 2 batches left
  with N = 4) is averaged over the batches it holds.
* When ``len(train_data)`` is unknown, a last group that is not full is dropped at the
  end of the epoch (its gradients are zeroed, with a warning), so it never leaks into
  the next epoch.
* ``learner.loss`` and ``train_loss`` are the per-batch losses, unaffected.
* Per-batch learning-rate schedules and ``learner.step``: a schedule stepped in
  ``on_step_end`` (the lr_scheduler plugin) advances once per optimizer step, i.e.
  once per N batches; ``learner.step`` still counts batches.
* Checkpoints: a checkpoint written in the middle of a group (``--checkpoint-every``,
  Ctrl-C) holds the group's gradients so far under the key ``grad_accumulation``, and a
  resumed run adds the rest of the group to them, so it steps as if never stopped.

Contract with other ``on_step_begin`` implementations: the averaging runs with
``tryfirst`` (like the AMP plugin's unscaling: both only rescale the gradients, so
their order does not matter), and gradient clipping runs as a plain implementation
after both, on the averaged, unscaled gradients.

Option: ``--accumulate N`` (default 1: off; the plugin then registers nothing).
Writes nothing. Python API: ``Learner(..., plugins=[GradAccumulation(4)])``.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from trainloop import Learner, RunConfig, UsageError, hookimpl


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("grad_accumulation")
    group.add_argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="N",
        help="step the optimizer once every N training batches, on their mean gradient "
        "(default: 1, every batch)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    every = config.options.accumulate
    if every < 1:
        raise UsageError(f"--accumulate {every}: give a number of batches, at least 1")
    if every > 1:
        config.plugin_manager.register(GradAccumulation(every), "grad_accumulation.steps")


class GradAccumulation:
    """Accumulates the gradients of ``every`` batches, then steps on their mean.

    Args:
        every: how many training batches make one optimizer step (at least 1).
    """

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"GradAccumulation(every={every}): every must be at least 1")
        self.every = every
        self._accumulated = 0  # batches whose gradients are in .grad since the last step
        self._length: int | None = None
        self._restored = 0  # batches of a group restored from a checkpoint, on resume

    def on_fit_begin(self, learner: Learner) -> None:
        self._accumulated = 0

    def on_train_begin(self, learner: Learner) -> None:
        self._accumulated, self._restored = self._restored, 0
        try:
            self._length = len(learner.train_data)
        except TypeError:
            self._length = None

    @hookimpl
    def should_step(self, learner: Learner) -> bool:
        self._accumulated += 1
        done = learner.iteration + 1  # batches of this epoch done, this one included
        return done % self.every == 0 or done == self._length

    @hookimpl(tryfirst=True)  # a rescaling, like AMP's unscaling: before clipping
    def on_step_begin(self, learner: Learner) -> None:
        count, self._accumulated = self._accumulated, 0
        if count > 1:
            grads = [
                param.grad
                for group in learner.optimizer.param_groups
                for param in group["params"]
                if param.grad is not None
            ]
            if grads:
                torch._foreach_div_(grads, float(count))

    def on_save_checkpoint(self, learner: Learner, checkpoint: dict) -> None:
        if self._accumulated:  # in the middle of a group: its gradients so far
            checkpoint["grad_accumulation"] = {
                "accumulated": self._accumulated,
                "grads": [param.grad for param in _parameters(learner)],
            }

    def on_load_checkpoint(self, learner: Learner, checkpoint: dict) -> None:
        state = checkpoint.get("grad_accumulation")
        if state:
            for param, grad in zip(_parameters(learner), state["grads"], strict=True):
                param.grad = None if grad is None else grad.to(param.device)
            self._restored = state["accumulated"]

    def on_train_end(self, learner: Learner) -> None:
        if self._accumulated:
            warnings.warn(
                f"grad_accumulation: dropped the gradients of the last {self._accumulated} "
                f"training batch(es) of epoch {learner.epoch}: the epoch ended before their "
                "group was complete (the train data has no len(), or its last batch was "
                "cancelled)",
                stacklevel=2,
            )
            learner.hook.zero_grad(learner=learner)
            self._accumulated = 0


def _parameters(learner: Learner) -> list[torch.nn.Parameter]:
    return [param for group in learner.optimizer.param_groups for param in group["params"]]
