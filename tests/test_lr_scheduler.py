"""lr_scheduler: schedules stepped per epoch or per optimizer step, resumable."""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import textwrap

import pytest
import torch
from conftest import AddScore, make_learner, write_tiny_recipe
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    OneCycleLR,
    ReduceLROnPlateau,
    StepLR,
)

from trainloop import PluginManager, RunConfig, UsageError
from trainloop.cli import main
from trainloop.monitor import Monitor
from trainloop.plugins import lr_scheduler
from trainloop.plugins.grad_accumulation import GradAccumulation
from trainloop.plugins.lr_scheduler import LRScheduler, NamedSchedule


class StepLrs:
    """Records the learning rate each optimizer step uses."""

    def __init__(self):
        self.lrs = []

    def on_step_begin(self, learner):
        self.lrs.append(learner.optimizer.param_groups[0]["lr"])


def test_a_per_epoch_schedule_steps_at_each_epoch_end_and_reports_lr():
    plugin = LRScheduler(functools.partial(StepLR, step_size=2, gamma=0.5))
    history = make_learner(plugins=[plugin]).fit(5)
    assert [entry["lr"] for entry in history] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert isinstance(plugin.scheduler, StepLR)


def test_a_per_batch_schedule_steps_after_every_optimizer_step():
    recorder = StepLrs()
    plugin = LRScheduler(
        lambda optimizer, learner: OneCycleLR(
            optimizer, max_lr=1.0, total_steps=learner.epochs * len(learner.train_data)
        ),
        interval="batch",
    )
    learner = make_learner(plugins=[plugin, recorder])
    learner.fit(3)  # 4 batches an epoch: exactly total_steps steps, OneCycleLR raises past them
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    reference = OneCycleLR(optimizer, max_lr=1.0, total_steps=12)
    expected = []
    for _ in range(12):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert recorder.lrs == pytest.approx(expected)
    # lr is the rate of each epoch's first batch
    assert [entry["lr"] for entry in learner.history] == pytest.approx(expected[::4])


def test_only_a_per_batch_schedule_implements_a_per_batch_hook():
    seen = []

    class Looks:  # while training: who implements the per-batch on_step_end?
        def on_train_begin(self, learner):
            seen.append(len(learner.hook.on_step_end.get_hookimpls()))

    schedule = functools.partial(StepLR, step_size=1)
    make_learner(plugins=[LRScheduler(schedule), Looks()]).fit(1)
    make_learner(plugins=[LRScheduler(schedule, interval="batch"), Looks()]).fit(1)
    assert seen == [0, 1]


def test_per_batch_steps_follow_optimizer_steps_under_gradient_accumulation():
    recorder = StepLrs()
    plugin = LRScheduler(functools.partial(StepLR, step_size=1, gamma=0.5), interval="batch")
    make_learner(plugins=[plugin, GradAccumulation(2), recorder], valid=False).fit(2)
    # 4 batches an epoch, 2 per step: 4 optimizer steps, the lr halves after each
    assert recorder.lrs == pytest.approx([0.1, 0.05, 0.025, 0.0125])


def test_plateau_decays_when_the_monitored_metric_stops_improving():
    scores = [0.5, 0.6, 0.6, 0.6, 0.6, 0.7]
    plugin = LRScheduler(
        functools.partial(ReduceLROnPlateau, mode="max", factor=0.5, patience=1),
        monitor=Monitor("score", "max"),
    )
    history = make_learner(plugins=[AddScore(scores), plugin]).fit(6)
    # epochs 2 and 3 do not improve on 0.6: with patience 1, the lr halves after epoch 3;
    # the lr metric is the rate an epoch trained with
    assert [entry["lr"] for entry in history] == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05])


def test_plateau_whose_mode_disagrees_with_the_monitor_is_refused():
    plugin = LRScheduler(
        functools.partial(ReduceLROnPlateau, mode="min"), monitor=Monitor("valid_accuracy")
    )
    with pytest.raises(ValueError, match="disagrees with the monitor of valid_accuracy"):
        make_learner(plugins=[plugin]).fit(1)


def test_plateau_on_a_validation_metric_without_validation_data_is_a_usage_error():
    plugin = LRScheduler(ReduceLROnPlateau)
    with pytest.raises(UsageError, match="--monitor valid_loss: this learner has no validation"):
        make_learner(plugins=[plugin], valid=False).fit(1)


