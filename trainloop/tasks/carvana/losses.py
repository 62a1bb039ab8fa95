"""Carvana's losses and its metric, Dice, for binary segmentation from logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
