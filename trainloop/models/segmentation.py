"""Loss and metric for binary segmentation from logits, as scored on Carvana."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainloop.hookspecs import hookimpl

__all__ = ["bce_dice_loss", "dice", "soft_dice_loss"]


def _per_image(tensor: torch.Tensor) -> torch.Tensor:
    """Flatten everything but the batch dimension: ``(B, 1, H, W)`` -> ``(B, H*W)``."""
    return tensor.reshape(tensor.shape[0], -1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - the Dice coefficient of the sigmoid probabilities, averaged over the images.

    ``smooth`` keeps the ratio defined (and near 1) when mask and prediction are empty.
    """
    probabilities = _per_image(torch.sigmoid(logits))
    target = _per_image(target).to(probabilities.dtype)
    overlap = (probabilities * target).sum(dim=1)
    total = probabilities.sum(dim=1) + target.sum(dim=1)
    return 1.0 - ((2.0 * overlap + smooth) / (total + smooth)).mean()


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on the logits plus the soft Dice loss.

    BCE gives every pixel a gradient; the Dice term optimises the overlap the competition
    scores, whatever the car's share of the image.
    """
    target = target.to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(logits, target)


@torch.no_grad()
def dice(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean Dice over the batch's images, as Kaggle scores Carvana: ``2|X∩Y| / (|X|+|Y|)``.

    The prediction is ``sigmoid(logits) > threshold``; the target is 1 where above 0.5. An
    image with empty truth and empty prediction scores 1. Returns a scalar tensor, the mean
    over the images of this batch (weight it by the batch size to average over batches).
    """
    predicted = _per_image(torch.sigmoid(logits) > threshold)
    truth = _per_image(target > 0.5)
    overlap = (predicted & truth).sum(dim=1).double()
    total = (predicted.sum(dim=1) + truth.sum(dim=1)).double()
    scores = torch.where(total > 0, 2.0 * overlap / total.clamp(min=1), torch.ones_like(total))
    return scores.mean().float()


class FlipTTA:
    """A plugin: test-time augmentation by flips while ``predict`` runs.

    Each batch is also predicted flipped (``"flip"``: left-right; ``"flips"``: left-right,
    up-down and both), each map flipped back, and the probability maps averaged; the
    prediction handed on is the logit of that mean, so whatever thresholds
    ``sigmoid(pred)`` (the submission writer, :func:`dice`) thresholds the mean
    probability. The flipped passes go through the ``forward`` step like the first one,
    so device placement and autocast apply to them too. Set ``active`` to ``True`` to
    apply it to ``validate`` as well (``benchmarks/tta_dice.py`` does, to measure it).

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
