"""Shared fixtures and helpers: small models and data that train in milliseconds, plugins
that several test files use, the Carvana test set and the docs' example plugin packages."""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainloop import Learner, hookimpl
from trainloop.plugins.throughput import DATA_WAIT, SAMPLES_PER_SECOND

TIMINGS = (SAMPLES_PER_SECOND, DATA_WAIT)
"""The keys of ``learner.metrics`` that are timings (the throughput plugin's)."""

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"  # the example plugin packages the docs show
CARVANA_PHOTO_SIZE = (72, 40)  # (width, height) of the generated photos: not square, not 1918x1280


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


def implemented_hooks(learner: Learner, names) -> set[str]:
    """Those of the hooks ``names`` that some plugin of ``learner`` implements (pluggy's
    public ``get_hookimpls``)."""
    return {name for name in names if getattr(learner.hook, name).get_hookimpls()}


def options_named_on_page(page: Path, pattern: str, capsys) -> set[str]:
    """The options matching ``pattern`` that the docs ``page`` names, once it is checked
    that ``trainloop run recipes/mnist_mlp.py --help`` lists each of them."""
    from trainloop.cli import main

    with pytest.raises(SystemExit):
        main(["run", str(ROOT / "recipes" / "mnist_mlp.py"), "--help"])
    help_text = capsys.readouterr().out
    named = set(re.findall(pattern, page.read_text()))
    for option in sorted(named):
        assert re.search(rf"{option}(?![\w-])", help_text), f"{page.name}: {option}"
    return named


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


# --- plugins ---------------------------------------------------------------------------


class AddScore:
    """Adds ``score`` to the metrics at each epoch end, from a list, before the other plugins."""

    def __init__(self, scores):
        self.scores = scores

    @hookimpl(tryfirst=True)
    def on_epoch_end(self, learner):
        learner.metrics["score"] = self.scores[learner.epoch]


class Crash:
    """Fails the run after training batch ``at`` (counted from 1), or in the validation
    that follows it with ``in_validation``."""

    def __init__(self, at: int, in_validation: bool = False) -> None:
        self.at = at
        self.in_validation = in_validation

    def on_batch_end(self, learner: Learner) -> None:
        if learner.training and learner.step + 1 == self.at and not self.in_validation:
            raise RuntimeError("simulated crash")

    def on_valid_begin(self, learner: Learner) -> None:
        if learner.step == self.at and self.in_validation:
            raise RuntimeError("simulated crash")


class NoisyData(torch.utils.data.Dataset):
    """Samples of 8 features, each with fresh noise from the global torch RNG, as
    augmentation draws it: what exact resume must reproduce."""

    def __init__(self, inputs: torch.Tensor, target: torch.Tensor) -> None:
        self.inputs, self.target = inputs, target

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        return self.inputs[index] + 0.1 * torch.randn(8), self.target[index]


BEACON = '''

import time


class Beacon:
    """Prints a line after every training batch, so a test knows where the run is."""

    def __init__(self, sleep):
        self.sleep = sleep

    def on_batch_end(self, learner):
        if learner.training:
            print(f"beacon step {learner.step + 1}", flush=True)
            time.sleep(self.sleep)
'''
"""The source of a ``Beacon(sleep)`` plugin, for the recipes that tests write to files and
run in another process: it prints ``beacon step N`` after training step N (from 1), then
sleeps ``sleep`` seconds. Add it to the recipe's text."""


# --- data sets and packages, made once per session ---------------------------------------


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> Path:
    """A synthetic Carvana set of 2 training cars (one for validation) and 1 test car of
    ``CARVANA_PHOTO_SIZE`` photos, shared read-only by the tests."""
    from trainloop.tasks.carvana.synthetic import generate_dataset  # only where it is used

    input_dir = tmp_path_factory.mktemp("carvana") / "input"
    generate_dataset(input_dir, n_train_cars=2, n_test_cars=1, size=CARVANA_PHOTO_SIZE, seed=0)
    return input_dir


@pytest.fixture
def input_dir(generated, tmp_path) -> Path:
    """A private copy of the synthetic Carvana set ``generated``, for tests that break it."""
    return Path(shutil.copytree(generated, tmp_path / "input"))


@pytest.fixture(scope="session")
def example_packages(tmp_path_factory) -> Path:
    """The example plugin packages of ``docs/examples`` (trainloop-csvlogger), installed
    offline with pip into a temporary folder: put it on the path to use them."""
    work = tmp_path_factory.mktemp("examples")
    target = work / "site-packages"
    for package in sorted(EXAMPLES.iterdir()):
        if not (package / "pyproject.toml").exists():
            continue
        source = work / package.name  # pip builds in place and leaves build/: build from a copy
        shutil.copytree(package, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
            check=True,
            capture_output=True,
            timeout=120,
        )  # fmt: skip
    return target


# --- a process group of one, in this process ------------------------------------------


@pytest.fixture
def torchrun_of_one(monkeypatch):
    """torchrun's variables for a group of one process, on a free port; no group yet.
    The group any test joins is left at the end."""
    from trainloop.plugins import distributed

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    variables = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**variables, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    yield
    distributed.destroy_process_group()


@pytest.fixture
def process_group_of_one(torchrun_of_one):
    """A gloo process group of one, joined in this process."""
    from trainloop.plugins import distributed

    assert distributed.init_process_group("gloo", torch.device("cpu"))
    yield
