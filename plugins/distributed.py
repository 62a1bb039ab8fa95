"""distributed: training on several processes with torch.distributed: DDP, or FSDP2 with ``--strategy fsdp``.

See docs/plugins/distributed.md.
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler

from trainloop import Learner, RunConfig, UsageError, hookimpl
from trainloop.context import LAUNCH_VARIABLES, RunContext, gpu_of_local_rank
from trainloop.data.seeding import SeededSampler
from trainloop.data.tensors import TensorBatches
from trainloop.run_folder import new_run_dir

STRATEGIES = ("ddp", "fsdp")
AUTO_WRAP = (
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "MultiheadAttention",
    "Linear",
    "Bilinear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Embedding",
    "EmbeddingBag",
)
"""The module types that ``--fsdp-wrap auto`` shards as units, the outermost first: a
transformer layer is one unit (its linear layers are not split out of it). Recurrent
layers stay in the unit around them: their outputs are views, which FSDP2 warns about."""

# --- module hooks: the command line ----------------------------------------------------


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed")
    group.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="train on N processes of this machine (one per GPU) by running this "
        "command under torchrun",
    )
    group.add_argument(
        "--dist-backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="process group backend; auto: nccl on GPUs, gloo on the CPU (default: auto)",
    )
    group.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="ddp",
        help="ddp: a whole model per process, gradients averaged (DistributedDataParallel); "
        "fsdp: the model sharded between the processes (FSDP2's fully_shard), checkpoints "
        "written as one shard per process (default: ddp)",
    )
    group.add_argument(
        "--fsdp-wrap",
        default="auto",
        metavar="TYPES",
        help="with --strategy fsdp: the module types sharded as units, comma-separated class "
        "names (the whole model is one more); auto: transformer layers, attention, linear, "
        "convolution and embedding layers; none: the whole model only (default: auto)",
    )


@hookimpl(trylast=True)  # it needs the device that the device plugin chose
def configure_context(context: RunContext, options: argparse.Namespace) -> None:
    if not launched():
        if options.nproc_per_node is not None:
            raise SystemExit(hand_off_to_torchrun(options, context))
        if options.strategy == "fsdp":
            raise UsageError(
                "--strategy fsdp shards the model between processes: start the run under "
                "torchrun, or add --nproc-per-node N"
            )
        return
    init_process_group(options.dist_backend, context.device)


@hookimpl(trylast=True)  # a plugin that resumes into an existing folder decides first
def make_run_dir(recipe_path: Path, context: RunContext) -> Path | None:
    if not launched():
        return None
    chosen = [str(new_run_dir(recipe_path)) if context.is_main_process else None]
    dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


@hookimpl
def configure(config: RunConfig) -> None:
    if not launched():
        return
    options = config.options
    plugin = Distributed(
        device=config.context.device,
        backend=options.dist_backend,
        seed=options.seed,
        strategy=options.strategy,
        wrap=parse_wrap(options.fsdp_wrap),
    )
    config.plugin_manager.register(plugin, f"distributed.{options.strategy}")


@hookimpl
def check_run(config: RunConfig, learner: Learner) -> None:
    if launched() and config.options.strategy == "fsdp":
        check_wrap(learner.model, parse_wrap(config.options.fsdp_wrap))


def parse_wrap(text: str) -> tuple[str, ...]:
    """The class names of ``--fsdp-wrap TYPES``: ``auto`` is :data:`AUTO_WRAP`, ``none`` nothing."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if names == ("auto",):
        return AUTO_WRAP
    if names in ((), ("none",)):
        return ()
    return names


