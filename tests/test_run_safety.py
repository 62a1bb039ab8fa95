"""Nothing a user ran is lost or misrecorded: owned run folders, honest resumes, robust files.

One test (or a few) per item of the run-safety issue; each reproduces the old failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trainloop.cli import main
from trainloop.run_folder import LOCK_NAME, new_run_dir, read_jsonl

RECIPE = """
from dataclasses import dataclass, field
import functools, torch
from trainloop import Learner

@dataclass
class Config:
    lr: float = 0.1
    batch_size: int = 8
    width: int = 2
    split: int = field(default=0, metadata={"resume": "fixed"})

def build(cfg):
    torch.manual_seed(0)
    inputs = torch.randn(32, 4)
    target = (inputs.sum(1) > 0).long() % cfg.width
    size = cfg.batch_size
    data = [(inputs[i:i + size], target[i:i + size]) for i in range(0, 32, size)]
    model = torch.nn.Sequential(torch.nn.Linear(4, cfg.width), torch.nn.LogSoftmax(1))
    return Learner(model, data, data, optimizer=functools.partial(torch.optim.SGD, lr=cfg.lr))
"""

STOP_AFTER_TWO_BATCHES = """
def on_batch_end(learner):
    if learner.training and learner.step == 1:  # the second batch of the first epoch
        learner.should_stop = True
"""

SLOW = """
import time

