"""The throughput plugin: samples per second and the fraction of time spent waiting for data."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch
from conftest import implemented_hooks, make_learner, write_tiny_recipe

from trainloop import CancelEpoch, Learner, hookimpl
from trainloop.cli import main
from trainloop.context import RunContext
from trainloop.plugins.throughput import DATA_WAIT, SAMPLES_PER_SECOND, Throughput


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared machine two threads can stall a tiny step for 100 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SlowSamples(torch.utils.data.Dataset):
    """Eight samples, each taking ``seconds`` to load."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        time.sleep(self.seconds)
        return torch.full((4,), float(index)), index % 2


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LogSoftmax(dim=1))


def test_a_slow_dataset_makes_the_data_wait_near_one_and_warns_once():
    warnings = io.StringIO()
    monitor = Throughput(stream=warnings, warn_after=0.0)
    data = torch.utils.data.DataLoader(SlowSamples(0.02), batch_size=2)
    learner = Learner(tiny_model(), data, plugins=[monitor])
    history = learner.fit(2)

    assert [record.steps for record in monitor.epochs] == [4, 4]
    assert [record.samples for record in monitor.epochs] == [8, 8]
    assert all(record.waiting >= 8 * 0.02 for record in monitor.epochs)  # 8 loads of 20 ms
    assert all(entry[DATA_WAIT] > 0.9 for entry in history)
    message = warnings.getvalue()
    assert message.count("\n") == 1  # one line, the first epoch only
    assert "epoch 1 waited for its batches" in message and "data-bound" in message
    for remedy in ("--workers", "pin_memory=True", "uint8"):
        assert remedy in message


def test_an_epoch_shorter_than_warn_after_is_measured_but_never_warns():
    warnings = io.StringIO()
    monitor = Throughput(stream=warnings, warn_after=60.0)
    data = torch.utils.data.DataLoader(SlowSamples(0.02), batch_size=2)
    history = Learner(tiny_model(), data, plugins=[monitor]).fit(2)

    assert all(entry[DATA_WAIT] > 0.9 for entry in history)  # data-bound, but 0.2 s an epoch
    assert warnings.getvalue() == ""


def test_batches_in_memory_make_the_data_wait_near_zero_and_no_warning():
    warnings = io.StringIO()
    monitor = Throughput(stream=warnings, warn_after=0.0)
    torch.manual_seed(0)
    # A list of tensors: next() costs nothing beside steps of a few milliseconds (tens of
    # them an epoch, so that one pause of a busy machine inside next() stays small).
    batches = [(torch.randn(64, 512), torch.randint(0, 2, (64,))) for _ in range(32)]
    layers = [torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 2)]
    model = torch.nn.Sequential(*layers, torch.nn.LogSoftmax(dim=1))
    history = Learner(model, batches, plugins=[monitor]).fit(2)

    assert all(entry[DATA_WAIT] < 0.1 for entry in history)
    assert warnings.getvalue() == ""


def test_samples_per_second_are_the_epoch_samples_over_its_training_time():
    monitor = Throughput()
    history = make_learner([monitor]).fit(2)  # 50 samples in batches of 16

    for entry, record in zip(history, monitor.epochs):
        assert (record.epoch, record.samples, record.steps) == (entry["epoch"], 50, 4)
        assert entry[SAMPLES_PER_SECOND] == round(50 / record.seconds, 1)
        assert record.steps_per_second == pytest.approx(4 / record.seconds)
        assert entry[DATA_WAIT] == round(record.waiting / record.seconds, 4)
    assert list(history[0]) == [
        "epoch",
        "train_loss",
        SAMPLES_PER_SECOND,
        DATA_WAIT,
        "valid_loss",
        "valid_accuracy",
    ]


def test_it_times_the_iterator_of_whichever_plugin_owns_the_data():
    class EveryOtherBatch:
        @hookimpl
        def iter_train_data(self, learner):
            return iter(learner.train_data[::2])

    monitor = Throughput()
    make_learner([monitor, EveryOtherBatch()]).fit(1)

    assert (monitor.epochs[0].steps, monitor.epochs[0].samples) == (2, 32)  # batches 0 and 2


def test_a_cancelled_epoch_reports_the_batches_it_ran():
    class CancelAtTheThirdBatch:
        def on_batch_end(self, learner):
            if learner.training and learner.iteration == 2:
                raise CancelEpoch

    monitor = Throughput()
    history = make_learner([monitor, CancelAtTheThirdBatch()]).fit(1)

    assert (monitor.epochs[0].steps, monitor.epochs[0].samples) == (3, 48)
    assert {SAMPLES_PER_SECOND, DATA_WAIT} <= set(history[0])


def test_the_monitor_adds_no_per_batch_hook():
    learner = make_learner([Throughput()])
    per_batch = {"on_batch_begin", "on_batch_end", "on_backward_end", "on_step_begin"}
    assert implemented_hooks(learner, per_batch) == set()


def test_distributed_runs_sum_samples_per_second_and_average_the_wait():
    class TwoEqualProcesses:  # stands in for all_reduce over two processes alike
        @hookimpl
        def reduce_tensor(self, tensor):
            return tensor * 2

    monitor = Throughput()
    context = RunContext(rank=0, world_size=2)
    history = make_learner([monitor, TwoEqualProcesses()], context=context).fit(1)

    record = monitor.epochs[0]
    assert history[0][SAMPLES_PER_SECOND] == round(2 * record.samples_per_second, 1)
    assert history[0][DATA_WAIT] == round(record.data_wait, 4)


def test_a_run_shows_the_figures_in_metrics_jsonl_tensorboard_and_the_progress_table(
    tmp_path, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_tiny_recipe(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--epochs", "2", "--out", str(out)]) == 0

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record[SAMPLES_PER_SECOND] > 0 and 0 <= record[DATA_WAIT] <= 1
    header = capsys.readouterr().out.splitlines()[1].split()
    assert header == ["epoch", "train_loss", SAMPLES_PER_SECOND, DATA_WAIT, "valid_loss", "time"]
    events = EventAccumulator(str(out))
    events.Reload()
    logged = [event.value for event in events.Scalars(SAMPLES_PER_SECOND)]
    assert logged == pytest.approx([record[SAMPLES_PER_SECOND] for record in records])


@pytest.mark.parametrize("switch", [["--no-throughput"], ["-p", "no:throughput"]])
def test_it_can_be_switched_off(tmp_path, switch):
    recipe = write_tiny_recipe(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), *switch]) == 0
    record = json.loads((out / "metrics.jsonl").read_text())
    assert set(record) == {"epoch", "train_loss", "valid_loss"}