def check_wrap(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Raise a one-line UsageError naming each of ``names`` that no submodule of ``model`` is."""
    names = tuple(names)
    if names == AUTO_WRAP:
        return
    present = {cls.__name__ for module in model.modules() for cls in type(module).__mro__}
    absent = [name for name in names if name not in present]
    if absent:
        types = sorted({type(module).__name__ for module in model.modules()})
        raise UsageError(
            f"--fsdp-wrap {','.join(absent)}: no submodule of {type(model).__name__} is of that "
            f"type; give some of {', '.join(types)} (or auto, or none)"
        )


def shard_units(model: torch.nn.Module, names: Iterable[str]) -> list[torch.nn.Module]:
    """The submodules of ``model`` that FSDP shards as units: those of a type in ``names``.

    A class matches by its own name or a base class's. Searched from the top: inside a
    unit nothing more is taken (a transformer layer is one unit, not its linear layers).
    Modules without parameters are left out. ``model`` itself is not in the list.
    """
    names = set(names)
    units: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            if {cls.__name__ for cls in type(child).__mro__} & names:
                if next(child.parameters(), None) is not None:
                    units.append(child)
            else:
                visit(child)

    visit(model)
    return units


@hookimpl
def unconfigure() -> None:
    if launched():
        destroy_process_group()


# --- processes and devices -------------------------------------------------------------


def launched() -> bool:
    """Whether this process was started by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def local_device(requested: str = "auto") -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    ``requested`` is the ``--device`` value: ``auto`` and ``cuda`` mean one GPU per
    local rank; any other value (``cpu``, ``cuda:1``) is kept as it is.
    """
    gpu = gpu_of_local_rank(requested, int(os.environ.get("LOCAL_RANK", 0)))
    if gpu is not None:
        return gpu
    if requested in ("auto", "cuda"):
        return torch.device("cpu")
    return torch.device(requested)


def init_process_group(backend: str = "auto", device: torch.device | None = None) -> bool:
    """Join the process group from torchrun's variables, once; return whether it joined now.

    ``backend="auto"`` is NCCL for a CUDA ``device`` and gloo otherwise.
    """
    if dist.is_initialized():
        return False
    device = device or local_device()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    attempt = _attempt_on_one_machine()
    if attempt is None:
        dist.init_process_group(backend=backend)
    else:
        # torchrun keeps one store across its restarts, holding the addresses of the
        # processes it killed: a restarted process could read one of those and fail to
        # connect ("Connection refused"), which costs another restart. Keys of its own.
        store, rank, world_size = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"trainloop/attempt_{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    atexit.register(destroy_process_group)  # also when a run ends before unconfigure
    return True


def _attempt_on_one_machine() -> str | None:
    """torchrun's restart count, when it is the same for every process of the group.

    That is when torchrun's own store serves one machine's processes; across machines
    each torchrun counts its own restarts, so ``None`` (as outside torchrun).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("GROUP_WORLD_SIZE") != "1":
        return None
    return os.environ.get("TORCHELASTIC_RESTART_COUNT")


def destroy_process_group() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- the --nproc-per-node shortcut -----------------------------------------------------


def torchrun_command(argv: list[str], nproc_per_node: int) -> list[str]:
    """The command that runs ``trainloop ARGV`` under torchrun on ``nproc_per_node`` processes.

    ``--nproc-per-node`` is taken out of ``argv``, so that the processes do not launch
    again; they agree on the run folder through the ``make_run_dir`` hook (or ``--out``).
    """
    kept: list[str] = []
    skip_value = False
    for argument in argv:
        if skip_value:
            skip_value = False
        elif argument == "--nproc-per-node":
            skip_value = True
        elif not argument.startswith("--nproc-per-node="):
            kept.append(argument)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        "trainloop",
        *kept,
    ]


def hand_off_to_torchrun(options: argparse.Namespace, context: RunContext) -> int:
    """Run this process's command line again under torchrun; return torchrun's exit status."""
    count = options.nproc_per_node
    if count < 1:
        raise UsageError(f"--nproc-per-node {count}: give a number of processes, at least 1")
    if context.device_type == "cuda":
        gpus = torch.cuda.device_count()
        if count > gpus:
            raise UsageError(
                f"--nproc-per-node {count}: this machine has {gpus} GPU(s), one per process; "
                f"use --nproc-per-node {gpus} or fewer, or --device cpu"
            )
    argv = sys.argv[1:]
    if argv[:1] != ["run"]:
        raise UsageError(
            "--nproc-per-node works from the command line (trainloop run ...); "
            "in Python, start your script with torchrun"
        )
    command = torchrun_command(argv, count)
    print(f"trainloop: starting {count} processes: python {' '.join(command[1:])}", flush=True)
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops its workers
        return process.wait()


# --- splitting the data between processes ----------------------------------------------


