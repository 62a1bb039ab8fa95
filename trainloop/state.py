"""Values a run saves: every RNG state it draws from, and JSON-safe copies of settings.

Shared by the plugins that write checkpoints and model files (and by third-party ones):
:func:`capture_rng_state` / :func:`set_rng_state` for an exact resume, :func:`json_safe`
for values that go into JSON or a ``weights_only`` checkpoint, :func:`unwrap_model` for
a model the user wrapped before giving it to the Learner.
"""

from __future__ import annotations

import enum
import random
from pathlib import PurePath
from typing import Any

import numpy as np
import torch


def capture_rng_state(data: Any = None) -> dict[str, Any]:
    """Every RNG state a run draws from, in types ``torch.load(weights_only=True)`` reads.

    Python's ``random``, NumPy's global generator, torch's CPU generator, the CUDA
    generators (when CUDA is in use) and the ``generator`` of ``data`` (a DataLoader)
    and of its sampler, if they have their own.
    """
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generators = data_generators(data)
    if generators:
        state["data_generators"] = [generator.get_state() for generator in generators]
    return state


def set_rng_state(state: dict[str, Any], data: Any = None) -> None:
    """Restore what :func:`capture_rng_state` returned (the parts it holds)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        saved = state["numpy"]
        keys = saved["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (saved["name"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    generators = data_generators(data)
    saved_generators = state.get("data_generators") or []
    if len(saved_generators) == len(generators):
        for generator, generator_state in zip(generators, saved_generators):
            generator.set_state(generator_state)


def data_generators(data: Any) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects of a DataLoader, its sampler and batch sampler."""
    found: list[torch.Generator] = []
    if data is None:
        return found
    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    for owner in (data, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DataParallel, DistributedDataParallel and ``torch.compile``."""
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def json_safe(value: Any) -> Any:
    """``value`` with JSON types only: paths become strings, tuples and sets lists, NumPy
    and one-element tensor scalars numbers, anything else its ``str()``."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)
