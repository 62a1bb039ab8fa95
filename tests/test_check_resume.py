"""trainloop check-resume: real runs killed with SIGKILL and resumed, the culprits named, bad input.

Every check starts real ``trainloop run`` processes, most of whose time goes into
importing torch; the checks of this module run two at a time in one fixture, and the
tests then read their reports.
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from trainloop.check_resume import (
    PROBE_SPEC,
    KillResult,
    ResumeReport,
    _compare,
    _kill_points,
    _Records,
    check_resume,
    timing_metrics,
)
from trainloop.check_resume import fingerprint as content_print
from trainloop.cli import main
from trainloop.tasks.carvana.synthetic import generate_dataset
from trainloop.tasks.mnist.data import write_idx_files

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")

RECIPE = '''
"""A tiny recipe for check-resume: an MLP with dropout on noisy in-memory data, and
``--broken`` ways to lose state on a resume."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainloop import Learner


@dataclass
class Config:
    epochs: int = 3
    samples: int = 32
    broken: str = "none"


class NoisyData(Dataset):
    """Each sample gets fresh noise from the global torch RNG, as augmentation does."""

    def __init__(self, inputs, target):
        self.inputs, self.target = inputs, target

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return self.inputs[index] + 0.1 * torch.randn(8), self.target[index]


class ShiftingSampler(Sampler[int]):
    """Each epoch starts one sample later: it counts the epochs itself, in no checkpoint."""

    def __init__(self, length):
        self.length, self.epochs = length, 0

    def __iter__(self):
        start, self.epochs = self.epochs, self.epochs + 1
        return iter([(start + i) % self.length for i in range(self.length)])

    def __len__(self):
        return self.length


class Warmup:
    """Raises the learning rate over the first 10 steps, counting them itself (not saved)."""

    def __init__(self):
        self.steps = 0

    def on_step_begin(self, learner):
        self.steps += 1
        for group in learner.optimizer.param_groups:
            group["lr"] = 0.01 * min(1.0, self.steps / 10)


def build(cfg):
    if cfg.broken == "crash":
        raise RuntimeError("the data is on fire")
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(cfg.samples, 8, generator=generator)
    target = (inputs[:, 0] > 0).long()
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(16, 2), torch.nn.LogSoftmax(dim=1),
    )
    data = NoisyData(inputs, target)
    if cfg.broken == "sampler":
        train = DataLoader(data, batch_size=8, sampler=ShiftingSampler(len(data)))
    else:
        train = DataLoader(data, batch_size=8, shuffle=True)
    return Learner(
        model,
        train,
        DataLoader(NoisyData(inputs[:16], target[:16]), batch_size=8),
        optimizer=functools.partial(torch.optim.Adam, lr=0.01),
        plugins=[Warmup()] if cfg.broken == "plugin" else [],
    )
