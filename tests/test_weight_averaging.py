"""The weight_averaging plugin: EMA and SWA of the weights, used where the model is judged
and saved, kept in checkpoints, exact across a SIGKILL and a resume."""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BEACON, without_timings
from torch.utils.data import DataLoader, Dataset

from trainloop import Learner, cli
from trainloop.plugins.checkpoint import Checkpoint
from trainloop.plugins.model_saver import ModelSaver
from trainloop.plugins.weight_averaging import CHECKPOINT_KEY, WeightAveraging

RECIPE = '''
"""A tiny recipe for weight averaging tests: BatchNorm, dropout, noisy in-memory data."""

import functools
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from trainloop import Learner


@dataclass
class Config:
    epochs: int = 3
    sleep: float = 0.0


class NoisyData(Dataset):
    """Each sample gets fresh noise from the global torch RNG, as augmentation does."""

    def __init__(self, inputs, target):
        self.inputs, self.target = inputs, target

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return self.inputs[index] + 0.1 * torch.randn(8), self.target[index]


def build(cfg):
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(96, 8, generator=generator)
    target = (inputs[:, 0] > 0).long()
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(16, 2), torch.nn.LogSoftmax(dim=1),
    )
    return Learner(
        model,
        DataLoader(NoisyData(inputs, target), batch_size=8, shuffle=True),
        DataLoader(NoisyData(inputs[:32], target[:32]), batch_size=16),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        plugins=[Beacon(cfg.sleep)],
    )
'''
RECIPE += BEACON  # the Beacon(sleep) plugin build() adds
STEPS = 3 * 12  # epochs x batches of 8 out of 96 samples
ENV = {**os.environ, "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"}
AVERAGES = {"ema": ["--ema", "0.9"], "swa": ["--swa-start", "2", "--swa-lr", "0.02"]}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny_average.py"
    path.write_text(RECIPE)
    return path


def _trainloop(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trainloop", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=240)


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def _averaged_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The averaged model's weights in a checkpoint, named as the model's."""
    averaged = checkpoint[CHECKPOINT_KEY]["averaged"]
    return {
        name[len("module.") :]: value for name, value in averaged.items() if name != "n_averaged"
    }


# --- in process: small models, exact expectations --------------------------------------


class NoisyData(Dataset):
    def __init__(self, inputs: torch.Tensor, target: torch.Tensor, noise: float) -> None:
        self.inputs, self.target, self.noise = inputs, target, noise

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        return self.inputs[index] + self.noise * torch.randn(8), self.target[index]


def _build(plugins=(), batchnorm: bool = True, noise: float = 0.1) -> Learner:
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(48, 8, generator=generator)
    target = (inputs[:, 0] > 0).long()
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 16)]
    layers += [torch.nn.BatchNorm1d(16)] if batchnorm else []
    layers += [torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2)]
    model = torch.nn.Sequential(*layers, torch.nn.LogSoftmax(dim=1))
    return Learner(
        model,
        DataLoader(NoisyData(inputs, target, noise), batch_size=8, shuffle=True),
        [(inputs[:8], target[:8]), (inputs[8:16], target[8:16])],
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        plugins=plugins,
    )


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


class Snapshots:
    """Keeps the model's weights after every optimizer step and at every training end."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, learner: Learner) -> None:
        self.steps.append(_state(learner.model))

    def on_train_end(self, learner: Learner) -> None:
        self.epochs.append(_state(learner.model))


@pytest.mark.parametrize("warmup", [True, False], ids=["warmup", "no-warmup"])
def test_the_ema_is_the_hand_computed_average_of_the_weights_after_each_step(warmup):
    snapshots, average = Snapshots(), WeightAveraging(ema=0.8, ema_warmup=warmup)
    learner = _build([snapshots, average], batchnorm=False)
    learner.fit(2)

    expected = None
    for n, weights in enumerate(snapshots.steps):  # n updates came before this one
        if expected is None:
            expected = dict(weights)  # the first update copies the weights
            continue
        decay = min(0.8, (1 + n) / (10 + n)) if warmup else 0.8
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in weights}
    assert average.updates == len(snapshots.steps) == 12
    for name, value in average.averaged.module.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert not torch.allclose(expected["0.weight"], snapshots.steps[-1]["0.weight"], atol=1e-3)


def test_validation_and_predictions_use_the_averaged_weights_training_goes_on_with_its_own():
    _seed(0)
    plain = _build()
    plain.fit(2)
    _seed(0)
    average = WeightAveraging(ema=0.8)
    learner = _build([average])
    learner.fit(2)

    assert average.swapped  # fit leaves the average in the model, kept aside the training weights
    averaged = _state(average.averaged.module)
    _assert_equal(_state(learner.model), averaged)
    # the training itself is untouched by the average
    _assert_equal(average.training_state_dict(learner), _state(plain.model))
    # the validation of each epoch saw the averaged weights
    assert learner.history[-1]["valid_loss"] == pytest.approx(learner.validate()["valid_loss"])
    assert learner.history[-1]["valid_loss"] != pytest.approx(plain.history[-1]["valid_loss"])
    inputs = next(iter(learner.valid_data))[0]
    model = copy.deepcopy(plain.model).eval()
    model.load_state_dict(averaged)
    assert torch.equal(learner.predict([(inputs,)]), model(inputs).detach())

    learner.fit(3)  # a later fit trains on from the training weights, with a new average
    assert average.updates == 18


