"""predictions: stream a Kaggle segmentation submission, ``submit.csv.gz``, while predicting.

:class:`PredictionWriter` turns each prediction of ``learner.predict`` into one row
``img,rle_mask`` of a gzipped CSV file as soon as its batch is done, so predictions
never pile up in memory (100,064 Carvana test masks at 1918x1280 would be 245 GB as
bytes). For each image of a batch it:

1. takes the probability map, ``sigmoid(logits)`` (or the prediction as it is with
   ``logits=False``);
2. resizes it (bilinear) to the image's original size, read from the image itself
   (``dataset.original_size(index)``, its file header): ``(width, height)`` as image
   files state it, ``(height, width)`` as tensors hold it;
3. thresholds it: a pixel is foreground where the probability is above ``threshold``;
4. run-length encodes it the Kaggle way (:func:`trainloop.rle.rle_encode`) and writes
   the row.

The batches must carry which image each sample is: ``(images, indices)``, as the test
split of :class:`~trainloop.data.carvana.CarvanaDataset` returns them. Rows are in the
images' order (the dataset's order: sorted file names for Carvana), whatever order the
batches come in: a row that comes early waits, as its short RLE string, until the rows
before it are written. Every image must get exactly one prediction.

The file is written as ``submit.csv.gz.partial`` in the same folder and renamed to
``submit.csv.gz`` only when ``predict`` ends without an error (after an ``fsync``), so
a file with the final name is always complete. When ``predict`` fails or is
interrupted, the rows so far stay in ``submit.csv.gz.partial`` (a valid gzip file, to
look at, never to upload) and one line on stderr says so; a run killed outright leaves
that file too. A ``submit.csv.gz`` from an earlier ``predict`` stays until a new one
replaces it.

Only the main process writes: under ``trainloop run`` that is ``config.is_main_process``
(rank 0 of a distributed run), with the Python API rank 0 when ``torch.distributed`` is
initialised; ``write=True`` or ``False`` decides it outright.

Options: none. The recipe owns the threshold (the Carvana recipe's ``--threshold``),
the file name and the data; it passes them to the class::

    from trainloop.plugins.predictions import PredictionWriter

    writer = PredictionWriter(learner.run_dir / "submit.csv.gz", test_dataset, threshold=0.5)
    learner.add_plugin(writer)
    learner.predict(test_loader, keep=False)   # test_loader yields (images, indices)
    learner.plugin_manager.unregister(writer)
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from trainloop import Learner, RunConfig, hookimpl
from trainloop.rle import rle_encode

FILE_NAME = "submit.csv.gz"
PARTIAL_SUFFIX = ".partial"
HEADER = ("img", "rle_mask")

_run_writes: bool | None = None  # config.is_main_process of the current CLI run


@hookimpl
def configure(config: RunConfig) -> None:
    global _run_writes
    _run_writes = config.is_main_process


@hookimpl
def unconfigure() -> None:
    global _run_writes
    _run_writes = None


def is_main_process() -> bool:
    """Whether this process writes files: ``config.is_main_process`` under ``trainloop run``,
    else rank 0 when ``torch.distributed`` is initialised, else ``True``."""
    if _run_writes is not None:
        return _run_writes
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


class ImageSet(Protocol):
    """What :class:`PredictionWriter` needs of a dataset: names and original sizes."""

    names: Sequence[str]

    def original_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of image ``index``."""
        ...