class ShardedTensorBatches:
    """One process's share of a :class:`~trainloop.data.tensors.TensorBatches`.

    Like ``DistributedSampler``: each epoch every process draws the same order of the
    samples (from ``seed + epoch``, not from the global RNG), pads it by repeating
    samples to a multiple of ``world_size``, and takes every ``world_size``-th sample
    from position ``rank``; so the processes see disjoint samples and the same number
    of batches. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, batches: TensorBatches, rank: int, world_size: int, seed: int = 0) -> None:
        self.tensors = batches.tensors
        self.batch_size = batches.batch_size
        self.shuffle = batches.shuffle
        self.drop_last = batches.drop_last
        self.total = batches.num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(self.total / world_size)  # this process's share

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch``: the same on every process, new each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """The indices of this process's samples for the current epoch."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.total, generator=generator)
        else:
            order = torch.arange(self.total)
        padding = self.num_samples * self.world_size - self.total
        if padding:
            order = torch.cat([order, order.repeat(math.ceil(padding / self.total))[:padding]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        mine = self.indices()  # now, not at the first batch (as TensorBatches does)
        return self._batches({tensor.device: mine.to(tensor.device) for tensor in self.tensors})

    def _batches(
        self, mine_on: dict[torch.device, torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            stop = start + self.batch_size
            yield tuple(
                tensor.index_select(0, mine_on[tensor.device][start:stop])
                for tensor in self.tensors
            )


class _RangeSampler(Sampler[int]):
    """The indices ``rank, rank + world_size, ...`` of a data set: a share without padding."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _rebuild_loader(loader: DataLoader, sampler: Sampler) -> DataLoader:
    """A DataLoader like ``loader`` (same batch size, workers, collate, ...) over ``sampler``."""
    settings = {
        "batch_size": loader.batch_size,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        settings["prefetch_factor"] = loader.prefetch_factor
    if hasattr(loader, "in_order"):
        settings["in_order"] = loader.in_order
    return DataLoader(loader.dataset, sampler=sampler, **settings)


def shard_train_data(data: Any, rank: int, world_size: int, seed: int = 0) -> Any:
    """This process's share of the training data, each process with as many batches.

    Raises :class:`~trainloop.UsageError` for data it cannot split.
    """
    if isinstance(data, TensorBatches):
        return ShardedTensorBatches(data, rank, world_size, seed)
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, DistributedSampler):
            return data  # split already
        if isinstance(data.sampler, SeededSampler):  # each process its share of each epoch
            return _rebuild_loader(data, data.sampler.shard(rank, world_size))
        if isinstance(data.dataset, IterableDataset) or data.batch_size is None:
            raise UsageError(
                "distributed: cannot split a DataLoader over an IterableDataset or with its "
                "own batch_sampler between processes; give it a DistributedSampler yourself"
            )
        sampler = DistributedSampler(
            data.dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=isinstance(data.sampler, RandomSampler),
            seed=seed,
        )
        return _rebuild_loader(data, sampler)
    if isinstance(data, (list, tuple)) and data:
        per_process = math.ceil(len(data) / world_size)
        padded = [data[index % len(data)] for index in range(per_process * world_size)]
        return padded[rank::world_size]
    raise UsageError(
        f"distributed: cannot split train_data of type {type(data).__name__} between "
        "processes; use a DataLoader, TensorBatches or a list of batches"
    )


def shard_valid_data(data: Any, rank: int, world_size: int) -> Any:
    """This process's share of the validation data, without padding: each sample once.

    Data that cannot be split, or that has fewer samples (batches, for a list) than
    processes, is returned whole: every process then validates all of it, and the sums
    and counts grow alike, so the metrics are still those of the full set.
    """
    if isinstance(data, TensorBatches):
        if data.num_samples < world_size:
            return data
        start = data.num_samples * rank // world_size
        stop = data.num_samples * (rank + 1) // world_size
        return TensorBatches(
            *(tensor[start:stop] for tensor in data.tensors),
            batch_size=data.batch_size,
            drop_last=data.drop_last,
        )
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset) or data.batch_size is None:
            return data
        length = len(data.dataset)
        if length < world_size:
            return data
        return _rebuild_loader(data, _RangeSampler(length, rank, world_size))
    if isinstance(data, (list, tuple)) and len(data) >= world_size:
        return list(data[rank::world_size])
    return data


# --- the per-run plugin ----------------------------------------------------------------


def even_valid_data(data: Any, rank: int, world_size: int) -> Any:
    """This process's share of the validation data when every process has as many batches.

    A sharded model gathers its parameters in every forward pass, with every process:
    so the shares of :func:`shard_valid_data` are used when they hold as many batches
    each, and otherwise every process validates all of the data (each sample is then
    counted ``world_size`` times, in the sums and in the counts alike, so the metrics
    are still those of the full set).
    """
    shares = [shard_valid_data(data, other, world_size) for other in range(world_size)]
    try:
        even = len({len(share) for share in shares}) == 1
    except TypeError:  # no length: it cannot be told
        even = False
    return shares[rank] if even else data


class Distributed:
    """Training on the processes that torchrun started: DDP, or FSDP2 for a sharded model.

    Joins the process group if no one has (it stays until the process ends, for the
    model's later fits and predictions), wraps the model (the ``wrap_model`` set-up
    step): in DistributedDataParallel, or, with ``strategy="fsdp"``, shards it with
    ``fully_shard`` (each unit of ``wrap``, then the whole model); gives each process its share of the training and validation
    data (``setup_data``), and sums the validation totals over the processes.

    Args:
        device: this process's device; default :func:`local_device`.
        backend: ``"nccl"``, ``"gloo"`` or ``"auto"`` (NCCL for CUDA, else gloo).
        seed: seeds the order of the training samples (with the epoch).
        find_unused_parameters: passed to DistributedDataParallel.
        strategy: ``"ddp"`` or ``"fsdp"``.
        wrap: under FSDP, the class names of the submodules sharded as units
            (:func:`shard_units`); default :data:`AUTO_WRAP`.
        mixed_precision: under FSDP, the dtype the parameters are gathered in for the
            forward and backward passes (gradients are reduced in float32); default
            ``learner.context.mixed_precision_dtype``, which ``--precision`` sets.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        backend: str = "auto",
        seed: int = 0,
        find_unused_parameters: bool = False,
        strategy: str = "ddp",
        wrap: Iterable[str] = AUTO_WRAP,
        mixed_precision: torch.dtype | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"Distributed(strategy={strategy!r}): use one of {STRATEGIES}")
        self.device = torch.device(device) if device is not None else local_device()
        self.backend = backend
        self.seed = seed
        self.find_unused_parameters = find_unused_parameters
        self.strategy = strategy
        self.wrap = tuple(wrap)
        self.mixed_precision = mixed_precision

    @hookimpl
    def wrap_model(self, learner: Learner, module: torch.nn.Module) -> torch.nn.Module:
        # The group joined here stays until the process ends (init_process_group leaves
        # it at exit; a CLI run at unconfigure): the wrapped model needs it for every
        # later fit, validate and predict.
        init_process_group(self.backend, self.device)
        learner.context.rank, learner.context.world_size = dist.get_rank(), dist.get_world_size()
        module.to(self.device)  # a no-op when the device plugin placed it
        if self.strategy == "fsdp":
            return self._shard(learner, module)
        # DDP copies rank 0's parameters and buffers to every process here.
        return TrainingDDP(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters,
        )

    def _shard(self, learner: Learner, module: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        with torch.no_grad():  # every process starts from rank 0's weights, as under DDP
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0)
        dtype = self.mixed_precision or learner.context.mixed_precision_dtype
        policy = MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None
        )
        for unit in shard_units(module, self.wrap):
            fully_shard(unit, mp_policy=policy)
        fully_shard(module, mp_policy=policy)  # the rest, and the root that starts each pass
        return module

    @hookimpl
    def setup_data(self, learner: Learner) -> None:
        rank, world_size = learner.context.rank, learner.context.world_size
        learner.train_data = shard_train_data(learner.train_data, rank, world_size, self.seed)
        if learner.valid_data is None:
            return
        if self.strategy == "fsdp":
            learner.valid_data = even_valid_data(learner.valid_data, rank, world_size)
        else:
            learner.valid_data = shard_valid_data(learner.valid_data, rank, world_size)

    def on_epoch_begin(self, learner: Learner) -> None:
        data = learner.train_data
        set_epoch = getattr(data, "set_epoch", None) or getattr(
            getattr(data, "sampler", None), "set_epoch", None
        )
        if set_epoch is not None:
            set_epoch(learner.epoch)

    @hookimpl
    def reduce_tensor(self, tensor: torch.Tensor) -> torch.Tensor | None:
        if not dist.is_initialized():
            return None
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


class TrainingDDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel for the training forward pass only.

    Without gradients (validation, prediction) it calls the wrapped module directly:
    a process may have one batch fewer than another there, and DDP's forward may wait
    on the others (it broadcasts buffers such as BatchNorm's).
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        return super().forward(*args, **kwargs)
