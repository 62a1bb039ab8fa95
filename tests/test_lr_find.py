"""The learning-rate range test: the sweep, what it puts back, its picture, its command."""

from __future__ import annotations

import functools
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_data, write_tiny_recipe
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from trainloop import Learner, hookimpl
from trainloop.cli import main
from trainloop.lr_find import PLOT_SIZE, LRFindResult, lr_find, suggest
from trainloop.plugins.checkpoint import Checkpoint
from trainloop.plugins.grad_accumulation import GradAccumulation
from trainloop.plugins.metrics_jsonl import MetricsFile
from trainloop.plugins.precision import Precision, ScaledPrecision, check_precision
from trainloop.plugins.tensorboard import TensorBoardLogger
from trainloop.recipe import load_recipe
from trainloop.tasks.mnist.data import write_idx_files

ROOT = Path(__file__).resolve().parents[1]
SINGLE_NODE = ROOT / "recipes" / "single_node.py"
MNIST = ROOT / "recipes" / "mnist_mlp.py"
SUGGESTION_RED = (214, 39, 40)


def noisy_learner(plugins=(), **kwargs) -> Learner:
    """Dropout, BatchNorm, Adam and a shuffling DataLoader with its own generator: every
    kind of state a sweep can disturb."""
    torch.manual_seed(0)
    inputs = torch.randn(96, 4)
    target = (inputs.sum(dim=1) > 0).long()
    data = DataLoader(
        TensorDataset(inputs, target),
        batch_size=8,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 2),
        torch.nn.LogSoftmax(dim=1),
    )
    return Learner(
        model,
        data,
        make_data(seed=1),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        plugins=plugins,
        **kwargs,
    )


def precision_16_on_cpu() -> list:
    try:
        check_precision("16-mixed", "cpu")
    except Exception:
        return []
    # A scale that grows every step: a sweep that left it grown would change the fit.
    return [pytest.param(lambda: ScaledPrecision(growth_interval=1), id="16-mixed")]


PLUGINS = [
    pytest.param(lambda: None, id="plain"),
    pytest.param(lambda: Precision("bf16-mixed"), id="bf16-mixed"),
    pytest.param(lambda: GradAccumulation(2), id="accumulate-2"),
    *precision_16_on_cpu(),
]


def assert_same_training(a: Learner, b: Learner) -> None:
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    state_a, state_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for index, values in state_a["state"].items():
        for key, value in values.items():
            assert torch.equal(value, state_b["state"][index][key]), (index, key)
    assert a.history == b.history


# --- putting everything back --------------------------------------------------------------


@pytest.mark.parametrize("make_plugin", PLUGINS)
def test_a_fit_after_lr_find_is_the_fit_it_would_have_been(make_plugin):
    plugin = make_plugin()
    swept = noisy_learner([plugin] if plugin else [])
    result = lr_find(swept, steps=30)
    assert len(result.lrs) >= 10  # it trained, on this learner's steps
    swept.fit(2)

    plugin = make_plugin()
    plain = noisy_learner([plugin] if plugin else [])
    plain.fit(2)
    assert_same_training(swept, plain)


def test_everything_the_sweep_changed_is_put_back_right_away():
    learner = noisy_learner()
    learner.fit(1)  # a learner with optimizer state, history and counters
    learner.model.eval()
    weights = {name: value.clone() for name, value in learner.model.state_dict().items()}
    optimizer = learner.optimizer.state_dict()
    moments = {index: state["exp_avg"].clone() for index, state in optimizer["state"].items()}
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    generator = learner.train_data.generator.get_state()
    counters = (learner.epoch, learner.step, learner.iteration, list(learner.history))

    result = lr_find(learner, steps=20)

    assert result.lrs[0] == pytest.approx(1e-7) and len(result.lrs) > 5
    for name, value in learner.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert all(param.grad is None for param in learner.model.parameters())
    assert not learner.model.training  # as it was left
    after = learner.optimizer.state_dict()
    assert after["param_groups"] == optimizer["param_groups"]  # lr 1e-3 again
    for index, state in after["state"].items():
        assert torch.equal(state["exp_avg"], moments[index])
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert torch.equal(learner.train_data.generator.get_state(), generator)
    assert (learner.epoch, learner.step, learner.iteration, learner.history) == counters
    assert learner.valid_data is not None