def on_batch_end(learner):
    print("batch", learner.step, flush=True)
    time.sleep(0.2)
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "safe.py"
    path.write_text(RECIPE)
    return path


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch) -> Path:
    """A folder on sys.path (and PYTHONPATH) with the test plugins as modules."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "stop_two.py").write_text(STOP_AFTER_TWO_BATCHES)
    (folder / "slow.py").write_text(SLOW)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return folder


def run(*args, capsys) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def spawn(*args, cwd: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "trainloop", *map(str, args)]
    env = {**os.environ, "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (the lock file's content is the owner's)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != LOCK_NAME
    }


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- 1. a re-run never destroys the earlier run ----------------------------------------


def test_a_fresh_run_into_a_folder_that_holds_a_run_is_refused_and_changes_nothing(
    recipe, tmp_path, capsys
):
    out = tmp_path / "run"
    assert run("run", recipe, "--epochs", 3, "--out", out, capsys=capsys)[0] == 0
    before = snapshot(out)
    assert len(read_jsonl(out / "metrics.jsonl")[0]) == 3

    status, _, err = run("run", recipe, "--epochs", 1, "--lr", 2, "--out", out, capsys=capsys)

    assert status == 2
    line = one_error_line(err)
    assert f"--out {out} already holds a run" in line
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(out) == before


def test_a_folder_with_other_files_is_not_taken_over_either(recipe, tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    status, _, err = run("run", recipe, "--out", out, capsys=capsys)
    assert status == 2 and "already holds files (notes.txt)" in one_error_line(err)
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_an_empty_out_folder_is_used(recipe, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert run("run", recipe, "--out", out, capsys=capsys)[0] == 0
    assert (out / "config.json").exists()


def test_overwrite_replaces_the_run_and_drops_the_old_one_once_the_new_one_has_a_checkpoint(
    recipe, tmp_path, capsys
):
    out = tmp_path / "run"
    assert run("run", recipe, "--epochs", 3, "--out", out, capsys=capsys)[0] == 0

    status, stdout, _ = run(
        "run", recipe, "--epochs", 1, "--lr", 2, "--out", out, "--overwrite", capsys=capsys
    )

    assert status == 0
    assert "--overwrite: the run it replaces is in" in stdout
    assert [record["epoch"] for record in read_jsonl(out / "metrics.jsonl")[0]] == [0]
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 2
    assert not list(tmp_path.glob("run.replaced-*"))  # deleted: the new run has a checkpoint


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_before_its_first_checkpoint(
    recipe, tmp_path, plugins, capsys
):
    out = tmp_path / "run"
    assert run("run", recipe, "--epochs", 2, "--out", out, capsys=capsys)[0] == 0
    before = snapshot(out)
    (plugins / "crash.py").write_text(
        "def on_batch_end(learner):\n    raise RuntimeError('boom')\n"
    )

    status, _, err = run("run", recipe, "--out", out, "--overwrite", "-p", "crash", capsys=capsys)

    assert status == 1 and "boom" in err
    (aside,) = tmp_path.glob("run.replaced-*")
    assert f"the run that --overwrite replaced is kept in {aside}" in err
    assert snapshot(aside) == before


def test_overwrite_and_resume_together_are_a_usage_error(recipe, tmp_path, capsys):
    status, _, err = run(
        "run", recipe, "--out", tmp_path / "r", "--overwrite", "--resume", capsys=capsys
    )
    assert status == 2 and "give one of them" in one_error_line(err)
    assert not (tmp_path / "r").exists()


# --- 2. ownership: unique default folders, a lock --------------------------------------


def test_default_folders_are_unique_for_runs_started_in_the_same_second(tmp_path):
    folders = {new_run_dir("recipes/x.py", root=tmp_path) for _ in range(3)}
    assert len(folders) == 3 and all(folder.is_dir() for folder in folders)
    stamp = min(folder.name for folder in folders)
    assert {folder.name for folder in folders} <= {stamp, f"{stamp}-2", f"{stamp}-3", f"{stamp}-4"}


def test_two_runs_started_at_once_with_the_default_folder_get_one_folder_each(recipe, tmp_path):
    runs = [spawn("run", recipe, "--epochs", 2, cwd=tmp_path) for _ in range(2)]
    for process in runs:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    folders = sorted((tmp_path / "runs" / "safe").iterdir())
    assert len(folders) == 2
    for folder in folders:
        assert len(read_jsonl(folder / "metrics.jsonl")[0]) == 2
        assert json.loads((folder / "config.json").read_text())["options"]["out"] is None


def test_a_live_run_locks_its_folder_and_a_killed_one_does_not(recipe, tmp_path, plugins):
    out = tmp_path / "run"
    first = spawn(
        "run", recipe, "--epochs", 50, "--out", out, "-p", "slow", "--checkpoint-every", 1
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoints" / "last.pt").exists():
            assert time.monotonic() < deadline and first.poll() is None, first.stderr.read()
            time.sleep(0.1)
        second = spawn("run", recipe, "--epochs", 50, "--out", out, "--resume")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2
        line = one_error_line(err)
        assert f"{out} is in use by another run (pid {first.pid} on " in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # The kernel dropped the dead run's lock: a resume takes the folder over.
    third = spawn("run", recipe, "--epochs", 3, "--out", out, "--resume")
    _, err = third.communicate(timeout=60)
    assert third.returncode == 0, err


# --- 3. a resume never ignores a changed option ----------------------------------------


def test_a_resume_applies_a_new_lr_lists_it_and_records_it(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("run", recipe, "--epochs", 2, "--lr", 0.5, "--out", out, capsys=capsys)[0] == 0
    config_before = json.loads((out / "config.json").read_text())

    status, stdout, _ = run(
        "run", recipe, "--epochs", 3, "--lr", 0.001, "--resume", "--out", out, capsys=capsys
    )

    assert status == 0
    assert "resume: options changed since the checkpoint, applied: --lr 0.5 -> 0.001" in stdout
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.001  # it trained at 0.001
    config = json.loads((out / "config.json").read_text())
    assert config["config"] == config_before["config"]  # how the run started stays as it was
    (resume,) = config["resumes"]
    assert resume["changed"]["lr"] == [0.5, 0.001] and resume["changed"]["epochs"] == [2, 3]
    assert "--resume" in resume["command"]


def test_a_resume_with_more_epochs_stretches_the_cosine_schedule(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--lr", 0.1, "--lr-schedule", "cosine", "--out", out)
    assert run("run", recipe, "--epochs", 2, *args, capsys=capsys)[0] == 0
    assert run("run", recipe, "--epochs", 4, *args, "--resume", capsys=capsys)[0] == 0
    fresh = tmp_path / "fresh"
    assert run("run", recipe, "--epochs", 4, *args[:-1], fresh, capsys=capsys)[0] == 0

    resumed_lrs = [record["lr"] for record in read_jsonl(out / "metrics.jsonl")[0]]
    fresh_lrs = [record["lr"] for record in read_jsonl(fresh / "metrics.jsonl")[0]]
    # Epochs 0-1 followed a 2-epoch schedule; from the resume on, the 4-epoch one.
    assert resumed_lrs[2:] == pytest.approx(fresh_lrs[2:], rel=1e-6)
    assert resumed_lrs[2] == pytest.approx(0.05, rel=1e-6)  # halfway down a 4-epoch cosine


def test_a_changed_batch_size_in_the_middle_of_an_epoch_is_refused_before_anything_changes(
    recipe, tmp_path, plugins, capsys
):
    out = tmp_path / "run"
    status, _, _ = run("run", recipe, "--out", out, "-p", "stop_two", capsys=capsys)
    assert status == 0
    before = snapshot(out)

    status, _, err = run("run", recipe, "--batch-size", 4, "--resume", "--out", out, capsys=capsys)

    assert status == 2
    line = one_error_line(err)
    assert "stopped after batch 2 of an epoch of 4 batches, and an epoch now has 8" in line
    assert "--batch-size 8 -> 4" in line
    assert snapshot(out) == before  # config.json included


def test_a_changed_batch_size_at_an_epoch_end_applies(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("run", recipe, "--out", out, capsys=capsys)[0] == 0
    status, stdout, _ = run(
        "run", recipe, "--epochs", 2, "--batch-size", 4, "--resume", "--out", out, capsys=capsys
    )
    assert status == 0 and "--batch-size 8 -> 4" in stdout


@pytest.mark.parametrize(
    ("option", "value", "flag"), [("--seed", 3, "--seed"), ("--split", 1, "--split")]
)
def test_options_a_resume_cannot_honour_are_refused_naming_them(
    recipe, tmp_path, capsys, option, value, flag
):
    out = tmp_path / "run"
    assert run("run", recipe, "--out", out, capsys=capsys)[0] == 0
    before = snapshot(out)
    status, _, err = run(
        "run", recipe, "--epochs", 2, option, value, "--resume", "--out", out, capsys=capsys
    )
    assert status == 2
    assert f"{flag} cannot change on a resume" in one_error_line(err)
    assert snapshot(out) == before


# --- 6. a torn last line in metrics.jsonl ----------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("run", recipe, "--epochs", 2, "--out", out, capsys=capsys)[0] == 0
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as file:
        file.write('{"epoch": 2, "train_lo')  # a kill or a full disk during the append

    records, skipped = read_jsonl(metrics)
    assert [record["epoch"] for record in records] == [0, 1]
    assert skipped == [f"{metrics}: line 3 is not a JSON record, cut off: skipped"]

    status, _, err = run("run", recipe, "--epochs", 3, "--resume", "--out", out, capsys=capsys)

    assert status == 0
    assert f"warning: {metrics}: line 3 is not a JSON record, cut off: skipped" in err
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


# --- 7. a full disk is one line that says so -------------------------------------------

FILL_DISK = """
def on_epoch_begin(learner):
    if learner.epoch == 1:  # fill the disk after the first epoch's checkpoint
        with open(learner.run_dir / "filler", "wb") as file:
            try:
                while True:
                    file.write(b"x" * 65536)
                    file.flush()
            except OSError:
                pass
