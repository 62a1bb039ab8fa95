"""The nan_guard plugin: a non-finite loss stops the run before anything corrupt exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_learner

from trainloop import Learner, TrainingError, cli
from trainloop.plugins.checkpoint import Checkpoint
from trainloop.plugins.model_saver import ModelSaver
from trainloop.plugins.nan_guard import NanGuard

RECIPE = '''
"""A linear model whose inputs turn to NaN at one training batch, for nan_guard tests."""

import functools
from dataclasses import dataclass

import torch

from trainloop import Learner


@dataclass
class Config:
    epochs: int = 2
    poison_step: int = 6


class Poison:
    def __init__(self, step):
        self.step = step

    def on_batch_begin(self, learner):
        if learner.training and learner.step + 1 == self.step:
            inputs, target = learner.batch
            learner.batch = (inputs * float("nan"), target)


def build(cfg):
    inputs = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    target = (inputs.sum(dim=1) > 0).long()
    batches = [(inputs[i : i + 8], target[i : i + 8]) for i in range(0, 32, 8)]
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LogSoftmax(dim=1))
    return Learner(model, batches, batches[:1], plugins=[Poison(cfg.poison_step)],
                   optimizer=functools.partial(torch.optim.SGD, lr=0.1))
'''


class Poison:
    """Makes the inputs of training step ``step`` (counted from 1) NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_begin(self, learner: Learner) -> None:
        if learner.training and learner.step + 1 == self.step:
            inputs, target = learner.batch
            learner.batch = (inputs * float("nan"), target)


class StepRecorder:
    """Keeps a copy of the weights after every optimizer step."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, learner: Learner) -> None:
        self.after_step.append({k: v.clone() for k, v in learner.model.state_dict().items()})


def test_a_nan_loss_stops_before_the_optimizer_step(tmp_path: Path) -> None:
    recorder = StepRecorder()
    learner = make_learner([NanGuard(), Poison(step=7), recorder])  # 4 batches an epoch
    with pytest.raises(TrainingError) as raised:
        learner.fit(3)
    message = str(raised.value)
    assert "training loss is nan at epoch 2, batch 3 (both counted from 1)" in message
    assert "\n" not in message
    assert len(recorder.after_step) == 6  # the 7th step never happened
    for name, tensor in learner.model.state_dict().items():
        assert torch.equal(tensor, recorder.after_step[-1][name])
        assert torch.isfinite(tensor).all()


def test_after_a_nan_no_checkpoint_or_model_is_written_from_it(tmp_path: Path) -> None:
    plugins = [NanGuard(), Poison(step=7), Checkpoint(tmp_path, every=1)]
    with pytest.raises(TrainingError):
        make_learner(plugins + [ModelSaver(tmp_path / "model.pt")]).fit(3)
    last = torch.load(tmp_path / "last.pt", weights_only=True)["learner"]
    assert (last["epoch"], last["iteration"], last["step"]) == (1, 2, 6)
    assert not (tmp_path / "model.pt").exists()


def test_off_the_cpu_the_flags_are_read_before_each_checkpoint(tmp_path: Path) -> None:
    # every_batch=False is what an accelerator gets: no per-batch read of the loss.
    guard = NanGuard(every_batch=False)
    recorder = StepRecorder()
    with pytest.raises(TrainingError, match="at epoch 1, batch 2 .*found at the next check"):
        make_learner([guard, Poison(step=2), Checkpoint(tmp_path, every=3), recorder]).fit(2)
    assert len(recorder.after_step) == 3  # it stepped on until the checkpoint at step 3
    last = tmp_path / "last.pt"
    assert not last.exists()  # and raised before writing it


def test_off_the_cpu_the_flags_are_read_at_the_epoch_end() -> None:
    ended = []

    class EpochEnd:
        def on_epoch_end(self, learner: Learner) -> None:
            ended.append(learner.epoch)

    with pytest.raises(TrainingError, match="at epoch 1, batch 2 "):
        make_learner([NanGuard(every_batch=False), Poison(step=2), EpochEnd()]).fit(2)
    assert ended == []  # tryfirst: raised before any other plugin's on_epoch_end


def test_off_the_cpu_a_stop_mid_epoch_still_checks_before_saving(tmp_path: Path) -> None:
    class StopAt3:
        def on_batch_end(self, learner: Learner) -> None:
            learner.should_stop = learner.training and learner.step + 1 == 3

    plugins = [NanGuard(every_batch=False), Poison(step=2), StopAt3()]
    with pytest.raises(TrainingError, match="batch 2 "):
        make_learner(plugins + [ModelSaver(tmp_path / "model.pt")]).fit(2)
    assert not (tmp_path / "model.pt").exists()


def test_finite_losses_pass(tmp_path: Path) -> None:
    history = make_learner([NanGuard(), NanGuard(every_batch=False)]).fit(2)
    assert len(history) == 2


def test_cli_nan_is_one_line_and_exit_1_and_no_nan_guard_lets_it_run(tmp_path, capsys) -> None:
    recipe = tmp_path / "poisoned.py"
    recipe.write_text(RECIPE)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "a")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("trainloop: error: training loss is nan at epoch 2, batch 2")
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "b"), "--no-nan-guard"]) == 0
