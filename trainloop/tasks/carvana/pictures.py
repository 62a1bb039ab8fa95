"""Pictures of segmentation results: photo | truth | prediction, for TensorBoard.

:class:`MaskPictures` is the Carvana task's plugin for the ``render_batch`` hook, which
the tensorboard plugin calls once per epoch with the first validation samples and their
predictions (``--tensorboard-images K``). It returns one picture, ``samples``: a row per
sample, each row the photo, the photo with the true mask in translucent green, and the
photo with the predicted mask (``sigmoid(logits) > threshold``) in translucent magenta::

    learner.add_plugin(MaskPictures(threshold=0.5))

:func:`overlay_rows` makes the same picture from tensors, for use outside TensorBoard.
"""

from __future__ import annotations

from typing import Any

import torch

from trainloop import hookimpl

__all__ = ["TRUTH_COLOUR", "PREDICTION_COLOUR", "MaskPictures", "overlay", "overlay_rows"]

TRUTH_COLOUR = (0.1, 0.9, 0.2)
PREDICTION_COLOUR = (1.0, 0.1, 0.9)
ALPHA = 0.5
GAP = 2  # pixels of white between the panels and between the rows


def overlay(
    images: torch.Tensor,
    masks: torch.Tensor,
    colour: tuple[float, float, float],
    alpha: float = ALPHA,
) -> torch.Tensor:
    """``images`` (``N x 3 x H x W`` in [0, 1]) with ``colour`` blended in where ``masks`` is set.

    ``masks`` is ``N x 1 x H x W`` (or ``N x H x W``) of booleans or 0/1 values.
    """
    if masks.dim() == 3:
        masks = masks[:, None]
    tint = torch.tensor(colour, dtype=images.dtype, device=images.device)[None, :, None, None]
    weight = alpha * (masks > 0.5).to(images.dtype)
    return images * (1 - weight) + tint * weight


def overlay_rows(
    images: torch.Tensor,
    masks: torch.Tensor | None,
    logits: torch.Tensor,
    threshold: float = 0.5,
) -> torch.Tensor:
    """One ``3 x H' x W'`` picture: a row per sample of photo | truth | prediction.

    ``images`` are ``N x 3 x H x W``, floats in [0, 1] or uint8 in 0..255; ``masks`` the
    true masks ``N x 1 x H x W`` (``None`` leaves the truth panel out); ``logits`` the
    model's output ``N x 1 x H x W``. Panels are separated by white lines.
    """
    if images.is_floating_point():
        images = images.detach().float().clamp(0, 1)
    else:  # uint8 batches (CarvanaDataset(dtype=torch.uint8))
        images = images.detach().float() / 255.0
    predicted = torch.sigmoid(logits.detach().float()) > threshold
    panels = [images]
    if masks is not None:
        panels.append(overlay(images, masks.detach().float(), TRUTH_COLOUR))
    panels.append(overlay(images, predicted, PREDICTION_COLOUR))
    count, _, height, width = images.shape
    columns = len(panels)
    picture = torch.ones(
        3, count * height + (count - 1) * GAP, columns * width + (columns - 1) * GAP
    )
    for row in range(count):
        top = row * (height + GAP)
        for column, panel in enumerate(panels):
            left = column * (width + GAP)
            picture[:, top : top + height, left : left + width] = panel[row].cpu()
    return picture


class MaskPictures:
    """Implements ``render_batch`` for binary segmentation: photo | truth | prediction.

    Batches are ``(images, masks)``, predictions logits of shape ``N x 1 x H x W``.
    Register it on the Learner; the tensorboard plugin writes its picture each epoch
    under ``valid_images/samples``.

    Args:
        threshold: a pixel is predicted as car where ``sigmoid(logit) > threshold``.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    @hookimpl
    def render_batch(self, batch: Any, pred: Any) -> dict[str, torch.Tensor] | None:
        if not isinstance(batch, (tuple, list)) or not isinstance(pred, torch.Tensor):
            return None
        images = batch[0]
        masks = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        if masks is not None and masks.dim() < 3:  # (image, index) batches: no truth
            masks = None
        return {"samples": overlay_rows(images, masks, pred, self.threshold)}