'''
RECIPES = ROOT / "recipes"
# 2 cars at 32x16: 16 training photos in 4 batches, 16 validation photos, 1 test car.
CARVANA = ["--image-size", "32", "16", "--depth", "2", "--base-width", "4", "--batch-size", "4",
           "--epochs", "2", "--no-tensorboard"]  # fmt: skip
EVERY_PLUGIN = ["--lr-schedule", "onecycle", "--accumulate", "2", "--clip-grad-norm", "1.0",
                "--early-stop-patience", "5", "--keep-best", "2", "--summary",
                "--tensorboard-every", "1", "--precision", "bf16-mixed", "--progress", "plain",
                "--ema", "0.9"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The tiny recipe, a small MNIST in IDX files and a small Carvana set."""
    folder = tmp_path_factory.mktemp("check_resume")
    (folder / "tiny.py").write_text(RECIPE)
    write_idx_files(folder / "mnist" / "MNIST" / "raw", n_train=200, n_test=50, seed=0, gz=False)
    generate_dataset(folder / "carvana", n_train_cars=2, n_test_cars=1, size=(72, 40), seed=0)
    return folder


def _cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trainloop", "check-resume", *args]
    env = {**os.environ, "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def checks(data: Path) -> dict[str, ResumeReport | subprocess.CompletedProcess]:
    """Every check of this module, run two at a time; by name, its report or process."""
    tiny = str(data / "tiny.py")
    mnist = ["--data-dir", str(data / "mnist"), "--no-download", "--sample-size", "200",
             "--batch-size", "50", "--epochs", "3"]  # fmt: skip
    carvana = [str(RECIPES / "unet_carvana.py"), "--input-dir", str(data / "carvana"), *CARVANA]
    calls = {
        "single_node": lambda: check_resume(
            RECIPES / "single_node.py",
            ["--epochs", "2", "--steps-per-epoch", "6", "--profile", "2"],
            kills=1,
        ),
        "mnist_mlp with every plugin": lambda: check_resume(
            RECIPES / "mnist_mlp.py", [*mnist, *EVERY_PLUGIN], kills=2, jobs=2
        ),
        "carvana, 0 workers": lambda: _cli(data, *carvana, "--no-predict", "--kills", "1"),
        "carvana, 2 workers": lambda: check_resume(
            carvana[0],
            [*carvana[1:], "--workers", "2", "--swa-start", "1"],
            kills=1,
            compare_files=["submit.csv.gz"],
        ),
        "broken sampler": lambda: _cli(data, tiny, "--broken", "sampler", "--kills", "1"),
        "broken plugin": lambda: check_resume(tiny, ["--broken", "plugin"], kills=1),
        "crashing recipe": lambda: _cli(data, tiny, "--broken", "crash"),
        "one batch": lambda: _cli(data, tiny, "--epochs", "1", "--samples", "8"),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD", "1")  # installed plugins stay out
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            futures = {name: pool.submit(call) for name, call in calls.items()}
            return {name: future.result() for name, future in futures.items()}


# --- the bundled recipes and the built-in plugins resume exactly --------------------------


@pytest.mark.parametrize(
    "name", ["single_node", "mnist_mlp with every plugin", "carvana, 2 workers"]
)
def test_a_bundled_recipe_resumes_bit_identically_after_each_kill(checks, name):
    report = checks[name]
    assert report.identical, report.format()
    assert [kill.identical for kill in report.kills] == [True] * len(report.kill_steps)
    assert report.epoch_ends >= 1  # the stretch crosses an epoch end
    for kill in report.kills:  # killed after a batch, resumed from the checkpoint before it
        assert kill.resumed_from == kill.kill_step - 1
        assert kill.culprit is None and not kill.differences


def test_the_first_kill_falls_after_the_first_epoch_end(checks):
    report = checks["single_node"]
    assert (report.batches_per_epoch, report.steps) == (6, 11)  # an epoch and 5 batches
    assert report.batches_per_epoch < report.kill_steps[0] <= report.steps


def test_the_command_prints_one_identical_row_per_kill_and_exits_0(checks):
    result = checks["carvana, 0 workers"]
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("check-resume ") and "8 steps (2 epoch ends" in lines[0]
    # the throughput plugin's timings differ between any two runs: left out, and said so
    assert lines[2] == "not compared (timings): train_data_wait, train_samples_per_second"
    assert lines[3] == "kill  killed at step  resumed from step  result"
    (row,) = lines[4:-1]
    assert row.split()[0] == "1" and row.split()[-1] == "identical"
    assert lines[-1].startswith("resume is exact: 1 of 1 kills identical")


# --- broken state is found and named -------------------------------------------------------


def test_a_sampler_with_hidden_state_exits_1_naming_the_batches_after_the_resume(checks):
    result = checks["broken sampler"]
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout
    assert "differs" in output and "resume is not exact" in output
    assert "first different batch: step " in output
    assert (
        "likely culprit: the batches after the resume differ: your sampler or dataset keeps "
        "state the checkpoint doesn't hold — see docs/writing-a-recipe.md" in output
    )
    assert "sampler ShiftingSampler may keep state" in output  # the resume's own warning


def test_a_plugin_that_does_not_save_its_state_is_named(checks):
    report = checks["broken plugin"]
    assert not report.identical
    (kill,) = report.kills
    assert kill.culprit.startswith("plugin 'Warmup' keeps state that no checkpoint holds (steps")
    assert "on_save_checkpoint" in kill.culprit
    assert kill.first_batch_step is None  # the same batches: not the data
    assert any(part.startswith("parameters and buffers: 0.weight") for part in kill.differences)
    assert "optimizer: lr of group 0" in "; ".join(kill.differences)
    assert "likely culprit: plugin 'Warmup'" in report.format()


# --- bad input: one line, exit status 2 ----------------------------------------------------


def test_a_recipe_that_fails_on_its_own_is_reported_not_judged(checks):
    result = checks["crashing recipe"]
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert (
        "fails on its own, before any kill (exit status 1): RuntimeError: the data is on fire"
        in (result.stderr)
    )
    assert "identical" not in result.stdout and "differ" not in result.stdout


def test_a_run_too_short_to_kill_says_what_to_raise(checks):
    result = checks["one batch"]
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "trains 1 step and checkpoints 1 of them" in result.stderr
    assert "raise --epochs, --steps or the data" in result.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--kills", "0"], "--kills 0: give 1 or more kills"),
        (["--out", "elsewhere"], "--out: check-resume chooses the run folders"),
        (["--resume"], "--resume: check-resume chooses the run folders"),
        (["--checkpoint-every", "0"], "--checkpoint-every 0: give 1 or more batches"),
        (["--kills", "two"], "argument --kills: invalid int value: 'two'"),
    ],
)
def test_bad_check_options_are_one_line_and_exit_2_before_any_run(
    options, message, tmp_path, capsys
):
    recipe = tmp_path / "tiny.py"
    recipe.write_text(RECIPE)
    status = main(["check-resume", str(recipe), *options, "--work-dir", str(tmp_path / "w")])
    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1 and message in error
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_a_missing_recipe_is_named(tmp_path, capsys):
    assert main(["check-resume", str(tmp_path / "nowhere.py")]) == 2
    assert "nowhere.py does not exist" in capsys.readouterr().err


def test_the_probe_refuses_to_load_outside_a_check(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRAINLOOP_CHECK_RESUME", raising=False)
    recipe = tmp_path / "tiny.py"
    recipe.write_text(RECIPE)
    assert main(["run", str(recipe), "-p", PROBE_SPEC, "--out", str(tmp_path / "run")]) == 2
    assert "runs only there" in capsys.readouterr().err


# --- the parts -----------------------------------------------------------------------------


def test_fingerprints_tell_apart_what_differs_in_a_single_bit():
    weights = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert content_print({"w": weights, "n": [1, 2.5]}) == content_print(
        {"n": [1, 2.5], "w": weights.clone()}
    )
    flipped = weights.clone()
    flipped.view(torch.int32)[0, 0] ^= 1  # the lowest bit of one number
    assert content_print(flipped) != content_print(weights)
    assert content_print(torch.tensor(0.0)) != content_print(torch.tensor(-0.0))
    assert content_print(weights) != content_print(weights.double())
    assert content_print(weights) != content_print(weights.reshape(3, 2))
    assert content_print(object()) is None and content_print(Path("x")) is None
    assert content_print("runs/a/b", skip_text="runs/a") is None


def _records(steps: int, batches_per_epoch: int) -> _Records:
    records = _Records(start={"step": 0})
    for step in range(1, steps + 1):
        epoch, index = divmod(step - 1, batches_per_epoch)
        records.batches[step] = {"epoch": epoch, "iteration": index}
        records.saves[(epoch, index + 1, step)] = {}
        if index + 1 == batches_per_epoch:
            records.saves[(epoch + 1, 0, step)] = {}
    return records


def test_kill_points_come_from_the_seed_have_a_checkpoint_before_and_one_is_after_an_epoch():
    records = _records(steps=30, batches_per_epoch=20)
    points = _kill_points(records, 3, seed=7, recipe="r.py", every=1)
    assert points == _kill_points(records, 3, seed=7, recipe="r.py", every=1)
    assert points != _kill_points(records, 3, seed=8, recipe="r.py", every=1)
    assert len(set(points)) == 3 and all(2 <= point <= 30 for point in points)
    assert any(point > 20 for point in points)
    assert _kill_points(records, 40, seed=0, recipe="r.py", every=1)[-1] <= 30  # more than steps


def _run_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two run folders with the same final checkpoint and metrics."""
    folders = tmp_path / "uninterrupted", tmp_path / "kill-1"
    for folder in folders:
        (folder / "checkpoints").mkdir(parents=True)
        torch.save({"model": {"w": torch.ones(2)}}, folder / "checkpoints" / "last.pt")
        (folder / "metrics.jsonl").write_text('{"epoch": 0}\n')
    return folders


def _compared(tmp_path: Path, change) -> KillResult:
    """Compare a killed (at step 5) and resumed run with ``change(killed, resumed)`` applied."""
    reference = _records(steps=8, batches_per_epoch=4)
    for step, batch in reference.batches.items():
        batch.update(batch=f"b{step}", rng={"torch": f"r{step}"}, loss=1.0 / step)
    killed, resumed = copy.deepcopy(reference), copy.deepcopy(reference)
    killed.batches = {step: batch for step, batch in killed.batches.items() if step <= 5}
    killed.saves = {key: parts for key, parts in killed.saves.items() if key[2] < 5}
    resumed.start = {"step": 4}
    resumed.batches = {step: batch for step, batch in resumed.batches.items() if step > 4}
    resumed.saves = {key: parts for key, parts in resumed.saves.items() if key[2] > 4}
    folders = _run_folders(tmp_path)
    change(killed, resumed)
    result = KillResult(number=1, kill_step=5, resumed_from=4)
    _compare(result, reference, [killed, resumed], *folders, ())
    return result


def test_the_same_records_and_state_are_identical(tmp_path):
    result = _compared(tmp_path, lambda killed, resumed: None)
    assert result.identical and result.culprit is None


def test_a_difference_before_the_kill_means_the_run_is_not_reproducible(tmp_path):
    def change(killed, resumed):
        killed.batches[3]["loss"] = 0.5

    result = _compared(tmp_path, change)
    assert not result.identical
    assert result.first_difference == "step 3 (epoch 1, batch 3): the loss"
    assert result.culprit.startswith("the run is not reproducible: before its kill")


def test_a_different_rng_state_before_the_same_batch_blames_the_random_numbers(tmp_path):
    def change(killed, resumed):
        resumed.batches[6]["rng"] = {"torch": "other"}
        resumed.batches[6]["loss"] = 0.5

    result = _compared(tmp_path, change)
    assert (
        result.first_difference == "step 6 (epoch 2, batch 2): the torch RNG state before the batch"
    )
    assert result.first_loss_step == 6 and result.first_batch_step is None
    assert result.culprit.startswith("the torch RNG state differs before a batch that is the same")


def test_a_plugins_checkpoint_part_that_differs_first_names_the_plugin(tmp_path):
    def change(killed, resumed):
        resumed.saves[(1, 2, 6)] = {"warmup": "other"}

    result = _compared(tmp_path, change)
    assert (
        result.first_difference
        == "step 6 (epoch 2, batch 2): the checkpoint's plugin state 'warmup'"
    )
    assert result.culprit.startswith("the plugin state 'warmup' in the checkpoint differs")


def test_a_file_that_differs_only_at_the_end_is_named(tmp_path):
    def change(killed, resumed):
        (tmp_path / "kill-1" / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 0}\n')

    result = _compared(tmp_path, change)
    assert result.first_difference is None
    assert result.differences == ["metrics.jsonl: 2 lines, the run never stopped has 1"]
    assert result.culprit.startswith("metrics.jsonl: 2 lines")


def test_timings_are_left_out_of_metrics_jsonl_and_a_csv_file(tmp_path):
    folders = _run_folders(tmp_path)
    for folder, rate in zip(folders, (80.5, 91.0)):  # the same epoch, timed differently
        (folder / "metrics.jsonl").write_text(
            f'{{"epoch": 0, "train_samples_per_second": {rate}}}\n'
        )
        (folder / "metrics.csv").write_text(f"epoch,train_samples_per_second,loss\n0,{rate},0.5\n")
    reference = _records(steps=8, batches_per_epoch=4)
    resumed = copy.deepcopy(reference)
    resumed.start = {"step": 4}
    for ignored, identical in (((), False), (timing_metrics(), True)):
        result = KillResult(number=1, kill_step=5, resumed_from=4)
        segments = [copy.deepcopy(reference), resumed]
        _compare(result, reference, segments, *folders, ["metrics.csv"], ignored)
        assert result.identical == identical, result.differences
