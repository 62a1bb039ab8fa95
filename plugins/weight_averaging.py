"""weight_averaging: validate, save and predict with an EMA or SWA of the weights (``--ema``, ``--swa-start``).

See docs/plugins/weight_averaging.md: when the average is updated, which weights each
file holds, BatchNorm statistics under SWA, and why a resume stays exact.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.optim.swa_utils import (
    SWALR,
    AveragedModel,
    get_ema_multi_avg_fn,
    get_swa_multi_avg_fn,
    update_bn,
)

from trainloop import Learner, RunConfig, UsageError, hookimpl
from trainloop.sharded import is_sharded
from trainloop.state import capture_rng_state, set_rng_state

CHECKPOINT_KEY = "weight_averaging"
EMA = "ema"
SWA = "swa"


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weight_averaging")
    group.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="validate, save and predict with an exponential moving average of the weights, "
        "updated after every optimizer step, such as 0.999 (default: 0, off)",
    )
    group.add_argument(
        "--ema-warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EMA: a smaller decay for the first updates, min(DECAY, (1 + n) / (10 + n)) "
        "after n updates (default: on)",
    )
    group.add_argument(
        "--swa-start",
        type=int,
        default=0,
        metavar="EPOCH",
        help="stochastic weight averaging: average the weights at the end of every epoch from "
        "this one on (counted from 1), BatchNorm statistics recomputed (default: 0, off)",
    )
    group.add_argument(
        "--swa-lr",
        type=float,
        default=None,
        metavar="LR",
        help="SWA: from --swa-start on, train at this learning rate (SWALR; default: keep "
        "the optimizer's)",
    )
    group.add_argument(
        "--swa-anneal-epochs",
        type=int,
        default=None,
        metavar="N",
        help="SWA: reach --swa-lr by cosine annealing over N epochs (default: 0, at once)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    decay, start = options.ema, options.swa_start
    if not (math.isfinite(decay) and 0 <= decay < 1):
        raise UsageError(f"--ema {decay}: give a decay in [0, 1), such as 0.999 (0: off)")
    if start < 0:
        raise UsageError(
            f"--swa-start {start}: give the epoch to start averaging at, from 1 (0: off)"
        )
    if decay and start:
        raise UsageError(f"--ema {decay} and --swa-start {start}: use one weight average at a time")
    if options.swa_lr is not None:
        if not start:
            raise UsageError(f"--swa-lr {options.swa_lr}: give --swa-start EPOCH too")
        if not (math.isfinite(options.swa_lr) and options.swa_lr > 0):
            raise UsageError(f"--swa-lr {options.swa_lr}: give a positive learning rate")
    anneal = options.swa_anneal_epochs
    if anneal is not None:
        if options.swa_lr is None:
            raise UsageError(f"--swa-anneal-epochs {anneal}: give --swa-lr LR too")
        if anneal < 0:
            raise UsageError(f"--swa-anneal-epochs {anneal}: give a number of epochs, 0 or more")
    if start > options.epochs > 0:
        raise UsageError(
            f"--swa-start {start}: the run has {options.epochs} epochs (--epochs): start "
            f"averaging at one of them"
        )
    if decay:
        plugin = WeightAveraging(ema=decay, ema_warmup=options.ema_warmup)
    elif start:
        plugin = WeightAveraging(
            swa_start=start, swa_lr=options.swa_lr, swa_anneal_epochs=anneal or 0
        )
    else:
        return
    plugin.verbose = config.is_main_process
    config.plugin_manager.register(plugin, "weight_averaging.average")


class WeightAveraging:
    """Keeps an average of the model's weights and puts it in the model where it is used.

    One of ``ema`` or ``swa_start``:

    Args:
        ema: the decay of an exponential moving average updated after every optimizer
            step (``torch.optim.swa_utils.get_ema_multi_avg_fn``), such as ``0.999``.
        ema_warmup: EMA: use ``min(ema, (1 + n) / (10 + n))`` after ``n`` updates, so
            that the first weights, far from trained, fade out quickly.
        swa_start: stochastic weight averaging: the equal-weight mean of the weights at
            the end of each epoch's training from this epoch on (counted from 1), with
            the BatchNorm statistics recomputed over the training data
            (``torch.optim.swa_utils.update_bn``) before the average is used.
        swa_lr: SWA: from ``swa_start`` on, a ``SWALR`` schedule takes the learning rate
            to this value (``None``: the optimizer's learning rate is left alone).
        swa_anneal_epochs: SWA: epochs of cosine annealing to ``swa_lr`` (0: at once).

    Validation, ``predict``, the model file and the best epoch's weights see the
    averaged weights: they are copied into ``learner.model`` in place (the training
    weights kept aside) when validation or ``predict`` begins and when ``fit`` ends,
    and the training weights are copied back when training goes on. Checkpoints hold
    the training weights as ``model`` and the average under ``weight_averaging``.

    Attributes:
        averaged: the ``AveragedModel`` of the current (or last) ``fit``, or ``None``.
        swapped: whether ``learner.model`` holds the averaged weights now.
    """

    def __init__(
        self,
        ema: float | None = None,
        ema_warmup: bool = True,
        swa_start: int | None = None,
        swa_lr: float | None = None,
        swa_anneal_epochs: int = 0,
    ) -> None:
        if (ema is None) == (swa_start is None):
            raise ValueError("WeightAveraging: give one of ema=DECAY or swa_start=EPOCH")
        if ema is not None and not 0 < ema < 1:
            raise ValueError(f"WeightAveraging(ema={ema}): give a decay in (0, 1)")
        if swa_start is not None and swa_start < 1:
            raise ValueError(f"WeightAveraging(swa_start={swa_start}): count epochs from 1")
        if swa_lr is not None and not swa_lr > 0:
            raise ValueError(f"WeightAveraging(swa_lr={swa_lr}): give a positive learning rate")
        if swa_anneal_epochs < 0:
            raise ValueError(f"WeightAveraging(swa_anneal_epochs={swa_anneal_epochs}): 0 or more")
        self.mode = EMA if ema is not None else SWA
        self.decay = ema
        self.ema_warmup = ema_warmup
        self.swa_start = swa_start
        self.swa_lr = swa_lr
        self.swa_anneal_epochs = swa_anneal_epochs
        self.verbose = False
        self.averaged: AveragedModel | None = None
        self.swapped = False
        self.updates = 0  # = averaged.n_averaged, counted here to read it without a sync
        self._bn_stale = False  # SWA: the average changed since its BatchNorm statistics
        self._swa_scheduler: SWALR | None = None
        self._training_weights: list[torch.Tensor] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._every_step: _AverageEveryStep | None = None

    # --- fit ---------------------------------------------------------------------------

    @hookimpl(tryfirst=True)  # the average exists before the checkpoint plugin restores it
    def on_fit_begin(self, learner: Learner) -> None:
        if is_sharded(learner.model):  # AveragedModel copies the whole model
            raise UsageError(
                f"--{'ema' if self.mode == EMA else 'swa-start'}: weight averaging needs the "
                "whole model in every process; it does not work with a sharded one "
                "(--strategy fsdp): use --strategy ddp"
            )
        self._swap_out(learner)  # a fit after a fit trains on, from the training weights
        self.averaged = AveragedModel(
            learner.model,
            multi_avg_fn=self._ema_update if self.mode == EMA else get_swa_multi_avg_fn(),
            use_buffers=self.mode == EMA,  # SWA recomputes BatchNorm statistics instead
        )
        self.averaged.requires_grad_(False)
        self.updates = 0
        self._bn_stale = False
        self._swa_scheduler = None
        self._training_weights = None
        if self._pending_state is not None:
            self._load(learner, self._pending_state)
            self._pending_state = None
        if self.mode == EMA and self._every_step is None:  # a per-step hook only for EMA
            self._every_step = _AverageEveryStep(self)
            learner.add_plugin(self._every_step, "weight_averaging.every-step")

    @hookimpl(tryfirst=True)  # the model file and what follows fit see the average
    def on_fit_end(self, learner: Learner) -> None:
        if self._every_step is not None:
            learner.plugin_manager.unregister(self._every_step)
            self._every_step = None
        self._swap_in(learner)

    @hookimpl(tryfirst=True)  # SWALR sets the epoch's learning rate before anyone reads it
    def on_epoch_begin(self, learner: Learner) -> None:
        if self.swa_lr is None or self._swa_scheduler is not None or not self._swa_epoch(learner):
            return
        self._swa_scheduler = SWALR(
            learner.optimizer, swa_lr=self.swa_lr, anneal_epochs=self.swa_anneal_epochs
        )

    @hookimpl(tryfirst=True)
    def on_train_begin(self, learner: Learner) -> None:
        self._swap_out(learner)

    @hookimpl(trylast=True)  # after the plugins that finish the epoch's training
    def on_train_end(self, learner: Learner) -> None:
        if self.mode == SWA and self._swa_epoch(learner):
            self.update(learner)

    def on_epoch_end(self) -> None:
        if self._swa_scheduler is not None:
            self._swa_scheduler.step()

    @hookimpl(tryfirst=True)  # every other plugin validates the averaged weights
    def on_valid_begin(self, learner: Learner) -> None:
        self._swap_in(learner)

    @hookimpl(tryfirst=True)  # before the model saver loads the best epoch's (averaged) weights
    def on_predict_begin(self, learner: Learner) -> None:
        self._swap_in(learner)

    def update(self, learner: Learner) -> None:
        """Average the model's current weights in (after a step for EMA, an epoch for SWA)."""
        self.averaged.update_parameters(learner.model)
        self.updates += 1
        self._bn_stale = self.mode == SWA

    def training_state_dict(self, learner: Learner) -> dict[str, torch.Tensor]:
        """The training weights, as ``learner.model.state_dict()`` (which holds the average
        while ``swapped``)."""
        state = learner.model.state_dict()
        if self.swapped:
            training = dict(zip(_names(learner.model), self._training_weights))
            state = {name: training.get(name, value) for name, value in state.items()}
        return state

    def _swa_epoch(self, learner: Learner) -> bool:
        return learner.epoch + 1 >= self.swa_start

    def _ema_update(
        self, averaged: list[torch.Tensor], current: list[torch.Tensor], _: Any
    ) -> None:
        decay = self.decay
        if self.ema_warmup:
            decay = min(decay, (1 + self.updates) / (10 + self.updates))
        get_ema_multi_avg_fn(decay)(averaged, current, None)

    # --- swapping the weights ----------------------------------------------------------

    def _swap_in(self, learner: Learner) -> None:
        """Copy the average into ``learner.model`` in place, keeping the training weights."""
        if self.swapped or self.averaged is None or self.updates == 0:
            return
        if self._bn_stale:
            self._update_bn(learner)
        live = _tensors(learner.model)
        if self._training_weights is None:
            self._training_weights = [tensor.clone() for tensor in live]
        else:
            _copy(self._training_weights, live)
        _copy(live, _tensors(self.averaged.module))
        self.swapped = True

    def _swap_out(self, learner: Learner) -> None:
        """Put the training weights back into ``learner.model``."""
        if not self.swapped:
            return
        _copy(_tensors(learner.model), self._training_weights)
        self.swapped = False

    def _update_bn(self, learner: Learner) -> None:
        """Recompute the average's BatchNorm statistics with one pass over the training data.

        The random states are put back afterwards: the pass draws none of the training's
        random numbers (shuffling, augmentation), so training goes on as without it.
        """
        rng = capture_rng_state(learner.train_data)
        batches = (
            learner.hook.transfer_batch(learner=learner, batch=batch)
            for batch in learner.train_data
        )
        update_bn(batches, self.averaged)
        set_rng_state(rng, learner.train_data)
        self._bn_stale = False

    # --- checkpoints -------------------------------------------------------------------

    @hookimpl(tryfirst=True)  # the other plugins see the checkpoint's final "model"
    def on_save_checkpoint(self, learner: Learner, checkpoint: dict[str, Any]) -> None:
        if self.averaged is None:
            return
        if self.swapped and "model" in checkpoint:  # a resume continues the training weights
            checkpoint["model"] = self.training_state_dict(learner)
        checkpoint[CHECKPOINT_KEY] = {
            "mode": self.mode,
            "averaged": self.averaged.state_dict(),
            "bn_stale": self._bn_stale,
            "swa_scheduler": (
                self._swa_scheduler.state_dict() if self._swa_scheduler is not None else None
            ),
        }

    def on_load_checkpoint(self, learner: Learner, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        if state.get("mode") != self.mode:
            if self.verbose:
                print(
                    f"weight_averaging: the checkpoint holds a {state.get('mode')} average and "
                    f"this run makes a {self.mode} one: it starts a new one",
                    flush=True,
                )
            return
        if self.averaged is None:  # loaded before fit: applied when fit makes the average
            self._pending_state = state
        else:
            self._load(learner, state)

    def _load(self, learner: Learner, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.updates = int(state["averaged"]["n_averaged"])
        self._bn_stale = bool(state["bn_stale"])
        self.swapped = False  # the checkpoint plugin has just loaded the training weights
        if state.get("swa_scheduler") is not None and self.swa_lr is not None:
            self._swa_scheduler = SWALR(
                learner.optimizer, swa_lr=self.swa_lr, anneal_epochs=self.swa_anneal_epochs
            )
            self._swa_scheduler.load_state_dict(state["swa_scheduler"])


class _AverageEveryStep:
    """Updates an EMA after every optimizer step, for a :class:`WeightAveraging`."""

    def __init__(self, owner: WeightAveraging) -> None:
        self.owner = owner

    def on_step_end(self, learner: Learner) -> None:
        self.owner.update(learner)


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters then the buffers, in ``AveragedModel``'s order."""
    return [tensor.detach() for tensor in itertools.chain(model.parameters(), model.buffers())]


def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


def _names(model: torch.nn.Module) -> Iterator[str]:
    """The ``state_dict`` names of :func:`_tensors`, in the same order."""
    return itertools.chain(
        (name for name, _ in model.named_parameters()), (name for name, _ in model.named_buffers())
    )