def test_last_pt_holds_the_training_weights_and_model_pt_the_averaged_ones(tmp_path):
    _seed(0)
    plain = _build()
    plain.fit(2)
    _seed(0)
    average = WeightAveraging(ema=0.8)
    learner = _build(
        [
            Checkpoint(tmp_path / "checkpoints", monitor="valid_loss"),
            ModelSaver(tmp_path / "model.pt", monitor="valid_loss"),
            average,
        ]
    )
    learner.fit(2)

    last = _load(tmp_path / "checkpoints" / "last.pt")
    _assert_equal(last["model"], _state(plain.model))  # written while the average was in
    _assert_equal(_averaged_weights(last), _state(average.averaged.module))
    assert int(last[CHECKPOINT_KEY]["averaged"]["n_averaged"]) == 12
    # model.pt: the averaged weights of the best epoch by valid_loss
    saved = _load(tmp_path / "model.pt")
    best = _load(tmp_path / "checkpoints" / "best.pt")
    _assert_equal(saved["model"], _averaged_weights(best))
    assert saved["metrics"]["valid_loss"] == min(e["valid_loss"] for e in learner.history)


def test_a_resumed_finished_run_writes_the_same_averaged_model_pt(tmp_path):
    # last.pt's "model" (training weights) is not the best epoch's averaged weights, even
    # at that very step: model_saver keeps its own copy in the checkpoint then.
    _seed(0)
    first = tmp_path / "first"
    plugins = [ModelSaver(first / "model.pt", monitor="valid_loss"), WeightAveraging(ema=0.8)]
    _build([Checkpoint(first), *plugins]).fit(2)
    again = tmp_path / "again"
    resumed = _build(
        [
            Checkpoint(again, resume=first / "last.pt"),
            ModelSaver(again / "model.pt", monitor="valid_loss"),
            WeightAveraging(ema=0.8),
        ]
    )
    resumed.fit(2)  # nothing left to train
    _assert_equal(_load(again / "model.pt")["model"], _load(first / "model.pt")["model"])


def test_swa_averages_the_epochs_from_its_start_and_recomputes_the_batchnorm_statistics():
    snapshots, average = Snapshots(), WeightAveraging(swa_start=2, swa_lr=0.02)
    learner = _build([snapshots, average], noise=0.0)  # the same batches in every pass
    learner.fit(4)

    assert average.updates == 3  # the ends of epochs 2, 3 and 4
    state = average.averaged.module.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "4.weight"):
        mean = torch.stack([weights[name] for weights in snapshots.epochs[1:]]).mean(dim=0)
        assert torch.allclose(state[name], mean, atol=1e-6), name
    assert learner.optimizer.param_groups[0]["lr"] == 0.02
    # BatchNorm statistics: those of one pass of the averaged model over the training data,
    # not the training model's running ones that AveragedModel copied with the weights
    recomputed = copy.deepcopy(average.averaged.module)
    torch.optim.swa_utils.update_bn(learner.train_data, recomputed)
    for name in ("1.running_mean", "1.running_var"):
        assert torch.allclose(state[name], recomputed.state_dict()[name], atol=1e-5), name
        assert not torch.allclose(state[name], snapshots.epochs[-1][name], atol=1e-3), name
    assert int(state["1.num_batches_tracked"]) == 6  # one pass of 6 batches, not training's


def test_swa_before_its_start_epoch_validates_the_training_weights():
    _seed(0)
    plain = _build()
    plain.fit(2)
    _seed(0)
    average = WeightAveraging(swa_start=3)
    learner = _build([average])
    learner.fit(2)
    assert average.updates == 0 and not average.swapped
    assert learner.history == plain.history
    _assert_equal(_state(learner.model), _state(plain.model))


