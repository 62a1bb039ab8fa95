"""The distributed plugin: splitting data, the torchrun hand-off, a 2-process gloo run."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_cli
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from trainloop import Learner, PluginManager, RunConfig, UsageError
from trainloop.cli import main
from trainloop.data.tensors import TensorBatches
from trainloop.plugins import distributed
from trainloop.plugins.checkpoint import Checkpoint
from trainloop.plugins.device import Compile, CompiledModule
from trainloop.plugins.distributed import (
    Distributed,
    ShardedTensorBatches,
    shard_train_data,
    shard_valid_data,
    torchrun_command,
)
from trainloop.recipe import load_recipe
from trainloop.tasks.mnist.data import load_mnist, write_idx_files

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MNIST_RECIPE = ROOT / "recipes" / "mnist_mlp.py"
WEIGHTS_DIR_VARIABLE = "TRAINLOOP_TEST_WEIGHTS_DIR"


class SaveWeightsPerRank:
    """Loaded into each torchrun process with ``-p test_distributed:save_weights``."""

    def on_fit_end(self, learner):
        folder = Path(os.environ[WEIGHTS_DIR_VARIABLE])
        torch.save(learner.model.state_dict(), folder / f"rank{os.environ['RANK']}.pt")


save_weights = SaveWeightsPerRank()


# --- splitting the data ----------------------------------------------------------------


def rows(batches) -> list[int]:
    return [int(value) for batch in batches for value in batch[0].flatten()]


@pytest.mark.parametrize(("samples", "repeated"), [(10, 0), (9, 1)])
def test_each_process_gets_its_own_training_samples_and_as_many_batches(samples, repeated):
    data = TensorBatches(torch.arange(samples), torch.zeros(samples), batch_size=3, shuffle=True)
    shards = [ShardedTensorBatches(data, rank, 2, seed=0) for rank in (0, 1)]
    seen = [rows(shard) for shard in shards]
    assert len(shards[0]) == len(shards[1]) == len(list(shards[1])) == 2
    assert [len(share) for share in seen] == [5, 5]
    assert set(seen[0]) | set(seen[1]) == set(range(samples))
    assert len(set(seen[0]) & set(seen[1])) == repeated  # padding, as DistributedSampler pads


def test_the_training_order_is_new_each_epoch_and_the_same_on_every_process():
    data = TensorBatches(torch.arange(100), batch_size=10, shuffle=True)
    first, second = (ShardedTensorBatches(data, rank, 2, seed=3) for rank in (0, 1))
    epoch0 = rows(first)
    assert rows(first) == epoch0  # the order comes from seed + epoch, not the global RNG
    first.set_epoch(1)
    second.set_epoch(1)
    assert rows(first) != epoch0
    assert set(rows(first)) | set(rows(second)) == set(range(100))
    assert not set(rows(first)) & set(rows(second))


def test_a_training_dataloader_is_rebuilt_with_a_distributed_sampler_and_its_settings():
    def collate(samples):
        return torch.stack([sample[0] for sample in samples])

    dataset = TensorDataset(torch.arange(20.0))
    loader = DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True, collate_fn=collate)
    shard = shard_train_data(loader, rank=1, world_size=2, seed=5)
    assert isinstance(shard.sampler, DistributedSampler)
    assert shard.sampler.shuffle and shard.sampler.rank == 1 and shard.sampler.seed == 5
    assert (shard.batch_size, shard.drop_last, shard.collate_fn) == (4, True, collate)
    assert len(shard) == 2  # 10 samples, batches of 4, the last dropped


def test_a_list_of_batches_is_dealt_out_and_padded_to_equal_length():
    batches = [(torch.tensor([index]),) for index in range(5)]
    shares = [shard_train_data(batches, rank, 2) for rank in (0, 1)]
    assert [rows(share) for share in shares] == [[0, 2, 4], [1, 3, 0]]


def test_training_data_that_cannot_be_split_is_a_usage_error():
    with pytest.raises(UsageError, match="cannot split train_data of type generator"):
        shard_train_data((batch for batch in [1, 2]), 0, 2)


@pytest.mark.parametrize("kind", ["tensor_batches", "dataloader", "list"])
def test_validation_data_is_split_without_padding_so_each_sample_counts_once(kind):
    values = torch.arange(11)
    if kind == "tensor_batches":
        data = TensorBatches(values, batch_size=4)
    elif kind == "dataloader":
        data = DataLoader(TensorDataset(values), batch_size=4)
    else:
        data = [(values[start : start + 2],) for start in range(0, 11, 2)]
    shares = [rows(shard_valid_data(data, rank, 2)) for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(11))
    assert shares[0] and shares[1]


def test_validation_data_smaller_than_the_number_of_processes_is_kept_whole():
    data = [(torch.arange(3),)]
    assert shard_valid_data(data, 1, 2) is data


# --- the --nproc-per-node shortcut -----------------------------------------------------


def test_the_shortcut_reruns_the_command_under_torchrun_without_itself():
    argv = ["run", "r.py", "--nproc-per-node", "2", "--out", "here", "--nproc-per-node=2"]
    assert torchrun_command(argv, 2) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "trainloop",
        "run",
        "r.py",
        "--out",
        "here",
    ]


def test_a_number_of_processes_below_one_is_one_line_and_exit_status_2(capsys):
    status = main(["run", str(ROOT / "recipes" / "single_node.py"), "--nproc-per-node", "0"])
    err = capsys.readouterr().err
    assert status == 2
    assert err == "trainloop: error: --nproc-per-node 0: give a number of processes, at least 1\n"


def test_outside_torchrun_the_plugin_registers_nothing(monkeypatch):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    options = argparse.Namespace(
        nproc_per_node=None, device="auto", dist_backend="auto", seed=0, strategy="ddp"
    )
    config = RunConfig(options, Path("unused"), Path("r.py"), None, PluginManager())
    distributed.configure_context(context=config.context, options=options)
    distributed.configure(config=config)
    assert list(config.plugin_manager.list_name_plugin()) == []
    assert config.is_main_process
    assert distributed.make_run_dir(recipe_path=Path("r.py"), context=config.context) is None


# --- two processes, gloo ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mnist")
    write_idx_files(folder / "MNIST" / "raw", n_train=400, n_test=151, gz=False)
    return folder


def full_set_metrics(weights_path: Path, data_dir: Path) -> dict[str, float]:
    recipe = load_recipe(MNIST_RECIPE)
    model = recipe.Net()
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    _, _, test_x, test_y = load_mnist(data_dir, download=False)
    with torch.no_grad():
        pred = model(test_x)
    return {
        "valid_loss": F.nll_loss(pred, test_y).item(),
        "valid_accuracy": recipe.accuracy(pred, test_y).item(),
    }


def test_two_gloo_processes_train_one_model_and_report_full_validation_metrics(tmp_path, mnist_dir):
    # trainloop run ... --nproc-per-node 2 hands the command line to torchrun, which
    # starts two processes of `python -m trainloop run ...`: both launch paths at once.
    weights = tmp_path / "weights"
    weights.mkdir()
    done = run_cli(
        "run",
        str(MNIST_RECIPE),
        "--data-dir",
        str(mnist_dir),
        "--no-download",
        "--sample-size",
        "400",
        "--batch-size",
        "50",
        "--epochs",
        "2",
        "--progress",
        "plain",
        "--nproc-per-node",
        "2",
        "-p",
        "test_distributed:save_weights",
        cwd=tmp_path,
        env={
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            WEIGHTS_DIR_VARIABLE: str(weights),
            "OMP_NUM_THREADS": "1",
        },
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 2 processes: python -m torch.distributed.run" in done.stdout

    rank0 = torch.load(weights / "rank0.pt", weights_only=True)
    rank1 = torch.load(weights / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)

    run_dirs = list((tmp_path / "runs" / "mnist_mlp").iterdir())
    assert len(run_dirs) == 1  # rank 0 chose it, rank 1 was told
    config = json.loads((run_dirs[0] / "config.json").read_text())
    assert config["options"]["nproc_per_node"] is None  # the processes did not launch again

    logged = [json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    last = logged[-1]
    expected = full_set_metrics(weights / "rank0.pt", mnist_dir)
    assert last["valid_loss"] == pytest.approx(expected["valid_loss"], rel=1e-5)
    assert last["valid_accuracy"] == pytest.approx(expected["valid_accuracy"], abs=1e-6)
    assert last["valid_accuracy"] * 151 == pytest.approx(round(last["valid_accuracy"] * 151))

    assert [line["epoch"] for line in logged] == [0, 1]  # written by rank 0 only


# --- one process group of one, in this process: the plugin's steps and resume ----------


def shuffled_learner(*plugins) -> Learner:
    torch.manual_seed(0)
    inputs = torch.randn(48, 4)
    target = (inputs.sum(dim=1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LogSoftmax(dim=1))
    return Learner(
        model,
        TensorBatches(inputs, target, batch_size=8, shuffle=True),
        TensorBatches(inputs[:20], target[:20], batch_size=8),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        plugins=plugins,
    )


def test_training_goes_through_ddp_while_learner_model_stays_the_plain_module(
    process_group_of_one,
):
    seen = []

    class Looks:
        def on_batch_begin(self, learner):
            seen.append((learner.training, type(learner.train_data).__name__))

    plugin = Distributed(device="cpu")
    learner = shuffled_learner(plugin, Looks())
    model, train_data = learner.model, learner.train_data
    learner.fit(1)
    assert learner.model is model and learner.train_data is train_data  # given back
    assert {name for training, name in seen if training} == {"ShardedTensorBatches"}
    assert isinstance(learner.module, distributed.TrainingDDP) and learner.module.module is model
    assert dist.is_initialized()  # the plugin leaves a group it did not start


def test_a_learner_that_joined_the_group_itself_fits_again_and_predicts(torchrun_of_one):
    # From Python, the plugin joins the group when it wraps the model; the group stays
    # until the process ends, for the wrapped model's next fit, validate or predict.
    learner = shuffled_learner(Distributed(device="cpu"))
    learner.fit(1)
    assert dist.is_initialized()
    weights = [parameter.detach().clone() for parameter in learner.model.parameters()]
    learner.fit(1)
    assert not all(map(torch.equal, weights, learner.model.parameters()))  # it trained
    assert "valid_loss" in learner.validate()


def test_a_run_resumed_under_ddp_ends_with_the_weights_of_an_unbroken_run(
    process_group_of_one, tmp_path
):
    unbroken = shuffled_learner(Distributed(device="cpu"), Checkpoint(tmp_path / "unbroken"))
    unbroken.fit(3)
    first_part = shuffled_learner(Distributed(device="cpu"), Checkpoint(tmp_path / "part"))
    first_part.fit(1)
    torch.manual_seed(1234)  # the resume restores the RNG states, whatever they are now
    resumed = shuffled_learner(
        Distributed(device="cpu"),
        Checkpoint(tmp_path / "resumed", resume=tmp_path / "part" / "last.pt"),
    )
    history = resumed.fit(3)
    assert [entry["epoch"] for entry in history] == [0, 1, 2]
    expected = unbroken.model.state_dict()
    assert all(
        torch.equal(value, expected[key]) for key, value in resumed.model.state_dict().items()
    )


def test_with_compile_ddp_wraps_the_compiled_model(process_group_of_one):
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_plugin = Compile(backend=recording_backend)
    ddp = Distributed(device="cpu")
    wrapped = []

    class Looks:
        def on_train_begin(self, learner):
            wrapped.append(isinstance(learner.module.module, CompiledModule))

    learner = shuffled_learner(ddp, compile_plugin, Looks())
    history = learner.fit(2)
    assert wrapped == [True, True]
    assert graphs and learner.module.module.failed is None
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_with_compile_failing_under_ddp_training_goes_on_with_the_plain_model(
    process_group_of_one, capsys
):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler on this platform")

    compile_plugin = Compile(backend=broken_backend)
    ddp = Distributed(device="cpu")
    wrapped = []

    class Looks:
        def on_train_end(self, learner):
            wrapped.append(learner.module.module.failed is not None)

    learner = shuffled_learner(ddp, compile_plugin, Looks())
    history = learner.fit(2)
    assert capsys.readouterr().err.count("cannot compile here (RuntimeError: no C++") == 1
    assert wrapped == [True, True]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_a_seeded_loader_is_dealt_out_by_its_own_sampler_with_a_new_order_each_epoch():
    from trainloop.data.seeding import SeededSampler, seeded_loader

    loader = seeded_loader(list(range(10)), batch_size=2, seed=0, shuffle=True)
    shares = [shard_train_data(loader, rank, 2, seed=0) for rank in range(2)]
    assert all(isinstance(share.sampler, SeededSampler) for share in shares)

    def epoch_of(epoch: int) -> list[list[int]]:
        for share in shares:
            share.sampler.set_epoch(epoch)
        return [[int(value) for batch in share for value in batch] for share in shares]

    first, second = epoch_of(0), epoch_of(1)
    assert sorted(first[0] + first[1]) == list(range(10))  # disjoint, and every sample once
    assert sorted(second[0] + second[1]) == list(range(10))
    assert first != second  # shuffled anew each epoch
