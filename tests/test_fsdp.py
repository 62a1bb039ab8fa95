"""--strategy fsdp: FSDP2 on two gloo processes, sharded checkpoints, an exact resume after a kill."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainloop import Learner, UsageError, sharded
from trainloop.cli import main
from trainloop.context import RunContext
from trainloop.data.tensors import TensorBatches
from trainloop.plugins import precision
from trainloop.plugins.checkpoint import Checkpoint
from trainloop.plugins.distributed import (
    AUTO_WRAP,
    Distributed,
    check_wrap,
    even_valid_data,
    parse_wrap,
    shard_units,
)
from trainloop.plugins.weight_averaging import WeightAveraging
from trainloop.recipe import load_recipe
from trainloop.tasks.mnist.data import write_idx_files

ROOT = Path(__file__).resolve().parents[1]
MNIST_RECIPE = ROOT / "recipes" / "mnist_mlp.py"
TEST_IMAGES = 151
STEPS = 8  # 400 images, 2 processes, batches of 50: 4 per process and epoch, 2 epochs

# Rank 0 says which training batch it has finished; the killed run also dawdles a little
# after each, so that the kill lands before the run ends.
BEACON = """
import os, time

class Beacon:
    def on_batch_end(self, learner):
        if learner.training and learner.context.is_main_process:
            print(f"beacon step {learner.step + 1}", flush=True)
            time.sleep(float(os.environ.get("BEACON_SLEEP", "0")))

beacon = Beacon()
"""


def torchrun(out: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "trainloop", "run", str(MNIST_RECIPE), "--data-dir", str(data_dir),
        "--no-download", "--sample-size", "400", "--batch-size", "50", "--epochs", "2",
        "--progress", "plain", "--out", str(out), *extra,
    ]  # fmt: skip


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # so that a kill reaches torchrun and its workers at once
    )  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 150) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def kill_at_step(process: subprocess.Popen, step: int, timeout: float = 150) -> None:
    """SIGKILL the run's workers (both at once) and torchrun once rank 0 has finished ``step``."""
    try:
        for line in process.stdout:
            if line.strip() == f"beacon step {step}":
                break
        else:
            raise AssertionError(f"the run ended before step {step}: {process.stderr.read()}")
        # torchrun starts its workers in sessions of their own: kill them by their pids
        found = subprocess.run(
            ["pgrep", "-P", str(process.pid)], capture_output=True, text=True, check=False
        )
        for pid in found.stdout.split():
            os.kill(int(pid), signal.SIGKILL)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A DDP run, an FSDP run, and an FSDP run killed mid-epoch, side by side."""
    root = tmp_path_factory.mktemp("fsdp")
    data_dir = root / "data"
    write_idx_files(data_dir / "MNIST" / "raw", n_train=400, n_test=TEST_IMAGES, gz=False)
    (root / "fsdp_beacon.py").write_text(BEACON)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    fsdp = ("--strategy", "fsdp", "--checkpoint-every", "3")
    paths = {name: root / name for name in ("ddp", "fsdp", "killed")}
    paths["data"] = data_dir
    ddp_run = start(torchrun(paths["ddp"], data_dir), env)
    fsdp_run = start(torchrun(paths["fsdp"], data_dir, *fsdp), env)
    killed_run = start(
        torchrun(paths["killed"], data_dir, *fsdp, "-p", "fsdp_beacon:beacon"),
        {**env, "BEACON_SLEEP": "1"},
    )
    # Checkpoints at steps 3, 4 (the epoch's end), 6, 8: killed after step 7, the run
    # goes on from step 6, in the middle of the second epoch.
    kill_at_step(killed_run, 7)
    checkpoints = paths["killed"] / "checkpoints"
    shutil.copy(checkpoints / "last.pt", checkpoints / "mid.pt")  # kept for a test below
    resumed = start(
        torchrun(paths["killed"], data_dir, *fsdp, "-p", "fsdp_beacon:beacon", "--resume"), env
    )
    said = {}
    for name, process in (("ddp", ddp_run), ("fsdp", fsdp_run), ("resumed", resumed)):
        said[name], err = finish(process)
        assert process.returncode == 0, f"{name}: {err[-3000:]}"
    paths["resume_output"] = root / "resume_output.txt"
    paths["resume_output"].write_text(said["resumed"])
    return paths


def last_metrics(run: Path) -> dict[str, float]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]


def full_checkpoint(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The model and optimizer state of ``run``'s sharded last.pt, read into a plain model in
    this one process: DCP reshards two processes' shards on load."""
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    model = load_recipe(MNIST_RECIPE).Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sharded.load(run / "checkpoints" / checkpoint["shards"], model, optimizer)
    return model.state_dict(), optimizer.state_dict()


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fsdp_trains_the_mnist_recipe_to_the_accuracy_of_ddp(runs):
    fsdp, ddp = last_metrics(runs["fsdp"]), last_metrics(runs["ddp"])
    assert fsdp["epoch"] == ddp["epoch"] == 1
    # The same averaged gradients, computed by a reduce-scatter instead of an all-reduce:
    # a different order of float additions may round differently (on two processes they
    # agree to the bit), so allow one test image of accuracy and 1e-4 of the loss.
    assert fsdp["valid_accuracy"] == pytest.approx(ddp["valid_accuracy"], abs=1.01 / TEST_IMAGES)
    assert fsdp["valid_loss"] == pytest.approx(ddp["valid_loss"], rel=1e-4)
    assert fsdp["train_loss"] == pytest.approx(ddp["train_loss"], rel=1e-4)
    # each test image counted once: the accuracy is a whole number of images
    assert fsdp["valid_accuracy"] * TEST_IMAGES == pytest.approx(
        round(fsdp["valid_accuracy"] * TEST_IMAGES)
    )


