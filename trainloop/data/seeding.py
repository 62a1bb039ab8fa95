"""Data loading whose random numbers come from ``(seed, epoch)``: exact resumes with any workers."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    get_worker_info,
)

from trainloop.hookspecs import hookimpl

__all__ = [
    "SeededDataset",
    "SeededSampler",
    "SetDataEpoch",
    "derive_seed",
    "resume_exactness_warning",
    "seeded_loader",
    "seeded_rng",
    "set_data_epoch",
]

# Samplers whose order comes from the global RNG or a generator the checkpoint saves,
# or from (seed, epoch): replaying an epoch from the saved states gives the same order.
_REPLAYABLE_SAMPLERS = (
    SequentialSampler,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    DistributedSampler,
)


def derive_seed(*keys: int) -> int:
    """A seed in ``[0, 2**63)`` mixed from integer keys, such as ``(seed, epoch)``.

    Different keys give unrelated seeds (NumPy's ``SeedSequence`` mixes them), so
    ``derive_seed(0, 1)`` and ``derive_seed(1, 0)`` do not collide as ``seed + epoch``
    would. Negative keys are allowed.

    Example:
        >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)
        True
    """
    entropy = [int(key) % 2**64 for key in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with Python's, NumPy's and torch's CPU RNG seeded with ``seed``.

    Their states are put back afterwards, so the block neither depends on nor changes
    the random numbers the rest of the process draws. Seeding is as
    ``trainloop run --seed`` does it on the CPU: ``random.seed(seed)``,
    ``np.random.seed(seed % 2**32)``, ``torch.manual_seed(seed)`` (CUDA's generators
    are left alone).
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    _seed_globals(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # The CPU generator only: torch.manual_seed also visits every other backend, which
    # costs a hundred times as much, per sample.
    torch.default_generator.manual_seed(seed)


class SeededSampler(Sampler[tuple[int, int]]):
    """Each epoch, every index of a data set once, each with the seed of its sample.

    The order of epoch ``e`` (shuffled with ``shuffle=True``, else ``0, 1, 2, ...``) and
    the per-sample seeds are drawn from a generator seeded with ``(seed, e)`` only, so
    they are the same in a run resumed at any point and whichever process loads the
    sample. The sampler yields ``(index, sample_seed)`` pairs: wrap the data set in
    :class:`SeededDataset`, which draws each item's random numbers (augmentation)
    from its seed.

    Call :meth:`set_epoch` before each epoch (the :class:`SetDataEpoch` plugin does it
    from ``learner.epoch``); without it, each ``iter()`` takes the epoch after the one
    before, which a resumed run cannot know.

    With ``world_size > 1`` (see :meth:`shard`) the epoch's sequence is padded by
    repeating its first pairs to a multiple of ``world_size`` and process ``rank`` takes
    every ``world_size``-th pair from position ``rank``, as ``DistributedSampler`` does;
    a sample gets the same seed whatever the number of processes.

    Args:
        data: the data set, or its length.
        seed: the run's seed.
        shuffle: a new order each epoch (training); ``False`` keeps the data set's order.
        rank: this process's share (distributed training).
        world_size: how many processes share the data.

    Example:
        >>> sampler = SeededSampler(4, seed=0)
        >>> sampler.set_epoch(3)
        >>> first = list(sampler)
        >>> sampler.set_epoch(3)
        >>> first == list(sampler) and sorted(index for index, _ in first) == [0, 1, 2, 3]
        True
    """

    def __init__(
        self,
        data: Sized | int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        length = data if isinstance(data, int) else len(data)
        if length < 0:
            raise ValueError(f"SeededSampler: a data set cannot have {length} samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"SeededSampler: rank {rank} is not in [0, world_size={world_size})")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order and seeds of ``epoch`` (counted from 0) at the next ``iter()``."""
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> SeededSampler:
        """The share of process ``rank`` out of ``world_size``, with the same seed and epoch."""
        sharded = SeededSampler(
            self.length, seed=self.seed, shuffle=self.shuffle, rank=rank, world_size=world_size
        )
        sharded.epoch = self.epoch
        return sharded

    def __len__(self) -> int:
        return -(-self.length // self.world_size)

    def pairs(self, epoch: int) -> list[tuple[int, int]]:
        """The ``(index, sample_seed)`` pairs of ``epoch`` for this process, in order."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        if self.shuffle:
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        seeds = torch.randint(2**62, (self.length,), generator=generator)
        pairs = list(zip(order.tolist(), seeds.tolist()))
        if self.world_size > 1 and pairs:
            padding = len(self) * self.world_size - len(pairs)
            pairs = (pairs + pairs * (padding // len(pairs) + 1))[: len(self) * self.world_size]
            pairs = pairs[self.rank :: self.world_size]
        return pairs

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch = epoch + 1  # the next epoch, unless set_epoch says otherwise
        return iter(self.pairs(epoch))


class SeededDataset(Dataset):
    """A map-style data set whose items are drawn with the random numbers of their own seed.

    ``seeded[(index, sample_seed)]`` is ``dataset[index]`` computed inside
    :func:`seeded_rng` ``(sample_seed)``: a random augmentation that draws from
    Python's, NumPy's or torch's global RNG (torchvision's transforms do) gives the
    same result in the main process or in any DataLoader worker, however long that
    worker has lived, and the process's own RNG states are left as they were.
    ``seeded[index]`` (a plain index, from another sampler) is ``dataset[index]``.

    Args:
        dataset: the data set to wrap (``seeded.dataset``).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, sample_seed = key
        if get_worker_info() is not None:
            # A worker process draws random numbers for its items only: no state to keep.
            _seed_globals(sample_seed)
            return self.dataset[index]
        with seeded_rng(sample_seed):
            return self.dataset[index]


