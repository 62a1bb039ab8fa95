"""tensorboard: event files read back with TensorBoard's own reader."""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, implemented_hooks, make_learner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.optim.lr_scheduler import StepLR

from trainloop import PluginManager, RunConfig, hookimpl
from trainloop.cli import main
from trainloop.context import RunContext
from trainloop.hookspecs import event_names
from trainloop.plugins import tensorboard
from trainloop.plugins.lr_scheduler import LRScheduler
from trainloop.plugins.tensorboard import TensorBoardLogger, flat_hparams
from trainloop.tasks.mnist.data import write_idx_files


def read_events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    points = events.Scalars(tag)
    return [point.step for point in points], [point.value for point in points]


def float32(values):
    return [float(np.float32(value)) for value in values]


def test_every_epoch_metric_is_a_scalar_at_step_epoch(tmp_path):
    learner = make_learner(plugins=[TensorBoardLogger(tmp_path)])
    history = learner.fit(3)
    events = read_events(tmp_path)
    assert {"train_loss", "valid_loss", "valid_accuracy"} <= set(events.Tags()["scalars"])
    for tag in ("train_loss", "valid_loss", "valid_accuracy"):
        steps, values = scalars(events, tag)
        assert steps == [0, 1, 2]
        assert values == float32([entry[tag] for entry in history])


def test_keys_other_plugins_add_are_logged_too(tmp_path):
    class Extra:
        def on_epoch_end(self, learner):
            learner.metrics["grad_scale"] = 2.0**learner.epoch

    schedule = LRScheduler(functools.partial(StepLR, step_size=1, gamma=0.5))
    make_learner(plugins=[TensorBoardLogger(tmp_path), Extra(), schedule]).fit(2)
    events = read_events(tmp_path)
    assert scalars(events, "grad_scale") == ([0, 1], [1.0, 2.0])
    assert scalars(events, "lr") == ([0, 1], float32([0.1, 0.05]))


def test_the_training_loss_every_n_batches_when_asked(tmp_path):
    losses = []

    class Losses:
        def on_batch_end(self, learner):
            if learner.training:
                losses.append(learner.loss.item())

    learner = make_learner(plugins=[TensorBoardLogger(tmp_path, every=3), Losses()])
    learner.fit(2)  # 4 batches an epoch: batches 0..7
    events = read_events(tmp_path)
    steps, values = scalars(events, "batch/train_loss")
    assert steps == [0, 3, 6]
    assert values == float32([losses[0], losses[3], losses[6]])
    assert scalars(events, "batch/lr") == ([0, 3, 6], float32([0.1] * 3))


def test_by_default_the_logger_adds_no_per_batch_hook(tmp_path):
    learner = make_learner(plugins=[TensorBoardLogger(tmp_path)])
    seen = set()

    class Watch:  # during training, which per-batch events does anyone implement?
        def on_train_begin(self, learner):
            seen.update(implemented_hooks(learner, event_names()))

    learner.add_plugin(Watch())
    learner.fit(1)
    assert not seen & {"on_batch_begin", "on_batch_end", "on_step_begin", "on_step_end"}
    assert "batch/train_loss" not in read_events(tmp_path).Tags()["scalars"]


class Renderer:
    """Renders the inputs of a batch as a picture: one row per sample."""

    def __init__(self):
        self.batches = []

    @hookimpl
    def render_batch(self, learner, batch, pred):
        inputs, _ = batch
        self.batches.append((inputs, pred))
        picture = torch.sigmoid(inputs)[None].expand(3, -1, -1)  # 3 x K x 4
        grid = torch.sigmoid(inputs)[:, None, None, :].expand(-1, 3, 2, -1)  # K x 3 x 2 x 4
        return {"inputs": picture, "grid": grid}


