"""Shared fixtures: small models and data that train in milliseconds."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainloop import Learner
from trainloop.plugins.throughput import DATA_WAIT, SAMPLES_PER_SECOND

TIMINGS = (SAMPLES_PER_SECOND, DATA_WAIT)
"""The keys of ``learner.metrics`` that are timings (the throughput plugin's)."""

ROOT = Path(__file__).resolve().parents[1]


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.argmax(dim=1) == target).float().mean()


def make_data(
    samples: int = 50, batch: int = 16, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 4, generator=generator)
    target = (inputs.sum(dim=1) > 0).long()
    return [(inputs[i : i + batch], target[i : i + batch]) for i in range(0, samples, batch)]


def make_learner(plugins=(), valid=True, **kwargs) -> Learner:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LogSoftmax(dim=1))
    data = make_data()
    return Learner(
        model,
        data,
        make_data(seed=1) if valid else None,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        metrics=(accuracy,),
        plugins=plugins,
        **kwargs,
    )


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """Run ``python -m trainloop ARGS`` in a subprocess; return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "trainloop", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def without_timings(records: list[dict]) -> list[dict]:
    """``metrics.jsonl`` records without the throughput plugin's timings, which differ
    from run to run: what an exact resume or replay must reproduce."""
    return [
        {key: value for key, value in record.items() if key not in TIMINGS} for record in records
    ]


@pytest.fixture
def learner() -> Learner:
    return make_learner()


TINY_RECIPE = """
from dataclasses import dataclass
import functools, torch
from trainloop import Learner

@dataclass
class Config:
    lr: float = 0.1

def build(cfg):
    torch.manual_seed(0)
    inputs = torch.randn(32, 4)
    target = (inputs.sum(1) > 0).long()
    data = [(inputs[i:i + 8], target[i:i + 8]) for i in range(0, 32, 8)]
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LogSoftmax(1))
    return Learner(model, data, data, optimizer=functools.partial(torch.optim.SGD, lr=cfg.lr))
"""


def write_tiny_recipe(folder: Path) -> Path:
    """Write a recipe file (4 batches of 8, validation on the same data, ``--lr``); return it."""
    recipe = folder / "tiny.py"
    recipe.write_text(TINY_RECIPE)
    return recipe