def seeded_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = False,
    **loader_options: Any,
) -> DataLoader:
    """A ``DataLoader`` whose order and random augmentation come from ``(seed, epoch)``.

    It loads ``SeededDataset(dataset)`` through a :class:`SeededSampler`, and has its own
    ``generator`` (seeded from ``seed``) so that creating its iterator draws nothing
    from the global RNG. The batches of an epoch are then the same with any
    ``num_workers``, with ``persistent_workers=True``, and in a run resumed at any
    batch. The learner must call ``set_epoch`` each epoch: add the
    :class:`SetDataEpoch` plugin. ``loader_options`` go to ``DataLoader``
    (``num_workers``, ``persistent_workers``, ``pin_memory``, ``drop_last``,
    ``collate_fn``, ...).

    Example:
        >>> data = seeded_loader(list(range(10)), batch_size=4, seed=0, shuffle=True)
        >>> [len(batch) for batch in data]
        [4, 4, 2]
    """
    for option in ("sampler", "batch_sampler", "shuffle", "generator"):
        if option in loader_options:
            raise TypeError(f"seeded_loader sets {option!r} itself")
    return DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=SeededSampler(len(dataset), seed=seed, shuffle=shuffle),
        generator=torch.Generator().manual_seed(derive_seed(seed)),
        **loader_options,
    )


def set_data_epoch(data: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on ``data``, its sampler and batch sampler, where they have one."""
    if data is None:
        return
    batch_sampler = getattr(data, "batch_sampler", None)
    owners = (data, getattr(data, "sampler", None), batch_sampler)
    owners += (getattr(batch_sampler, "sampler", None),)
    done: list[Any] = []
    for owner in owners:
        set_epoch = getattr(owner, "set_epoch", None)
        if callable(set_epoch) and all(owner is not other for other in done):
            set_epoch(epoch)
            done.append(owner)


class SetDataEpoch:
    """A plugin that tells the training and validation data which epoch begins.

    In ``on_epoch_begin`` it calls :func:`set_data_epoch` with ``learner.epoch`` on
    ``learner.train_data`` and ``learner.valid_data``: a :class:`SeededSampler`, a
    ``DistributedSampler`` or any data with a ``set_epoch`` method then uses that epoch's
    order, also in a run resumed in the middle of it.
    """

    @hookimpl
    def on_epoch_begin(self, learner: Any) -> None:
        set_data_epoch(learner.train_data, learner.epoch)
        set_data_epoch(learner.valid_data, learner.epoch)


def resume_exactness_warning(train_data: Any) -> str | None:
    """One line saying why a resume of ``train_data`` may not be exact, or ``None``.

    A resume replays the interrupted epoch from the saved RNG states, which is exact for
    data that draws from the global RNG or from a ``generator`` of the DataLoader or its
    sampler. It cannot be promised for a DataLoader with a sampler of a kind that may
    keep state of its own, over an ``IterableDataset`` read by workers, or with
    ``persistent_workers=True`` (their RNG states live across epochs and are in no
    checkpoint) unless its sampler is a :class:`SeededSampler`. Other iterables
    (``TensorBatches``, lists of batches) are taken as replayable.
    """
    if not isinstance(train_data, DataLoader):
        return None
    where = "the training DataLoader"
    fix = "build it with trainloop.data.seeding.seeded_loader for a bit-identical resume"
    batch_sampler = train_data.batch_sampler
    sampler = getattr(batch_sampler, "sampler", None) or train_data.sampler
    if isinstance(sampler, SeededSampler):
        return None
    workers = train_data.num_workers
    if isinstance(train_data.dataset, IterableDataset):
        if workers:
            return (
                f"resume may not be exact: {where} reads an IterableDataset with {workers} "
                "workers, whose progress and random state no checkpoint holds"
            )
        return None
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        return (
            f"resume may not be exact: {where}'s batch sampler {type(batch_sampler).__name__} "
            f"may keep state that no checkpoint holds; {fix}"
        )
    if not isinstance(sampler, _REPLAYABLE_SAMPLERS):
        return (
            f"resume may not be exact: {where}'s sampler {type(sampler).__name__} may keep "
            f"state that no checkpoint holds; {fix}"
        )
    if workers and train_data.persistent_workers:
        return (
            f"resume may not be exact: {where} keeps {workers} persistent workers, whose "
            f"random state (augmentation) lives across epochs and is in no checkpoint; {fix}"
        )
    return None
