"""Test-time augmentation by flips: a plugin that averages a batch's flipped predictions."""

from __future__ import annotations

from typing import Any

import torch

from trainloop.hookspecs import hookimpl

__all__ = ["FlipTTA"]


class FlipTTA:
    """A plugin: test-time augmentation by flips while ``predict`` runs.

    Each batch is also predicted flipped (``"flip"``: left-right; ``"flips"``: left-right,
    up-down and both), each map flipped back, and the probability maps averaged; the
    prediction handed on is the logit of that mean, so whatever thresholds
    ``sigmoid(pred)`` (the submission writer,
    :func:`~trainloop.tasks.carvana.losses.dice`) thresholds the mean probability. The
    flipped passes go through the ``forward`` step like the first one, so device
    placement and autocast apply to them too. Set ``active`` to ``True`` to apply it to
    ``validate`` as well (``benchmarks/tta_dice.py`` does, to measure it).

    Args:
        mode: ``"flip"`` (2 passes per batch) or ``"flips"`` (4 passes).
    """

    FLIPS = {"flip": ((3,),), "flips": ((3,), (2,), (2, 3))}

    def __init__(self, mode: str = "flip") -> None:
        if mode not in self.FLIPS:
            raise ValueError(f"FlipTTA(mode={mode!r}): use one of {', '.join(self.FLIPS)}")
        self.mode = mode
        self.active = False
        self._inside = False

    def on_predict_begin(self) -> None:
        self.active = True

    def on_predict_end(self) -> None:
        self.active = False

    @hookimpl(wrapper=True)
    def forward(self, learner: Any, batch: Any) -> Any:
        pred = yield
        if not self.active or self._inside or learner.training:
            return pred
        images, rest = (
            (batch[0], tuple(batch[1:])) if isinstance(batch, (tuple, list)) else (batch, None)
        )
        total = torch.sigmoid(pred.float())
        self._inside = True  # the flipped passes below come through this wrapper too
        try:
            for dims in self.FLIPS[self.mode]:
                flipped = images.flip(dims)
                other = learner.hook.forward(
                    learner=learner, batch=(flipped, *rest) if rest is not None else flipped
                )
                total += torch.sigmoid(other.float()).flip(dims)
        finally:
            self._inside = False
        mean = total / (len(self.FLIPS[self.mode]) + 1)
        return torch.logit(mean, eps=1e-6).to(pred.dtype)