class SaveAtEnd:
    """Saves a checkpoint the way the checkpoint plugin does, once fit ends."""

    def __init__(self):
        self.checkpoint = None

    def on_fit_end(self, learner):
        checkpoint = {
            "learner": learner.state_dict(),
            "model": learner.model.state_dict(),
            "optimizer": learner.optimizer.state_dict(),
        }
        learner.hook.on_save_checkpoint(learner=learner, checkpoint=checkpoint)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        self.checkpoint = torch.load(buffer, weights_only=True)


class ResumeFrom:
    """Restores a checkpoint in a plain on_fit_begin, as the checkpoint plugin does."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def on_fit_begin(self, learner):
        learner.load_state_dict(self.checkpoint["learner"])
        learner.model.load_state_dict(self.checkpoint["model"])
        learner.optimizer.load_state_dict(self.checkpoint["optimizer"])
        learner.hook.on_load_checkpoint(learner=learner, checkpoint=self.checkpoint)


class StopAfter:
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, learner):
        if learner.epoch == self.epoch:
            learner.should_stop = True


def cosine_per_batch():
    return LRScheduler(
        lambda optimizer, learner: CosineAnnealingLR(
            optimizer, T_max=learner.epochs * len(learner.train_data)
        ),
        interval="batch",
    )


def test_a_resumed_run_continues_the_schedule_where_it_stopped():
    whole = StepLrs()
    make_learner(plugins=[cosine_per_batch(), whole]).fit(4)

    first, saver = StepLrs(), SaveAtEnd()
    make_learner(plugins=[cosine_per_batch(), first, saver, StopAfter(1)]).fit(4)
    assert "scheduler" in saver.checkpoint
    second = StepLrs()
    plugin = cosine_per_batch()
    resumed = make_learner(plugins=[plugin, second, ResumeFrom(saver.checkpoint)])
    resumed.fit(4)
    assert first.lrs + second.lrs == pytest.approx(whole.lrs)
    assert plugin.scheduler.last_epoch == 16


def test_a_checkpoint_loaded_before_fit_is_applied_to_the_scheduler_fit_makes():
    saver = SaveAtEnd()
    make_learner(plugins=[LRScheduler(functools.partial(StepLR, step_size=1)), saver]).fit(2)
    plugin = LRScheduler(functools.partial(StepLR, step_size=1))
    learner = make_learner(plugins=[plugin])
    learner.hook.on_load_checkpoint(learner=learner, checkpoint=saver.checkpoint)
    learner.optimizer.load_state_dict(saver.checkpoint["optimizer"])
    learner.fit(1)
    assert plugin.scheduler.last_epoch == 3
    assert learner.history[0]["lr"] == pytest.approx(0.001)


# --- the named schedules of the command line -------------------------------------------


def test_cosine_anneals_to_zero_over_every_optimizer_step_of_the_run():
    recorder = StepLrs()
    learner = make_learner(plugins=[LRScheduler(NamedSchedule("cosine"), "batch"), recorder])
    learner.fit(2)  # 8 steps
    expected = [0.05 * (1 + math.cos(math.pi * step / 8)) for step in range(8)]
    assert recorder.lrs == pytest.approx(expected)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_onecycle_counts_the_steps_of_gradient_accumulation():
    recorder = StepLrs()
    schedule = NamedSchedule("onecycle", max_lr=1.0, accumulate=3)
    # 4 batches an epoch, 3 per step: 2 steps an epoch; more steps than counted would raise
    make_learner(plugins=[LRScheduler(schedule, "batch"), GradAccumulation(3), recorder]).fit(3)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    reference = OneCycleLR(optimizer, max_lr=1.0, total_steps=6)
    expected = []
    for _ in range(6):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert recorder.lrs == pytest.approx(expected)


def test_annealing_schedules_fall_back_to_per_epoch_without_a_length():
    class NoLength:
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)

    recorder = StepLrs()
    learner = make_learner(plugins=[LRScheduler(NamedSchedule("cosine"), "batch"), recorder])
    learner.train_data = NoLength(learner.train_data)
    history = learner.fit(4)
    expected = [0.05 * (1 + math.cos(math.pi * epoch / 4)) for epoch in range(4)]
    assert [entry["lr"] for entry in history] == pytest.approx(expected)
    assert recorder.lrs == pytest.approx([lr for lr in expected for _ in range(4)])


def test_step_decays_every_third_of_the_run_by_default():
    history = make_learner(plugins=[LRScheduler(NamedSchedule("step", gamma=0.5))]).fit(6)
    assert [entry["lr"] for entry in history] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def configured(tmp_path, **values):
    defaults = {
        "lr_schedule": "none",
        "lr_step_size": None,
        "lr_gamma": 0.1,
        "lr_max": None,
        "lr_patience": 2,
        "monitor": "valid_loss",
        "mode": "auto",
    }
    manager = PluginManager()
    options = argparse.Namespace(**{**defaults, **values})
    lr_scheduler.configure(RunConfig(options, tmp_path, tmp_path / "r.py", None, manager))
    return [plugin for _, plugin in manager.list_name_plugin()]


def test_the_cli_registers_a_scheduler_only_for_a_schedule(tmp_path):
    assert configured(tmp_path) == []
    (cosine,) = configured(tmp_path, lr_schedule="cosine")
    assert cosine.interval == "batch"
    (plateau,) = configured(tmp_path, lr_schedule="plateau", monitor="valid_accuracy")
    assert plateau.interval == "epoch"
    assert (plateau.monitor.metric, plateau.monitor.mode) == ("valid_accuracy", "max")
    assert plateau.factory.mode == "max"


def test_the_cli_schedule_shows_in_metrics_jsonl_as_lr(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    out = tmp_path / "run"
    argv = ["run", str(recipe), "--out", str(out), "--epochs", "3", "--no-tensorboard"]
    argv += ["--lr-schedule", "step", "--lr-step-size", "1", "--lr-gamma", "0.5"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["lr"] for line in lines] == pytest.approx([0.1, 0.05, 0.025])


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--lr-gamma", "0", "--lr-gamma 0.0: give a factor in (0, 1]"),
        ("--lr-step-size", "0", "--lr-step-size 0: give a number of epochs, at least 1"),
        ("--lr-max", "-1", "--lr-max -1.0: give a positive learning rate"),
    ],
)
def test_bad_schedule_options_are_usage_errors(tmp_path, capsys, option, value, message):
    recipe = write_tiny_recipe(tmp_path)
    argv = ["run", str(recipe), "--out", str(tmp_path / "run"), "--lr-schedule", "step"]
    assert main([*argv, option, value]) == 2
    assert message in capsys.readouterr().err


STOPPER = """
def on_epoch_end(learner):
    if learner.epoch == 1:
        learner.should_stop = True
