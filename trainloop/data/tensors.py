"""Batches sliced from tensors that already sit in memory.

A ``DataLoader`` over a per-sample dataset pays a Python call and a ``torch.stack`` for
every sample. When the whole data set is already a few tensors (MNIST is 60,000 x 784
floats), slicing a batch out of them is one indexing operation per tensor instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class TensorBatches:
    """An in-memory iterable of batches: tuples of tensors sliced with the same index.

    Each pass yields ``len(self)`` tuples ``(tensors[0][index], tensors[1][index], ...)``.
    Without shuffling a batch is a view of consecutive rows (no copy). With shuffling,
    ``iter()`` draws one permutation with ``torch.randperm`` from the global torch RNG,
    right away rather than at the first batch, so that restoring the global RNG state
    before ``iter()`` replays the same order (this is what an exact resume relies on).

    Args:
        *tensors: one or more tensors with the same size in their first dimension.
        batch_size: samples per batch, at least 1.
        shuffle: draw a new order of the samples at every ``iter()``.
        drop_last: leave out the last batch when it is smaller than ``batch_size``.

    Example:
        >>> x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
        >>> batches = TensorBatches(x, y, batch_size=4)
        >>> len(batches)
        3
        >>> [batch_y.tolist() for _, batch_y in batches]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        >>> len(TensorBatches(x, y, batch_size=4, drop_last=True))
        2
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
    ) -> None:
        if not tensors:
            raise ValueError("TensorBatches needs at least one tensor.")
        for position, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(
                    f"TensorBatches: argument {position} must be a tensor, "
                    f"got {type(tensor).__name__}."
                )
            if tensor.dim() == 0:
                raise ValueError(
                    f"TensorBatches: argument {position} is a 0-d tensor; it needs a first "
                    "dimension to slice batches from."
                )
        sizes = [len(tensor) for tensor in tensors]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"TensorBatches: all tensors must have the same size in dimension 0, got {sizes}."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"TensorBatches: batch_size must be an integer >= 1, got {batch_size!r}."
            )
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_samples = sizes[0]

    def __len__(self) -> int:
        """The number of batches in one pass."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # Not a generator function: the permutation must be drawn now, at iter(), not at
        # the first next(), so that the RNG state saved just before iter() replays it.
        if self.shuffle:
            return self._shuffled_batches(torch.randperm(self.num_samples))
        return self._sequential_batches()

    def _batch_starts(self) -> range:
        return range(0, len(self) * self.batch_size, self.batch_size)

    def _sequential_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in self._batch_starts():
            stop = start + self.batch_size
            yield tuple(tensor[start:stop] for tensor in self.tensors)

    def _shuffled_batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
        # One copy of the order per device, so that tensors on a GPU are not indexed
        # with a CPU index (an implicit host-to-device copy per batch and tensor).
        order_on = {tensor.device: order.to(tensor.device) for tensor in self.tensors}
        for start in self._batch_starts():
            stop = start + self.batch_size
            yield tuple(
                tensor.index_select(0, order_on[tensor.device][start:stop])
                for tensor in self.tensors
            )

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(tensor.shape)) for tensor in self.tensors)
        return (
            f"TensorBatches({shapes}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last})"
        )