class PredictionWriter:
    """Writes ``img,rle_mask`` rows of a gzipped CSV, one per image, during ``predict``.

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

    Attributes:
        count: the rows written by the current or last ``predict``.
        path: the final file (known once ``predict`` has begun).
    """

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
            raise ValueError(f"PredictionWriter threshold {threshold}: use a value in (0, 1)")
        self.path = Path(path) if path is not None else None
        if hasattr(images, "names") and hasattr(images, "original_size"):
            self._names: Sequence[str] = images.names
            self._size_of = images.original_size
        else:
            pairs = list(images)
            self._names = [name for name, _ in pairs]
            sizes = [tuple(size) for _, size in pairs]
            self._size_of = sizes.__getitem__
        if len(self._names) == 0:
            raise ValueError("PredictionWriter has no images to write rows for")
        self.threshold = threshold
        self.logits = logits
        self.write = write
        self.compresslevel = compresslevel
        self.count = 0
        self._file: Any = None
        self._csv: Any = None
        self._partial: Path | None = None
        self._pending: dict[int, tuple[str, str]] = {}
        self._writes = False

    @property
    def partial_path(self) -> Path | None:
        """Where the rows go until ``predict`` is over: ``<path>.partial``."""
        return self._partial

    # --- predict -----------------------------------------------------------------------

    def on_predict_begin(self, learner: Learner) -> None:
        self._writes = is_main_process() if self.write is None else self.write
        self.count = 0
        self._pending = {}
        if not self._writes:
            return
        if self.path is None:
            if learner.run_dir is None:
                raise ValueError("PredictionWriter needs a path or a learner with run_dir")
            self.path = Path(learner.run_dir) / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        raw = open(self._partial, "wb")  # closed in on_predict_end
        # The name inside the gzip header is the final one, without .gz.
        # mtime 0: the same predictions make the same bytes (`trainloop predict` reproduces
        # a run's submission exactly).
        packed = gzip.GzipFile(
            filename=self.path.name,
            mode="wb",
            fileobj=raw,
            compresslevel=self.compresslevel,
            mtime=0,
        )
        self._raw = raw
        self._file = io.TextIOWrapper(packed, encoding="utf-8", newline="")
        self._csv = csv.writer(self._file, lineterminator="\n")
        self._csv.writerow(HEADER)

    def on_predict_batch_end(self, batch: Any, pred: Any) -> None:
        if not self._writes:
            return
        indices = _indices_of(batch)
        probabilities = _maps_of(pred, len(indices))
        if self.logits:
            probabilities = torch.sigmoid(probabilities)
        for position, index in enumerate(indices):
            self._add(index, self.encode(probabilities[position], index))

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

    def _add(self, index: int, rle: str) -> None:
        if not 0 <= index < len(self._names):
            raise ValueError(
                f"PredictionWriter got index {index}, but it has {len(self._names)} images "
                f"(0 to {len(self._names) - 1})"
            )
        if index < self.count or index in self._pending:
            raise ValueError(f"PredictionWriter got image {index} ({self._names[index]}) twice")
        self._pending[index] = (self._names[index], rle)
        # In order: write every row whose predecessors are all written.
        while self.count in self._pending:
            self._csv.writerow(self._pending.pop(self.count))
            self.count += 1

    def on_predict_end(self, learner: Learner) -> None:
        if self._file is None:
            return
        failed = learner.exception is not None
        complete = not failed and self.count == len(self._names)
        file, self._file = self._file, None
        try:
            file.close()  # ends the gzip stream; the raw file stays open
            if complete:
                self._raw.flush()
                os.fsync(self._raw.fileno())
        finally:
            self._raw.close()
        if complete:
            os.replace(self._partial, self.path)
            return
        if failed:
            print(
                f"trainloop: predictions: predict failed after {self.count} of "
                f"{len(self._names)} rows; the rows so far are in {self._partial} "
                f"(not a submission: {self.path.name} was not written)",
                file=sys.stderr,
                flush=True,
            )
            return
        raise ValueError(
            f"PredictionWriter: predict gave rows for {self.count + len(self._pending)} of "
            f"{len(self._names)} images (the first missing is {self._names[self.count]}): "
            f"predict every image once, with a loader that drops none; the rows so far "
            f"are in {self._partial}"
        )


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
        "PredictionWriter needs batches of (images, indices), the indices of the images "
        "in its dataset: use a dataset whose items are (image, index), such as "
        'CarvanaDataset(split="test")'
    )


def _maps_of(pred: Any, count: int) -> torch.Tensor:
    """``pred`` as ``count`` maps ``H x W``: from ``N x 1 x H x W`` or ``N x H x W``."""
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"PredictionWriter expects tensor predictions, got {type(pred).__name__}")
    if pred.dim() == 4 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.dim() != 3 or pred.shape[0] != count:
        raise ValueError(
            f"PredictionWriter expects one map per image, N x 1 x H x W or N x H x W with "
            f"N = {count} indices in the batch; got predictions of shape {tuple(pred.shape)}"
        )
    return pred