def test_model_pt_of_an_fsdp_run_is_an_ordinary_state_dict_of_the_plain_model(runs):
    saved = torch.load(runs["fsdp"] / "model.pt", weights_only=True)
    model = load_recipe(MNIST_RECIPE).Net()
    model.load_state_dict(saved["model"])  # strict: every key, every shape
    assert all(type(value) is torch.Tensor for value in saved["model"].values())
    ddp = torch.load(runs["ddp"] / "model.pt", weights_only=True)["model"]
    for name, value in saved["model"].items():
        assert torch.allclose(value, ddp[name], atol=1e-5), name


def test_each_process_writes_its_shard_and_last_pt_names_the_folder(runs):
    checkpoints = runs["fsdp"] / "checkpoints"
    last = torch.load(checkpoints / "last.pt", weights_only=True)
    assert last["model"] is None and last["world_size"] == 2
    assert last["learner"]["step"] == STEPS
    folder = checkpoints / last["shards"]
    assert sorted(path.name for path in folder.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    # only the folders that a checkpoint file names are kept
    named = {torch.load(path, weights_only=True)["shards"] for path in checkpoints.glob("*.pt")}
    assert {f"shards/{path.name}" for path in (checkpoints / "shards").iterdir()} == named


def test_an_fsdp_run_killed_mid_epoch_resumes_to_the_weights_of_the_unbroken_run(runs):
    said = runs["resume_output"].read_text()
    assert "epoch 2 after its batch 2, 6 steps done" in said  # from the step-6 checkpoint
    killed_model, killed_optimizer = full_checkpoint(runs["killed"])
    model, optimizer = full_checkpoint(runs["fsdp"])
    assert_equal_states(killed_model, model)
    assert_equal_states(
        {index: state["momentum_buffer"] for index, state in killed_optimizer["state"].items()},
        {index: state["momentum_buffer"] for index, state in optimizer["state"].items()},
    )
    resumed_model = torch.load(runs["killed"] / "model.pt", weights_only=True)["model"]
    assert_equal_states(
        resumed_model, torch.load(runs["fsdp"] / "model.pt", weights_only=True)["model"]
    )
    # Not train_loss: the checkpoint keeps rank 0's losses of the epoch's first batches
    # only, as under DDP, so the resumed epoch's mean differs a little.
    keys = ("epoch", "valid_loss", "valid_accuracy")
    resumed, unbroken = last_metrics(runs["killed"]), last_metrics(runs["fsdp"])
    assert [resumed[key] for key in keys] == [unbroken[key] for key in keys]


def test_a_sharded_checkpoint_resumes_in_one_process_at_an_epoch_end(runs, tmp_path, capsys):
    status = main(
        [
            "run",
            str(MNIST_RECIPE),
            "--data-dir",
            str(runs["data"]),
            "--no-download",
            "--sample-size",
            "400",
            "--batch-size",
            "50",
            "--epochs",
            "3",
            "--progress",
            "plain",
            "--out",
            str(tmp_path / "one"),
            "--resume",
            str(runs["fsdp"] / "checkpoints" / "last.pt"),
        ]  # fmt: skip
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "resume: 2 process(es) wrote the checkpoint, 1 go on" in out
    assert "resumed from" in out and "epoch 3 from its start, 8 steps done" in out
    assert [
        record["epoch"]
        for record in map(json.loads, (tmp_path / "one" / "metrics.jsonl").read_text().splitlines())
    ] == [2]


def test_a_sharded_checkpoint_from_mid_epoch_under_another_world_size_is_one_line(
    runs, tmp_path, capsys
):
    mid = runs["killed"] / "checkpoints" / "mid.pt"  # the killed run's last.pt: step 6
    assert torch.load(mid, weights_only=True)["learner"]["iteration"] == 2
    status = main(
        [
            "run",
            str(MNIST_RECIPE),
            "--data-dir",
            str(runs["data"]),
            "--no-download",
            "--sample-size",
            "400",
            "--batch-size",
            "50",
            "--epochs",
            "3",
            "--out",
            str(tmp_path / "one"),
            "--resume",
            str(mid),
        ]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(
        f"trainloop: error: --resume {mid}: it was written by 2 process(es) in the middle of "
        "an epoch, and this run has 1;"
    )
    assert err.count("\n") == 1
    assert not (tmp_path / "one").exists()  # refused before anything was written


def test_fsdp_without_torchrun_is_one_line_and_exit_status_2(capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    status = main(["run", str(ROOT / "recipes" / "single_node.py"), "--strategy", "fsdp"])
    assert status == 2
    assert capsys.readouterr().err == (
        "trainloop: error: --strategy fsdp shards the model between processes: start the run "
        "under torchrun, or add --nproc-per-node N\n"
    )


# --- the wrapping policy -----------------------------------------------------------------


def test_auto_shards_transformer_layers_whole_and_the_other_layers_one_by_one():
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 8), layer, torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    units = shard_units(model, AUTO_WRAP)
    assert units == [model[0], layer, model[3]]  # not the layer's own Linear modules
    assert shard_units(model, parse_wrap("Linear")) == [
        layer.self_attn.out_proj,  # a Linear subclass
        layer.linear1,
        layer.linear2,
        model[3],
    ]
    assert parse_wrap("none") == () and parse_wrap("auto") == AUTO_WRAP


def test_a_wrap_type_the_model_does_not_have_is_one_line_naming_its_types():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with pytest.raises(UsageError) as raised:
        check_wrap(model, parse_wrap("Linear,Block"))
    assert str(raised.value) == (
        "--fsdp-wrap Block: no submodule of Sequential is of that type; give some of Linear, "
        "ReLU, Sequential (or auto, or none)"
    )


def test_sharded_helpers_on_a_plain_model_are_the_ordinary_state_dict_calls():
    model = torch.nn.Linear(3, 2)
    assert not sharded.is_sharded(model)
    state = sharded.full_state_dict(model)
    assert all(value.device.type == "cpu" for value in state.values())
    assert state["weight"] is not model.weight  # a copy
    other = torch.nn.Linear(3, 2)
    sharded.load_full_state_dict(other, state)
    assert torch.equal(other.weight, model.weight)
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)(other.parameters())
    sharded.load_full_optimizer_state_dict(other, optimizer, optimizer.state_dict())


def test_fsdp_validates_the_even_shares_or_else_the_whole_set_on_every_process():
    even = TensorBatches(torch.arange(150), batch_size=25)  # 75 each: 3 batches each
    shares = [even_valid_data(even, rank, 2) for rank in (0, 1)]
    assert [len(share) for share in shares] == [3, 3] and shares[0] is not even
    uneven = TensorBatches(torch.arange(151), batch_size=25)  # 75 and 76: 3 and 4 batches
    assert all(even_valid_data(uneven, rank, 2) is uneven for rank in (0, 1))


# --- one process group of one, in this process ------------------------------------------


def small_learner(*plugins) -> Learner:
    torch.manual_seed(0)
    inputs = torch.randn(48, 4)
    target = (inputs.sum(dim=1) > 0).long()
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2), torch.nn.LogSoftmax(dim=1)
    )
    return Learner(
        model,
        TensorBatches(inputs, target, batch_size=8, shuffle=True),
        TensorBatches(inputs[:20], target[:20], batch_size=8),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        plugins=plugins,
    )


