"""early_stopping: fit ends once the monitored metric stops improving."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from conftest import AddScore, make_learner, write_tiny_recipe

from trainloop import PluginManager, RunConfig, UsageError
from trainloop.cli import main
from trainloop.monitor import Monitor
from trainloop.plugins import early_stopping
from trainloop.plugins.early_stopping import EarlyStopping


class EpochEnds:
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, learner):
        self.epochs.append(learner.epoch)


def test_fit_stops_after_patience_epochs_without_improvement(capsys):
    stopper = EarlyStopping(Monitor("score", "max"), patience=2)
    ends = EpochEnds()
    learner = make_learner(plugins=[AddScore([1, 2, 2, 1.5, 3, 3]), stopper, ends])
    history = learner.fit(6)
    assert [entry["epoch"] for entry in history] == [0, 1, 2, 3]
    assert ends.epochs == [0, 1, 2, 3]  # the last epoch ended normally for other plugins
    assert (stopper.stopped_epoch, stopper.best_epoch, stopper.monitor.best) == (3, 1, 2)
    assert stopper.reason == (
        "early stopping after epoch 3: score has not improved for 2 epoch(s) "
        "(best 2 at epoch 1; mode max, min delta 0)"
    )
    assert stopper.reason in capsys.readouterr().out


def test_an_improvement_smaller_than_min_delta_does_not_count():
    stopper = EarlyStopping(Monitor("score", "min", min_delta=0.1), patience=2)
    history = make_learner(plugins=[AddScore([1.0, 0.95, 0.92, 0.5]), stopper]).fit(4)
    assert len(history) == 3
    assert stopper.monitor.best == 1.0


def test_a_nan_never_counts_as_an_improvement():
    stopper = EarlyStopping(Monitor("score", "min"), patience=2, verbose=False)
    history = make_learner(plugins=[AddScore([math.nan, math.nan, 1.0]), stopper]).fit(3)
    assert len(history) == 2
    assert "no finite value yet" in stopper.reason


def test_improving_every_epoch_never_stops():
    stopper = EarlyStopping(Monitor("score", "min"), patience=1)
    history = make_learner(plugins=[AddScore([5, 4, 3, 2]), stopper]).fit(4)
    assert len(history) == 4
    assert stopper.stopped_epoch is None and stopper.reason is None


def test_its_state_goes_into_checkpoints_so_a_resumed_run_keeps_counting():
    scores = [1, 2, 2, 2, 2, 2]
    first = EarlyStopping(Monitor("score", "max"), patience=3)
    learner = make_learner(plugins=[AddScore(scores), first])
    learner.fit(3)  # epochs 0-2: best 2 at epoch 1, one epoch without improvement
    checkpoint = {}
    learner.hook.on_save_checkpoint(learner=learner, checkpoint=checkpoint)
    assert checkpoint["early_stopping"] == {"best": 2, "best_epoch": 1, "wait": 1}

    class Resume:
        def on_fit_begin(self, learner):
            learner.load_state_dict({**learner.state_dict(), "epoch": 3})
            learner.hook.on_load_checkpoint(learner=learner, checkpoint=checkpoint)

    second = EarlyStopping(Monitor("score", "max"), patience=3)
    resumed = make_learner(plugins=[AddScore(scores), second, Resume()])
    resumed.fit(6)
    assert second.stopped_epoch == 4  # 2 more epochs without improvement, not 3


def test_monitoring_a_validation_metric_without_validation_data_is_a_usage_error():
    learner = make_learner(plugins=[EarlyStopping("valid_loss", patience=2)], valid=False)
    with pytest.raises(UsageError, match="--monitor valid_loss: this learner has no validation"):
        learner.fit(1)


def test_a_monitored_metric_that_does_not_exist_is_a_usage_error_naming_the_known_ones():
    learner = make_learner(plugins=[EarlyStopping("valid_dice", patience=2)])
    with pytest.raises(UsageError, match="--monitor valid_dice: no such metric.*valid_loss"):
        learner.fit(1)


def test_the_cli_registers_the_plugin_only_with_a_patience(tmp_path):
    def registered(patience):
        manager = PluginManager()
        options = argparse.Namespace(
            early_stop_patience=patience,
            early_stop_min_delta=0.01,
            monitor="valid_accuracy",
            mode="auto",
        )
        early_stopping.configure(RunConfig(options, tmp_path, tmp_path / "r.py", None, manager))
        return [plugin for _, plugin in manager.list_name_plugin()]

    assert registered(0) == []
    (stopper,) = registered(3)
    assert stopper.patience == 3
    assert (stopper.monitor.metric, stopper.monitor.mode, stopper.monitor.min_delta) == (
        "valid_accuracy",
        "max",
        0.01,
    )


def test_on_the_command_line_a_run_that_stops_learning_ends_early(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    out = tmp_path / "run"
    argv = ["run", str(recipe), "--out", str(out), "--epochs", "10", "--no-tensorboard"]
    argv += ["--lr", "0", "--early-stop-patience", "2"]  # lr 0: valid_loss never improves
    assert main(argv) == 0
    assert "early stopping after epoch 2: valid_loss has not improved" in capsys.readouterr().out
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


def test_a_negative_patience_is_a_usage_error(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    argv = ["run", str(recipe), "--out", str(tmp_path / "run"), "--early-stop-patience", "-1"]
    assert main(argv) == 2
    assert "--early-stop-patience -1: give a number of epochs" in capsys.readouterr().err
