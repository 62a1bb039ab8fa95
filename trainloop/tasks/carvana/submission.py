"""The Kaggle submission, ``submit.csv.gz``: one ``img,rle_mask`` row per test photo,
streamed while predicting."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from trainloop.plugins.predictions import PredictionWriter
from trainloop.tasks.carvana.rle import rle_encode

__all__ = ["FILE_NAME", "HEADER", "ImageSet", "SubmissionWriter"]

FILE_NAME = "submit.csv.gz"
HEADER = ("img", "rle_mask")


class ImageSet(Protocol):
    """What :class:`SubmissionWriter` needs of a dataset: names and original sizes."""

    names: Sequence[str]

    def original_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of image ``index``."""
        ...


class SubmissionWriter(PredictionWriter):
    """Writes ``img,rle_mask`` rows of a gzipped CSV, one per image, during ``predict``.

    For each image of a batch: the probability map (``sigmoid(logits)``, or the
    prediction as it is with ``logits=False``), resized (bilinear) to the image's original
    size, thresholded, and run-length encoded the Kaggle way
    (:func:`~trainloop.tasks.carvana.rle.rle_encode`). The batches carry which image each
    sample is, ``(images, indices)``, as ``CarvanaDataset(split="test")`` gives them.
    Rows come in the dataset's order and the file gets its name only when ``predict``
    succeeds (:class:`~trainloop.plugins.predictions.PredictionWriter`).

    Args:
        path: the file to write; ``None``: ``learner.run_dir / "submit.csv.gz"``.
        images: a dataset with ``names`` (the ``img`` column, such as
            ``"0004d4463b50_01.jpg"``) and ``original_size(index) -> (width, height)``,
            such as the test split of ``CarvanaDataset``; or a sequence of
            ``(name, (width, height))`` pairs. Index ``i`` of a batch's indices is
            image ``i`` here.
        threshold: foreground where the probability is above it, in (0, 1).
        logits: whether predictions are logits (a sigmoid makes them probabilities) or
            already probabilities.
        write: whether this process writes; ``None``: the main process only.
        compresslevel: gzip's level, 1 (fast) to 9 (small); 6 is gzip's own default.
    """

    header = HEADER
    file_name = FILE_NAME

    def __init__(
        self,
        path: str | os.PathLike | None,
        images: ImageSet | Sequence[tuple[str, tuple[int, int]]],
        threshold: float = 0.5,
        *,
        logits: bool = True,
        write: bool | None = None,
        compresslevel: int = 6,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"SubmissionWriter threshold {threshold}: use a value in (0, 1)")
        if hasattr(images, "names") and hasattr(images, "original_size"):
            names: Sequence[str] = images.names
            self._size_of = images.original_size
        else:
            pairs = list(images)
            names = [name for name, _ in pairs]
            sizes = [tuple(size) for _, size in pairs]
            self._size_of = sizes.__getitem__
        super().__init__(path, names, write=write, compresslevel=compresslevel)
        self.threshold = threshold
        self.logits = logits

    def rows(self, batch: Any, pred: Any) -> Iterator[tuple[int, tuple[str]]]:
        """``(index, (rle,))`` for each image of a batch ``(images, indices)``."""
        indices = _indices_of(batch)
        probabilities = _maps_of(pred, len(indices))
        if self.logits:
            probabilities = torch.sigmoid(probabilities)
        for position, index in enumerate(indices):
            yield index, (self.encode(probabilities[position], index),)

    def encode(self, probability: torch.Tensor, index: int) -> str:
        """The RLE string of one ``H x W`` probability map, at image ``index``'s size."""
        width, height = self._size_of(index)
        probability = probability.float()
        if tuple(probability.shape) != (height, width):
            shrinking = height < probability.shape[0] or width < probability.shape[1]
            probability = F.interpolate(
                probability[None, None],
                size=(height, width),
                mode="bilinear",
                align_corners=False,
                antialias=shrinking,
            )[0, 0]
        mask = (probability > self.threshold).cpu().numpy()
        return rle_encode(mask)


def _indices_of(batch: Any) -> list[int]:
    """The dataset indices a batch carries as its second element."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        indices = batch[1]
        if (
            isinstance(indices, torch.Tensor)
            and indices.dim() <= 1
            and not indices.is_floating_point()
        ):
            return [int(index) for index in indices.reshape(-1).tolist()]
        if isinstance(indices, (list, tuple, np.ndarray)):
            return [int(index) for index in indices]
    raise TypeError(
        "SubmissionWriter needs batches of (images, indices), the indices of the images "
        "in its dataset: use a dataset whose items are (image, index), such as "
        'CarvanaDataset(split="test")'
    )


def _maps_of(pred: Any, count: int) -> torch.Tensor:
    """``pred`` as ``count`` maps ``H x W``: from ``N x 1 x H x W`` or ``N x H x W``."""
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"SubmissionWriter expects tensor predictions, got {type(pred).__name__}")
    if pred.dim() == 4 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.dim() != 3 or pred.shape[0] != count:
        raise ValueError(
            f"SubmissionWriter expects one map per image, N x 1 x H x W or N x H x W with "
            f"N = {count} indices in the batch; got predictions of shape {tuple(pred.shape)}"
        )
    return pred