def test_precision_bf16_mixed_reaches_fsdp_through_the_run_context(process_group_of_one):
    context = RunContext()
    precision.configure_context(context=context, options=argparse.Namespace(precision="bf16-mixed"))
    assert context.mixed_precision_dtype is torch.bfloat16
    learner = small_learner(Distributed(device="cpu", strategy="fsdp"))
    learner.context.mixed_precision_dtype = context.mixed_precision_dtype
    seen = []
    learner.model[0].register_forward_hook(
        lambda module, args, output: seen.append((module.weight.dtype, args[0].dtype))
    )
    history = learner.fit(2)
    assert sharded.is_sharded(learner.model) and learner.module is learner.model
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}  # gathered and computed in bf16
    assert learner.model[0].weight.dtype == torch.float32  # the sharded master weights
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_an_fsdp_run_resumed_from_asynchronous_checkpoints_ends_as_the_unbroken_one(
    process_group_of_one, tmp_path
):
    def fsdp() -> Distributed:
        return Distributed(device="cpu", strategy="fsdp")

    unbroken = small_learner(fsdp(), Checkpoint(tmp_path / "unbroken"))
    unbroken.fit(3)
    part = small_learner(fsdp(), Checkpoint(tmp_path / "part", every=4, asynchronous=True))
    part.fit(2)  # 6 batches an epoch: checkpoints after steps 4 and 8 and at 6 and 12
    last = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert last["learner"]["step"] == 12 and sharded.is_complete(tmp_path / "part" / last["shards"])
    named = {
        torch.load(path, weights_only=True)["shards"] for path in (tmp_path / "part").glob("*.pt")
    }
    assert {f"shards/{path.name}" for path in (tmp_path / "part" / "shards").iterdir()} == named
    resumed = small_learner(
        fsdp(), Checkpoint(tmp_path / "resumed", resume=tmp_path / "part" / "last.pt")
    )
    resumed.fit(3)
    assert_equal_states(
        sharded.full_state_dict(resumed.model), sharded.full_state_dict(unbroken.model)
    )