class Crash:
    def __init__(self, at: int) -> None:
        self.at = at

    def on_batch_end(self, learner: Learner) -> None:
        if learner.training and learner.step + 1 == self.at:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize(
    ("make", "crash", "every"),
    [
        (lambda: WeightAveraging(ema=0.8), 9, 0),  # resumed from epoch 1's end
        (lambda: WeightAveraging(ema=0.8), 10, 4),  # from batch 8, mid-epoch 1
        (lambda: WeightAveraging(swa_start=2, swa_lr=0.02, swa_anneal_epochs=1), 15, 0),
        (lambda: WeightAveraging(swa_start=2, swa_lr=0.02, swa_anneal_epochs=1), 16, 3),
    ],
    ids=["ema-epoch-end", "ema-mid-epoch", "swa-epoch-end", "swa-mid-epoch"],
)
def test_resume_after_a_crash_reproduces_the_weights_and_the_average(tmp_path, make, crash, every):
    _seed(0)
    reference_average = make()
    reference = _build([reference_average])
    reference.fit(4)
    _seed(0)
    with pytest.raises(RuntimeError, match="simulated crash") as raised:
        _build([Checkpoint(tmp_path, every=every), make(), Crash(crash)]).fit(4)
    traceback.clear_frames(raised.tb)

    _seed(123)  # everything must come from the checkpoint
    average = make()
    resumed = _build([Checkpoint(tmp_path, every=every, resume=tmp_path / "last.pt"), average])
    resumed.fit(4)

    _assert_equal(_state(resumed.model), _state(reference.model))  # the averages, swapped in
    _assert_equal(_state(average.averaged), _state(reference_average.averaged))
    _assert_equal(
        average.training_state_dict(resumed), reference_average.training_state_dict(reference)
    )
    assert resumed.history == reference.history


# --- the command line -----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(AVERAGES))
def test_sigkilled_run_resumed_ends_like_an_uninterrupted_one(recipe, tmp_path, kind):
    options = AVERAGES[kind]
    reference = tmp_path / "uninterrupted"
    result = _trainloop("run", recipe, "--out", reference, *options)
    assert result.returncode == 0, result.stderr

    out = tmp_path / "run"
    command = [sys.executable, "-m", "trainloop", "run", str(recipe), "--out", str(out)]
    command += [*options, "--checkpoint-every", "1", "--sleep", "0.05"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    kill_at = 17 if kind == "ema" else 29  # mid-epoch 2; for SWA, after its first average
    try:
        for line in process.stdout:
            if line.strip() == f"beacon step {kill_at}":
                break
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    killed_at = _load(out / "checkpoints" / "last.pt")["learner"]
    assert kill_at - 1 <= killed_at["step"] < STEPS and killed_at["iteration"] > 0

    resumed = _trainloop(
        "run", recipe, "--out", out, "--resume", *options, "--checkpoint-every", "1"
    )
    assert resumed.returncode == 0, resumed.stderr

    last, expected = (
        _load(out / "checkpoints" / "last.pt"),
        _load(reference / "checkpoints" / "last.pt"),
    )
    _assert_equal(last["model"], expected["model"])
    _assert_equal(last[CHECKPOINT_KEY]["averaged"], expected[CHECKPOINT_KEY]["averaged"])
    _assert_equal(_load(out / "model.pt")["model"], _load(reference / "model.pt")["model"])

    def records(run):  # the throughput plugin's timings differ between any two runs
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return without_timings([json.loads(line) for line in lines])

    assert records(out) == records(reference)
    # model.pt holds the averaged weights (of the best epoch), last.pt the training ones
    best = _load(reference / "checkpoints" / "best.pt")
    _assert_equal(_load(reference / "model.pt")["model"], _averaged_weights(best))
    assert not torch.equal(expected["model"]["0.weight"], _averaged_weights(expected)["0.weight"])
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [0, 1, 2]


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--ema", "1"], "--ema 1.0: give a decay in [0, 1)"),
        (["--ema", "-0.5"], "--ema -0.5: give a decay in [0, 1)"),
        (["--ema", "nan"], "--ema nan: give a decay in [0, 1)"),
        (["--swa-start", "-1"], "--swa-start -1: give the epoch to start averaging at"),
        (["--ema", "0.99", "--swa-start", "2"], "use one weight average at a time"),
        (["--swa-lr", "0.1"], "--swa-lr 0.1: give --swa-start EPOCH too"),
        (["--swa-start", "2", "--swa-lr", "0"], "--swa-lr 0.0: give a positive learning rate"),
        (["--swa-start", "2", "--swa-anneal-epochs", "2"], "give --swa-lr LR too"),
        (["--swa-start", "2", "--swa-lr", "0.1", "--swa-anneal-epochs", "-1"], "0 or more"),
        (["--swa-start", "4"], "--swa-start 4: the run has 3 epochs (--epochs)"),
        (["--ema", "abc"], "--ema: invalid float value: 'abc'"),
    ],
)
def test_bad_values_are_one_line_and_exit_2_before_anything_is_written(
    recipe, tmp_path, capsys, options, said
):
    out = tmp_path / "run"
    assert cli.main(["run", str(recipe), "--out", str(out), *options]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and said in error, error
    assert not out.exists()


def test_the_python_api_refuses_both_averages_or_neither():
    with pytest.raises(ValueError, match="one of ema=DECAY or swa_start=EPOCH"):
        WeightAveraging()
    with pytest.raises(ValueError, match="one of"):
        WeightAveraging(ema=0.9, swa_start=2)
    with pytest.raises(ValueError, match=r"ema=1\.5"):
        WeightAveraging(ema=1.5)
