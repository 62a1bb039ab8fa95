"""Models whose parameters are sharded between processes (FSDP2), for the plugins that save them.

A plugin that saves or loads weights asks :func:`is_sharded` instead of knowing the
class of the wrapper that sharded them, and goes through these functions: an ordinary
state dict out of any model (:func:`full_state_dict`) and back in
(:func:`load_full_state_dict`), and a checkpoint in which every process writes its own
shard with ``torch.distributed.checkpoint`` (:func:`save`, :func:`load`). Each works
on an ordinary model too, so a caller needs no second path.

Under a sharded model these are collectives: every process calls them, in the same
order, or the processes wait for each other forever.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

METADATA_NAME = ".metadata"
"""The file ``torch.distributed.checkpoint`` writes last into a complete checkpoint folder."""


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor``: sharded between processes."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An ordinary state dict of ``model``: whole tensors, copied to the CPU.

    The keys are those of the unwrapped model (FSDP2 keeps them), so the result loads
    with ``torch.load(weights_only=True)`` into the plain model. Sharded, every process
    gathers every tensor and gets the same dict.
    """
    if not is_sharded(model):
        return {
            name: value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
            for name, value in model.state_dict().items()
        }
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: value.detach().to("cpu", copy=True) for name, value in state.items()}


def load_full_state_dict(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Load an ordinary state dict (every process holds all of it) into ``model``.

    Raises ``RuntimeError`` for keys or shapes that do not fit, as ``load_state_dict``.
    """
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    _check_fits(model, state)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load an ordinary ``optimizer.state_dict()`` into the optimizer of a sharded ``model``.

    The saved state numbers the parameters in the order of ``model.parameters()``, the
    order a Learner's optimizer factory receives them in; here they are named, and each
    process keeps its shard of every tensor.
    """
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in model.named_parameters()]
    groups = state["param_groups"]
    if sorted(index for group in groups for index in group["params"]) != list(range(len(names))):
        raise ValueError(
            f"it numbers {sum(len(group['params']) for group in groups)} parameters, the model "
            f"has {len(names)}"
        )
    named = {
        "state": {names[index]: value for index, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[index] for index in group["params"]]} for group in groups
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, named, options=StateDictOptions(full_state_dict=True)
    )


def save(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    process_group: Any = None,
    asynchronous: bool = False,
) -> Future:
    """Write the model's and optimizer's state into ``directory``: each process its shard.

    ``directory`` must be new (or empty) and the same path on every process (a shared
    file system across machines). The folder is complete once its ``.metadata`` file
    exists. With ``asynchronous``, the state is copied to the CPU now and written by a
    thread while training goes on (``torch.distributed.checkpoint.async_save``; give it
    a ``process_group`` of its own, so that its collectives do not mix with the
    training's); the returned future is done when every process's part is written.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    where = {"checkpoint_id": str(directory), "process_group": process_group}
    with _one_process_is_meant():
        if asynchronous:
            return dcp.async_save(state, **where, no_dist=not _distributed())
        dcp.save(state, **where, no_dist=not _distributed())
    done: Future = Future()
    done.set_result(None)
    return done


def load(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read what :func:`save` wrote into ``model`` and ``optimizer``, sharded or not.

    ``torch.distributed.checkpoint`` reshards on load: the checkpoint may come from
    another number of processes, and loads into an ordinary model in one process too.
    Raises ``RuntimeError`` when it does not fit (keys, shapes, a missing file).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _one_process_is_meant():
            dcp.load(state, checkpoint_id=str(directory), no_dist=not _distributed())
    except CheckpointException as error:  # a BaseException: for what the processes raised
        raise RuntimeError(str(error)) from error
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def is_complete(directory: str | Path) -> bool:
    """Whether ``directory`` holds a complete checkpoint written by :func:`save`."""
    return (Path(directory) / METADATA_NAME).is_file()


def saved_model_shapes(directory: str | Path) -> dict[str, torch.Size]:
    """The shape of each tensor of the model's state in the checkpoint in ``directory``.

    Read from its metadata alone, without loading a tensor and without the other
    processes: what a resume checks before it starts.
    """
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(directory)).read_metadata()
    prefix = "model."
    return {
        key[len(prefix) :]: value.size
        for key, value in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(value, "size")
    }


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: that is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _check_fits(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Raise ``RuntimeError`` as ``load_state_dict`` would, before any process loads."""
    own = model.state_dict()
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own]
    shapes = [
        name
        for name, value in own.items()
        if name in state and hasattr(state[name], "shape") and state[name].shape != value.shape
    ]
    if missing or unexpected or shapes:
        raise RuntimeError(
            "Error(s) in loading state_dict: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}"
        )