def test_an_ordinary_checkpoint_resumes_under_fsdp(process_group_of_one, tmp_path):
    def ddp() -> Distributed:
        return Distributed(device="cpu")

    unbroken = small_learner(ddp(), Checkpoint(tmp_path / "unbroken"))
    unbroken.fit(3)
    small_learner(ddp(), Checkpoint(tmp_path / "ddp")).fit(1)  # the ordinary format
    assert torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["version"] == 1
    resumed = small_learner(
        Distributed(device="cpu", strategy="fsdp"),
        Checkpoint(tmp_path / "resumed", resume=tmp_path / "ddp" / "last.pt"),
    )
    resumed.fit(3)  # each process takes its shard of the whole weights and momentum
    assert sharded.is_sharded(resumed.model)
    expected = unbroken.model.state_dict()
    for name, value in sharded.full_state_dict(resumed.model).items():
        assert torch.allclose(value, expected[name], atol=1e-6), name


def test_weight_averaging_of_a_sharded_model_is_one_line(process_group_of_one):
    learner = small_learner(Distributed(device="cpu", strategy="fsdp"), WeightAveraging(ema=0.9))
    with pytest.raises(UsageError) as raised:
        learner.fit(1)
    assert str(raised.value) == (
        "--ema: weight averaging needs the whole model in every process; it does not work "
        "with a sharded one (--strategy fsdp): use --strategy ddp"
    )