"""


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_naming_the_file_and_the_last_good_checkpoint(
    recipe, small_disk, plugins, capsys
):
    (plugins / "fill_disk.py").write_text(FILL_DISK)
    out = small_disk / "run"

    status, _, err = run(
        "run", recipe, "--epochs", 3, "--out", out, "-p", "fill_disk", capsys=capsys
    )

    assert status == 2
    line = one_error_line(err)
    assert "no space left on the device" in line and "No space left on device" in line
    assert f"the last good checkpoint is {out / 'checkpoints' / 'last.pt'}" in line
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["learner"]["epoch"] == 1  # the first epoch's, whole
    assert not [path for path in (out / "checkpoints").iterdir() if path.suffix == ".tmp"]


def test_an_unwritable_out_is_one_line_and_status_2(recipe, tmp_path, capsys):
    if os.geteuid() == 0:
        parent = Path("/proc/self")  # even root cannot make a folder here
        out = parent / "run"
    else:
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o500)
        out = parent / "run"
    status, _, err = run("run", recipe, "--out", out, capsys=capsys)
    assert status == 2
    assert f"--out {out}" in one_error_line(err) or f"cannot write {out}" in err


# --- 8. exit-2 errors write nothing -----------------------------------------------------


def test_weights_that_do_not_fit_leave_the_run_folder_byte_identical(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("run", recipe, "--out", out, capsys=capsys)[0] == 0
    before = snapshot(out)

    status, _, err = run("run", recipe, "--width", 3, "--resume", "--out", out, capsys=capsys)

    assert status == 2
    line = one_error_line(err)
    assert "its weights do not fit this model (0.weight: 2x4 in the checkpoint, 3x4 here" in line
    assert "--width 2 -> 3" in line
    assert snapshot(out) == before


def test_a_failing_recipe_leaves_no_default_folder_behind(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "bad.py"
    recipe.write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            from trainloop import UsageError

            @dataclass
            class Config:
                steps: int = 0

            def build(cfg):
                raise UsageError("--steps 0: give 1 or more")
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    status, _, err = run("run", recipe, capsys=capsys)
    assert status == 2 and "--steps 0" in err
    assert not (tmp_path / "runs").exists()


# --- 4. where exactness cannot be promised, the resume says so --------------------------

OWN_SAMPLER = """
from dataclasses import dataclass
import functools, torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset
from trainloop import Learner