@pytest.mark.skipif(not precision_16_on_cpu(), reason="no float16 training on this CPU")
def test_a_plugins_own_state_is_put_back_through_its_checkpoint_hooks():
    amp = ScaledPrecision(growth_interval=1)
    learner = noisy_learner([amp])
    learner.fit(1)
    amp.scaler.update(1.0)  # from 1 the sweep's steps would double it, up to where it overflows
    scaler = amp.scaler.state_dict()
    lr_find(learner, steps=20)
    assert amp.scaler.state_dict() == scaler


def test_the_restore_is_exact_even_when_the_sweep_fails():
    class Failing:
        def on_step_end(self, learner: Learner) -> None:
            if learner.step == 3:
                raise RuntimeError("boom")

    learner = noisy_learner()
    learner.add_plugin(Failing(), "failing")
    weights = [param.clone() for param in learner.model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        lr_find(learner, keep=["failing"])
    assert all(torch.equal(a, b) for a, b in zip(learner.model.parameters(), weights))
    assert learner.optimizer.state_dict()["state"] == {}
    assert learner.plugin_manager.has_plugin("failing")


# --- which plugins take part ----------------------------------------------------------


class EventLog:
    """Counts the events it sees; watches only, so the sweep sets it aside."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_fit_begin(self) -> None:
        self.events.append("on_fit_begin")

    def on_backward_end(self) -> None:
        self.events.append("on_backward_end")

    def on_epoch_end(self) -> None:
        self.events.append("on_epoch_end")


def hook_order(learner: Learner) -> dict[str, list[str]]:
    manager = learner.plugin_manager
    return {
        name: [impl.plugin_name for impl in getattr(manager.hook, name).get_hookimpls()]
        for name in manager.hook_names()
    }


def test_watching_and_writing_plugins_sit_out_the_sweep_and_come_back_in_their_order(tmp_path):
    log = EventLog()
    writers = [
        Checkpoint(tmp_path / "checkpoints"),
        MetricsFile(tmp_path / "metrics.jsonl"),
        TensorBoardLogger(tmp_path / "tensorboard"),
    ]
    learner = noisy_learner([*writers, log, Precision("bf16-mixed"), GradAccumulation(2)])
    before = hook_order(learner)

    result = lr_find(learner, steps=20)

    assert log.events == []
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no metrics line, no event file
    assert result.set_aside == ["Checkpoint", "MetricsFile", "TensorBoardLogger", "EventLog"]
    assert hook_order(learner) == before
    learner.fit(1)  # they work as before
    assert log.events[0] == "on_fit_begin" and "on_epoch_end" in log.events
    assert (tmp_path / "checkpoints" / "last.pt").exists()


def test_keep_lets_a_plugin_take_part_and_accumulation_takes_two_batches_a_step():
    log = EventLog()
    learner = noisy_learner([log, GradAccumulation(2)])
    result = lr_find(learner, steps=10, keep=["EventLog"])
    assert len(result.lrs) == 10 and result.stopped == "steps"
    assert log.events.count("on_backward_end") == 20  # 2 batches for each of the 10 lrs
    assert "EventLog" not in result.set_aside


def test_the_lr_grows_exponentially_and_other_groups_keep_their_ratio():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LogSoftmax(dim=1))
    optimizer = torch.optim.SGD(
        [{"params": model[0].weight, "lr": 0.1}, {"params": model[0].bias, "lr": 0.01}]
    )
    seen: list[list[float]] = []

    class Watch:
        @hookimpl(trylast=True)  # after the sweep has set this step's lr
        def on_step_begin(self, learner: Learner) -> None:
            seen.append([group["lr"] for group in learner.optimizer.param_groups])

    learner = Learner(model, make_data(), optimizer=optimizer, plugins=[Watch()])
    result = lr_find(learner, start_lr=1e-4, end_lr=1e-1, steps=4, keep=["Watch"])
    assert result.lrs == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    assert [first for first, _ in seen] == pytest.approx(result.lrs)
    assert [second for _, second in seen] == pytest.approx([lr / 10 for lr in result.lrs])
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.01]


# --- stopping and suggesting ----------------------------------------------------------


def test_a_diverging_loss_stops_the_sweep_and_an_immediate_one_has_no_suggestion():
    result = lr_find(noisy_learner(), start_lr=1e-4, end_lr=1e6, steps=100)
    assert result.stopped in ("diverged", "not finite")
    assert len(result.lrs) < 100 and result.lrs[-1] > 1
    assert result.suggestion is not None and result.suggestion < result.lrs[-1]

    early = lr_find(noisy_learner(), start_lr=1e5, end_lr=1e9, steps=100)
    assert early.stopped in ("diverged", "not finite") and len(early.lrs) < 10
    assert early.suggestion is None
    assert "diverged within the first" in early.problem


def test_the_suggestion_is_the_steepest_fall_before_the_lowest_loss():
    lrs = np.geomspace(1e-4, 1, 9).tolist()
    smoothed = [2.0, 2.0, 1.9, 1.5, 0.7, 0.5, 0.45, 0.6, 3.0]
    assert suggest(lrs, smoothed) == 3  # central differences: 1.9 -> 0.7 around step 3
    assert suggest(lrs, [1.0] * 9) is None  # flat
    assert suggest(lrs, [1.0, 2.0, 3.0, 4.0]) is None  # rising from the start
    assert suggest(lrs, smoothed, skip=6) is None  # too few points before the lowest


def test_bad_arguments_are_value_errors_naming_the_argument(learner):
    for kwargs, name in (
        ({"start_lr": 0}, "start_lr"),
        ({"end_lr": 1e-8}, "end_lr"),
        ({"steps": 1}, "steps"),
        ({"smooth": 1.0}, "smooth"),
        ({"diverge": 1.0}, "diverge"),
        ({"keep": ["no-such-plugin"]}, "keep"),
    ):
        with pytest.raises(ValueError, match=name):
            lr_find(learner, **kwargs)


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mnist")
    write_idx_files(folder / "MNIST" / "raw", n_train=2000, n_test=500, gz=False)
    return folder


def test_on_mnist_the_suggestion_trains_well_and_ten_times_it_does_not(mnist_dir):
    recipe = load_recipe(MNIST)

    def build(lr: float = 0.01) -> Learner:
        torch.manual_seed(0)
        return recipe.build(recipe.Config(data_dir=mnist_dir, download=False, lr=lr))

    result = lr_find(build())
    assert result.stopped == "diverged"
    assert 0.02 <= result.suggestion <= 0.2

    good = build(result.suggestion).fit(2)[-1]
    assert good["valid_accuracy"] > 0.9 and good["train_loss"] < 1.0
    too_high = build(10 * result.suggestion).fit(2)[-1]
    assert too_high["valid_accuracy"] < 0.5


# --- the picture and TensorBoard ------------------------------------------------------


def made_up_result(suggestion: float) -> LRFindResult:
    lrs = np.geomspace(1e-7, 10, 41).tolist()  # five points a decade
    losses = [2.3 - 1.5 / (1 + (1e-3 / lr) ** 2) for lr in lrs]
    index = int(np.argmin([abs(np.log10(lr / suggestion)) for lr in lrs]))
    return LRFindResult(lrs, losses, losses, lrs[index], index, "steps", 1e-7, 10.0, 41)


def red_columns(path: Path) -> float:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    height = pixels.shape[0]
    band = pixels[height // 4 : 3 * height // 4]  # inside the plot, below the legend
    rows, columns = np.nonzero(np.all(band == SUGGESTION_RED, axis=-1))
    assert len(columns) > 20, "the suggestion is not marked"
    return float(np.median(columns))


def test_the_png_has_its_size_and_marks_the_suggestion_on_a_log_scale(tmp_path):
    positions = []
    for exponent in (-5, -3, -1):
        path = made_up_result(10.0**exponent).plot(tmp_path / f"{exponent}.png")
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == PLOT_SIZE
        positions.append(red_columns(path))
    first, second = positions[1] - positions[0], positions[2] - positions[1]
    assert first > 50 and abs(first - second) <= 2  # two decades apart, equally far


def test_tensorboard_gets_the_curve_and_the_picture(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainloop.lr_find import write_files

    result = lr_find(noisy_learner(), steps=20)
    written = write_files(result, tmp_path, about={"recipe": "noisy"})
    assert [path.name for path in written[:2]] == ["lr_find.png", "lr_find.json"]
    assert written[2].name.startswith("events.out.tfevents.")
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    losses = events.Scalars("lr_find/loss")
    assert [event.step for event in losses] == list(range(len(result.lrs)))
    assert [event.value for event in losses] == pytest.approx(result.losses, rel=1e-6)
    assert [event.value for event in events.Scalars("lr_find/lr")] == pytest.approx(result.lrs)
    assert len(events.Scalars("lr_find/smoothed_loss")) == len(result.lrs)
    assert events.Tags()["images"] == ["lr_find/plot"]
    document = json.loads((tmp_path / "lr_find.json").read_text())
    assert document["recipe"] == "noisy" and document["suggestion"] == result.suggestion
    assert document["lrs"] == result.lrs


# --- the command ----------------------------------------------------------------------


def run(*args, capsys) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_the_command_prints_the_suggestion_and_the_files_and_writes_nothing_else(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    status, out, err = run("lr-find", SINGLE_NODE, capsys=capsys)
    assert status == 0, err
    lines = out.splitlines()
    folder = Path(lines[0].removeprefix("lr-find folder: "))
    assert folder.parent == Path("runs/single_node/lr-find")
    suggested = float(re.match(r"suggested lr: (\S+) \(steepest descent", lines[1])[1])
    assert [Path(line).parent for line in lines[2:]] == [folder] * 3
    # The recipe's DescentPath (error_surface.png), checkpoints, metrics.jsonl, model.pt
    # and the TensorBoard logger were set aside: only the sweep's files are there.
    names = sorted(path.name for path in folder.iterdir() if path.name != ".trainloop.lock")
    assert len(names) == 3 and names[0].startswith("events.out.tfevents.")
    assert names[1:] == ["lr_find.json", "lr_find.png"]
    document = json.loads((folder / "lr_find.json").read_text())
    assert document["suggestion"] == pytest.approx(suggested, rel=1e-2)
    assert document["command"][:2] == ["trainloop", "lr-find"]
    assert "DescentPath" in document["set_aside"]


def test_the_command_runs_under_bf16_mixed_and_accumulation(mnist_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    status, printed, err = run(
        "lr-find", MNIST, "--data-dir", mnist_dir, "--no-download", "--precision", "bf16-mixed",
        "--accumulate", "2", "--steps", "60", "--out", out, capsys=capsys,
    )  # fmt: skip
    assert status == 0, err
    document = json.loads((out / "lr_find.json").read_text())
    assert document["options"]["precision"] == "bf16-mixed"
    assert document["options"]["accumulate"] == 2
    assert 0.01 <= document["suggestion"] <= 0.3
    assert f"suggested lr: {document['suggestion']:.3g}" in printed


def test_the_docs_picture_is_what_the_pages_command_draws_today(mnist_dir, tmp_path, capsys):
    # docs/lr-find.md runs this command on the same training images (its MNIST
    # look-alike differs only in its test images, which the sweep does not use).
    out = tmp_path / "runs" / "lr-find-mnist"
    status, _, err = run(
        "lr-find", MNIST, "--data-dir", mnist_dir, "--no-download", "--out", out, capsys=capsys
    )
    assert status == 0, err
    committed = ROOT / "docs" / "lr-find-mnist.png"
    if os.environ.get("TRAINLOOP_UPDATE_FIGURES") == "1":
        committed.write_bytes((out / "lr_find.png").read_bytes())
    drawn = np.asarray(Image.open(out / "lr_find.png").convert("RGB"), float)
    shown = np.asarray(Image.open(committed).convert("RGB"), float)
    assert drawn.shape == shown.shape
    difference = np.abs(drawn - shown)
    assert difference.mean() < 4 and (difference.max(axis=2) > 40).mean() < 0.05
    assert "](lr-find-mnist.png)" in (ROOT / "docs" / "lr-find.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--start-lr", "1", "--end-lr", "1"], "--end-lr 1.0: give a learning rate above"),
        (["--start-lr", "0"], "--start-lr 0.0: give a positive learning rate"),
        (["--steps", "1"], "--steps 1: give at least 2 steps"),
        (["--start-lr", "1e4", "--end-lr", "1e8"], "diverged within the first"),
        (["--overwrite"], "--overwrite: trainloop lr-find sweeps"),
        (["--steps", "many"], "argument --steps: invalid int value"),
        (["--epochs", "3"], "--epochs: the sweep's length is --steps"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_left_behind(
    args, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    recipe = write_tiny_recipe(tmp_path)
    status, _, err = run("lr-find", recipe, *args, capsys=capsys)
    assert status == 2
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "runs").exists()


def test_config_replays_a_runs_options_into_the_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = write_tiny_recipe(tmp_path)
    status, _, err = run(
        "run", recipe, "--lr", "0.5", "--accumulate", "2", "--out", "trained", capsys=capsys
    )
    assert status == 0, err
    status, _, err = run(
        "lr-find", recipe, "--config", "trained/config.json", "--steps", "10", "--out", "swept",
        capsys=capsys,
    )  # fmt: skip
    assert status == 0, err
    document = json.loads((tmp_path / "swept" / "lr_find.json").read_text())
    assert document["config"]["lr"] == 0.5 and document["options"]["accumulate"] == 2
    assert len(document["lrs"]) == 10


def test_a_folder_that_holds_files_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = write_tiny_recipe(tmp_path)
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.json").write_text("{}")
    status, _, err = run("lr-find", recipe, "--out", used, capsys=capsys)
    assert status == 2 and "already holds files (config.json)" in err
    assert sorted(path.name for path in used.iterdir()) == ["config.json"]


def test_help_lists_the_sweep_options_and_the_plugins_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["lr-find", str(SINGLE_NODE), "--help"])
    out = capsys.readouterr().out
    for option in ("--start-lr", "--end-lr", "--steps", "--out", "--precision", "--accumulate"):
        assert option in out


# --- several processes ----------------------------------------------------------------

DDP_SCRIPT = """
import functools, gc, sys, torch, torch.distributed as dist
from trainloop import Learner, hookimpl
from trainloop.lr_find import lr_find
from trainloop.plugins.distributed import Distributed

dist.init_process_group("gloo")  # joined here, so a fit does not leave the group

def build():
    torch.manual_seed(0)
    inputs = torch.randn(64, 4)
    target = (inputs.sum(1) > 0).long()
    data = [(inputs[i:i + 8], target[i:i + 8]) for i in range(0, 64, 8)]
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1),
                                torch.nn.Linear(8, 2), torch.nn.LogSoftmax(1))
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    strategy = Distributed(device="cpu", strategy=sys.argv[1])
    return Learner(model, data, optimizer=optimizer, plugins=[strategy])

swept = build()
result = lr_find(swept, steps=40)
swept.fit(2)
plain = build()
plain.fit(2)
same = all(torch.equal(a, b) for a, b in zip(swept.model.parameters(), plain.model.parameters()))
with open(f"rank{dist.get_rank()}.txt", "w") as report:
    report.write(f"{len(result.lrs)} steps, suggestion {result.suggestion:.4g}, same fit {same}")
# The DDP and FSDP wrappers go before the group, not in the interpreter's shutdown, where
# gloo can abort a process that did everything right (docs/cluster.md).
del swept, plain
gc.collect()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_under_ddp_and_fsdp_every_process_stops_at_the_same_step_and_restores_exactly(
    strategy, tmp_path
):
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), strategy],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    files = [tmp_path / f"rank{rank}.txt" for rank in (0, 1)]
    reports = [file.read_text() if file.exists() else f"{file.name} missing" for file in files]
    assert reports[0] == reports[1], f"{reports}\n{output}"  # the same steps, the same lr
    assert reports[0].endswith("same fit True"), f"{reports}\n{output}"