def test_the_first_k_validation_samples_are_rendered_each_epoch(tmp_path):
    renderer = Renderer()
    learner = make_learner(plugins=[TensorBoardLogger(tmp_path, images=5), renderer])
    learner.fit(2)
    first_inputs = learner.valid_data[0][0][:5]
    assert len(renderer.batches) == 2  # once per epoch
    inputs, pred = renderer.batches[0]
    torch.testing.assert_close(inputs, first_inputs)
    assert pred.shape == (5, 2)
    events = read_events(tmp_path)
    pictures = events.Images("valid_images/inputs")
    assert [picture.step for picture in pictures] == [0, 1]
    assert (pictures[0].height, pictures[0].width) == (5, 4)
    assert [picture.step for picture in events.Images("valid_images/grid")] == [0, 1]


def test_samples_are_gathered_across_validation_batches_when_one_is_too_small(tmp_path):
    renderer = Renderer()
    learner = make_learner(plugins=[TensorBoardLogger(tmp_path, images=20), renderer])
    learner.fit(1)  # validation batches of 16: the first one and 4 samples of the next
    inputs, pred = renderer.batches[0]
    expected = torch.cat([learner.valid_data[0][0], learner.valid_data[1][0][:4]])
    torch.testing.assert_close(inputs, expected)
    assert pred.shape == (20, 2)


def test_sample_watching_stops_once_it_has_the_samples_and_never_sees_training(tmp_path):
    watched = []

    class Count:  # which batches does the sample watcher see?
        def on_batch_begin(self, learner):
            names = [name for name, _ in learner.plugin_manager.list_name_plugin()]
            watched.append((learner.training, any("ValidationSamples" in n for n in names)))

    learner = make_learner(plugins=[TensorBoardLogger(tmp_path, images=4), Renderer(), Count()])
    learner.fit(1)
    # 4 training batches without it; 4 validation batches: it unregisters in the first
    assert watched == [(True, False)] * 4 + [(False, True)] + [(False, False)] * 3


def test_without_a_render_batch_implementation_no_images_are_written(tmp_path):
    learner = make_learner(plugins=[TensorBoardLogger(tmp_path, images=4)])
    learner.fit(1)
    assert read_events(tmp_path).Tags()["images"] == []


def test_a_render_batch_returning_a_bad_image_names_it(tmp_path):
    class Bad:
        @hookimpl
        def render_batch(self, batch, pred):
            return {"flat": torch.zeros(4, 4)}

    learner = make_learner(plugins=[TensorBoardLogger(tmp_path), Bad()])
    with pytest.raises(ValueError, match="render_batch returned image 'flat' of shape \\(4, 4\\)"):
        learner.fit(1)


@dataclass
class Config:
    lr: float = 0.1
    folder: Path = Path("data")
    limit: int | None = None


