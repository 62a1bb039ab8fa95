"""grad_accumulation: N small batches step like one large batch."""

from __future__ import annotations

import argparse
import functools

import pytest
import torch
from conftest import write_tiny_recipe

from trainloop import Learner, PluginManager, RunConfig
from trainloop.cli import main
from trainloop.plugins import grad_accumulation
from trainloop.plugins.grad_accumulation import GradAccumulation


def regression_data(batches: int, batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batches * batch, 4, generator=generator)
    target = (inputs.sum(dim=1) > 0).long()
    return inputs, target


def split(inputs, target, sizes):
    out, start = [], 0
    for size in sizes:
        out.append((inputs[start : start + size], target[start : start + size]))
        start += size
    return out


def train(batches, plugins=(), epochs=2) -> Learner:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LogSoftmax(dim=1))
    learner = Learner(
        model,
        batches,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        plugins=plugins,
    )
    learner.fit(epochs)
    return learner


def assert_same_parameters(first: Learner, second: Learner) -> None:
    for mine, theirs in zip(first.model.parameters(), second.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_n_batches_accumulated_step_like_one_batch_n_times_as_large_with_momentum():
    inputs, target = regression_data(batches=12, batch=4)
    small = split(inputs, target, [4] * 12)  # 4 groups of 3
    large = split(inputs, target, [12] * 4)
    accumulated = train(small, plugins=[GradAccumulation(3)])
    reference = train(large)
    assert_same_parameters(accumulated, reference)
    # and it really is different from stepping on every small batch
    every_batch = train(small)
    assert not torch.allclose(every_batch.model[0].weight, reference.model[0].weight, atol=1e-3)


def test_an_uneven_last_group_steps_at_the_end_of_the_epoch_on_its_own_mean():
    inputs, target = regression_data(batches=5, batch=4)
    small = split(inputs, target, [4] * 5)  # groups of 2: [0, 1], [2, 3], [4]
    large = split(inputs, target, [8, 8, 4])
    assert_same_parameters(train(small, plugins=[GradAccumulation(2)]), train(large))


def test_the_optimizer_steps_on_every_nth_batch_and_on_the_last_one():
    stepped = []

    class Steps:
        def on_step_end(self, learner):
            stepped.append((learner.epoch, learner.iteration))

    inputs, target = regression_data(batches=7, batch=2)
    train(split(inputs, target, [2] * 7), plugins=[GradAccumulation(3), Steps()], epochs=2)
    assert stepped == [(0, 2), (0, 5), (0, 6), (1, 2), (1, 5), (1, 6)]


def test_without_len_an_unfinished_last_group_is_dropped_with_a_warning_not_carried_over():
    inputs, target = regression_data(batches=5, batch=4)
    small = split(inputs, target, [4] * 5)

    class NoLength:  # an iterable without __len__, like an IterableDataset's loader
        def __iter__(self):
            return iter(small)

    with pytest.warns(UserWarning, match="dropped the gradients of the last 1"):
        accumulated = train(NoLength(), plugins=[GradAccumulation(2)])
    # the same as training on the first 4 batches only, 2 at a time
    assert_same_parameters(accumulated, train(split(inputs, target, [8, 8])))


def test_the_reported_train_loss_is_the_batch_loss_not_divided_by_n():
    inputs, target = regression_data(batches=6, batch=4)
    batches = split(inputs, target, [4] * 6)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LogSoftmax(dim=1))
    with torch.no_grad():
        before = torch.nn.functional.nll_loss(model(inputs), target).item()
    # N larger than the epoch: the only step is after the last batch's loss
    learner = train(batches, plugins=[GradAccumulation(100)], epochs=1)
    assert learner.history[0]["train_loss"] == pytest.approx(before, rel=1e-6)


def test_accumulate_below_one_is_a_usage_error(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    status = main(["run", str(recipe), "--out", str(tmp_path / "run"), "--accumulate", "0"])
    assert status == 2
    assert "--accumulate 0: give a number of batches, at least 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_cli_registers_the_plugin_only_when_accumulating(tmp_path):
    def registered(accumulate):
        manager = PluginManager()
        options = argparse.Namespace(accumulate=accumulate)
        grad_accumulation.configure(RunConfig(options, tmp_path, tmp_path / "r.py", None, manager))
        return [plugin.every for _, plugin in manager.list_name_plugin()]

    assert registered(1) == []
    assert registered(4) == [4]


class CrashAfter:
    """Raises after ``at`` training batches (the step checkpoint is written first)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_batch_begin(self, learner: Learner) -> None:
        if learner.training and learner.step == self.at:
            raise RuntimeError("simulated crash")


def test_a_checkpoint_in_the_middle_of_a_group_resumes_with_its_gradients(tmp_path):
    from trainloop.plugins.checkpoint import Checkpoint

    inputs, target = regression_data(6, 4)
    batches = split(inputs, target, [4] * 6)
    reference = train(batches, [GradAccumulation(2)], epochs=2)
    # A step checkpoint after batch 3 of epoch 0: batch 3's gradients wait for batch 4.
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(batches, [GradAccumulation(2), Checkpoint(tmp_path, every=3), CrashAfter(4)])
    resume = Checkpoint(tmp_path, resume=tmp_path / "last.pt")
    resumed = train(batches, [GradAccumulation(2), resume], epochs=2)
    assert resumed.step == reference.step == 12
    assert_same_parameters(resumed, reference)