"""


def test_a_run_resumed_with_the_checkpoint_plugin_continues_the_schedule(
    tmp_path, capsys, monkeypatch
):
    recipe = write_tiny_recipe(tmp_path)
    (tmp_path / "stop_after_epoch_1.py").write_text(textwrap.dedent(STOPPER))
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["run", str(recipe), "--epochs", "4", "--no-tensorboard", "--lr-schedule", "cosine"]

    def lrs(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["lr"] for line in lines]

    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    stopped = tmp_path / "stopped"
    assert main([*common, "--out", str(stopped), "-p", "stop_after_epoch_1"]) == 0
    assert len(lrs(stopped)) == 2
    assert main([*common, "--out", str(stopped), "--resume"]) == 0
    assert lrs(stopped) == pytest.approx(lrs(tmp_path / "whole"))
    expected = [0.05 * (1 + math.cos(math.pi * epoch / 4)) for epoch in range(4)]
    assert lrs(stopped) == pytest.approx(expected)


class CrashAtStep:
    def __init__(self, step):
        self.step = step

    def on_batch_begin(self, learner):
        if learner.training and learner.step == self.step:
            raise RuntimeError("simulated crash")


def test_a_run_resumed_mid_epoch_reports_the_lr_its_epoch_began_with(tmp_path):
    from trainloop.plugins.checkpoint import Checkpoint

    whole = make_learner(plugins=[cosine_per_batch()])
    whole.fit(3)
    # 4 batches an epoch: the step checkpoint after 6 batches is in the middle of epoch 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_learner(
            plugins=[cosine_per_batch(), Checkpoint(tmp_path, every=3), CrashAtStep(6)]
        ).fit(3)
    resume = Checkpoint(tmp_path, resume=tmp_path / "last.pt")
    resumed = make_learner(plugins=[cosine_per_batch(), resume])
    resumed.fit(3)
    lrs = [entry["lr"] for entry in resumed.history]
    assert lrs == pytest.approx([entry["lr"] for entry in whole.history])
    assert lrs == pytest.approx(
        [0.1 * (1 + math.cos(math.pi * 4 * epoch / 12)) / 2 for epoch in range(3)]
    )