def hparams_of(events: EventAccumulator) -> plugin_data_pb2.HParamsPluginData:
    contents = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(contents["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(contents["_hparams_/experiment"])
    return start.session_start_info, experiment.experiment


def test_the_recipe_config_is_written_as_hyperparameters_with_the_final_metrics(tmp_path):
    learner = make_learner(plugins=[TensorBoardLogger(tmp_path)])
    learner.config = Config()
    learner.fit(2)
    start, experiment = hparams_of(read_events(tmp_path))
    assert start.hparams["lr"].number_value == pytest.approx(0.1)
    assert start.hparams["folder"].string_value == "data"
    assert start.hparams["epochs"].number_value == 2
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert metrics == {"train_loss", "valid_loss", "valid_accuracy"}


def test_flat_hparams_flattens_nested_values_and_stringifies_the_rest():
    config = {"model": {"width": 8, "act": "relu"}, "sizes": (4, 2), "limit": None, "on": True}
    assert flat_hparams(config) == {
        "model.width": 8,
        "model.act": "relu",
        "sizes": "(4, 2)",
        "limit": "None",
        "on": True,
    }


def test_the_file_is_flushed_each_epoch_and_closed_when_fit_fails(tmp_path):
    class FailInSecondEpoch:
        def on_train_begin(self, learner):
            if learner.epoch == 1:
                raise RuntimeError("boom")

    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(RuntimeError):
        make_learner(plugins=[logger, FailInSecondEpoch()]).fit(3)
    assert logger.writer is None
    assert scalars(read_events(tmp_path), "valid_loss")[0] == [0]


def configured(tmp_path, main_process=True, **values):
    defaults = {"tensorboard": True, "tensorboard_every": 0, "tensorboard_images": 4}
    options = argparse.Namespace(**{**defaults, **values})
    manager = PluginManager()
    context = RunContext(rank=0 if main_process else 1, world_size=2)
    config = RunConfig(options, tmp_path, tmp_path / "r.py", None, manager, context)
    tensorboard.configure(config)
    return [plugin for _, plugin in manager.list_name_plugin()]


def test_the_cli_logs_into_the_run_folder_on_the_main_process_only(tmp_path):
    (logger,) = configured(tmp_path)
    assert logger.log_dir == tmp_path
    assert logger.every == 0
    (stepping,) = configured(tmp_path, tensorboard_every=10)
    assert stepping.every == 10
    assert configured(tmp_path, tensorboard=False) == []
    assert configured(tmp_path, main_process=False) == []


# --- the command line, with the MNIST recipe -------------------------------------------


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mnist")
    write_idx_files(folder / "MNIST" / "raw", n_train=400, n_test=200)
    return folder


MNIST = str(ROOT / "recipes" / "mnist_mlp.py")


def test_mnist_runs_with_every_plugin_of_this_family_on(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", MNIST, "--data-dir", str(mnist_dir), "--no-download", "--epochs", "2"]
    argv += ["--out", str(out), "--lr-schedule", "onecycle", "--accumulate", "2"]
    argv += ["--clip-grad-norm", "1.0", "--early-stop-patience", "3", "--tensorboard-every", "1"]
    assert main(argv) == 0
    events = read_events(out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps, values = scalars(events, "valid_accuracy")
    assert steps == [0, 1]
    assert values == float32([line["valid_accuracy"] for line in lines])
    assert scalars(events, "lr")[1] == float32([line["lr"] for line in lines])
    assert scalars(events, "batch/train_loss")[0] == [0, 1, 2, 3]  # 2 batches of 200 an epoch
    start, _ = hparams_of(events)
    assert start.hparams["batch_size"].number_value == 200


def test_a_default_mnist_run_writes_the_epoch_scalars(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", MNIST, "--data-dir", str(mnist_dir), "--no-download", "--epochs", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    events = read_events(out)
    assert scalars(events, "train_loss")[0] == [0, 1]
    assert "lr" not in events.Tags()["scalars"]  # no schedule: no lr key


def test_no_tensorboard_writes_no_event_file(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", MNIST, "--data-dir", str(mnist_dir), "--no-download", "--epochs", "1"]
    assert main([*argv, "--out", str(out), "--no-tensorboard"]) == 0
    assert list(out.glob("events.out.tfevents.*")) == []


def test_help_shows_the_options_of_this_family(capsys):
    with pytest.raises(SystemExit):
        main(["run", MNIST, "--help"])
    text = capsys.readouterr().out
    for option in (
        "--tensorboard-every",
        "--tensorboard-images",
        "--no-tensorboard",
        "--early-stop-patience",
        "--early-stop-min-delta",
        "--monitor",
        "--lr-schedule",
        "--lr-max",
        "--clip-grad-norm",
        "--clip-grad-value",
        "--accumulate",
    ):
        assert option in text


def test_a_negative_image_count_is_a_usage_error(mnist_dir, tmp_path, capsys):
    argv = ["run", MNIST, "--data-dir", str(mnist_dir), "--no-download"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--tensorboard-images", "-1"]) == 2
    assert "--tensorboard-images -1: give a number, 0 or more" in capsys.readouterr().err