class CountingBatches(BatchSampler):
    '''A batch sampler with state of its own, which no checkpoint holds.'''

@dataclass
class Config:
    lr: float = 0.1

def build(cfg):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    batches = CountingBatches(SequentialSampler(data), batch_size=8, drop_last=False)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LogSoftmax(1))
    return Learner(model, DataLoader(data, batch_sampler=batches),
                   optimizer=functools.partial(torch.optim.SGD, lr=cfg.lr))
"""


def test_a_resume_says_in_one_line_when_the_data_may_not_replay_exactly(tmp_path, capsys):
    recipe = tmp_path / "own_sampler.py"
    recipe.write_text(OWN_SAMPLER)
    out = tmp_path / "run"
    assert run("run", recipe, "--out", out, capsys=capsys)[0] == 0
    status, _, err = run("run", recipe, "--epochs", 2, "--resume", "--out", out, capsys=capsys)
    assert status == 0
    assert (
        "trainloop: warning: resume may not be exact: the training DataLoader's batch sampler "
        "CountingBatches may keep state that no checkpoint holds" in err
    )
    status, _, err = run("run", recipe, "--epochs", 2, "--out", tmp_path / "fresh", capsys=capsys)
    assert "resume may not be exact" not in err  # only a resume warns


@pytest.mark.parametrize(
    ("recipe_name", "option", "said"),
    [
        ("mnist_mlp.py", "--sample-size", "--sample-size 0: use 1 or more"),
        ("single_node.py", "--steps-per-epoch", "--steps-per-epoch 0"),
    ],
)
def test_a_zero_size_is_one_line_and_leaves_no_folder(
    tmp_path, capsys, monkeypatch, recipe_name, option, said
):
    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / recipe_name
    status, _, err = run("run", recipe, option, 0, capsys=capsys)
    assert status == 2 and said in one_error_line(err)
    assert not (tmp_path / "runs").exists()
