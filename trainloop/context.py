"""The run context: where and as which process a run executes.

One :class:`RunContext` per run, shared by the command line, the learner
(``learner.context``), the run's config (``config.context``) and every plugin: the
device the model and batches go to, the process's rank, how many processes train, and
whether this process is the one that writes files and prints. Plugins read it and the
plugins that decide it (device, distributed) fill it in when the run is configured;
no plugin keeps such state in a module global.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from trainloop.manager import PluginManager

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""The environment variables torchrun sets in each process it starts."""


@dataclass
class RunContext:
    """The run's device and process layout.

    Attributes:
        device: where the model and batches go (a ``torch.device``); ``None`` until a
            plugin chooses one (the device plugin does, from ``--device``), which
            means the CPU.
        rank: this process's number among the run's processes, from 0.
        world_size: how many processes train together (1 without torchrun).
        local_rank: this process's number on its machine (picks its GPU).
        mixed_precision_dtype: the lower precision the forward pass computes in
            (``torch.bfloat16`` or ``torch.float16``), or ``None`` for float32. The
            precision plugin sets it from ``--precision``; a plugin that shards the
            model gathers the parameters in it (FSDP's ``MixedPrecisionPolicy``).
    """

    device: torch.device | None = None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mixed_precision_dtype: torch.dtype | None = None

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes the run's files and prints: rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1

    @property
    def device_type(self) -> str:
        """``"cuda"``, ``"mps"`` or ``"cpu"``: the kind of ``device``."""
        return "cpu" if self.device is None else self.device.type

    @classmethod
    def from_environment(cls) -> RunContext:
        """The context torchrun's variables describe; one process of one when unset."""
        if not all(name in os.environ for name in LAUNCH_VARIABLES):
            return cls()
        return cls(
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ["LOCAL_RANK"]),
        )


_current: contextvars.ContextVar[tuple[RunContext, PluginManager] | None] = contextvars.ContextVar(
    "trainloop_current_run", default=None
)


@contextmanager
def current_run(context: RunContext, plugin_manager: PluginManager) -> Iterator[None]:
    """Make ``context`` and ``plugin_manager`` the current run's while the block runs.

    The command line does this around a recipe's ``build(cfg)``: a :class:`Learner`
    made there joins the run (its plugins register with the run's one plugin manager)
    and shares its context; :func:`run_context` returns it to the recipe.
    """
    token = _current.set((context, plugin_manager))
    try:
        yield
    finally:
        _current.reset(token)


def current() -> tuple[RunContext, PluginManager] | None:
    """The current run's context and plugin manager, or ``None`` outside one."""
    return _current.get()


def run_context() -> RunContext:
    """The current run's context under ``trainloop run``; elsewhere the context of this
    process as torchrun describes it (device unset)."""
    run = _current.get()
    return run[0] if run is not None else RunContext.from_environment()


def pin_memory_default() -> bool:
    """Whether a DataLoader should pin memory: this run's batches go to a CUDA device.

    Under ``trainloop run`` this follows the run context's device (``--device``);
    elsewhere it is ``torch.cuda.is_available()``. Recipes pass it on:
    ``DataLoader(..., pin_memory=pin_memory_default())``.
    """
    run = _current.get()
    if run is not None and run[0].device is not None:
        return run[0].device.type == "cuda"
    import torch

    return torch.cuda.is_available()


def gpu_of_local_rank(requested: str, local_rank: int) -> torch.device | None:
    """``cuda:LOCAL_RANK`` for ``--device auto`` or ``cuda`` when CUDA is available: one
    GPU per process of a machine; ``None`` for any other request or without CUDA.

    Raises :class:`~trainloop.UsageError` when this machine has fewer GPUs than the
    local rank needs.
    """
    import torch

    if str(requested) not in ("auto", "cuda") or not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    if local_rank >= count:
        from trainloop.errors import UsageError

        raise UsageError(
            f"--device {requested}: local rank {local_rank} has no GPU of its own ({count} "
            f"visible); start at most {count} processes per machine, or use --device cpu"
        )
    return torch.device("cuda", local_rank)
