"""The summary plugin: --summary prints layers, output shapes, parameters and memory once."""

from __future__ import annotations

import torch
from conftest import make_learner, write_tiny_recipe

from trainloop.cli import main
from trainloop.plugins.summary import ModelSummary


def test_the_summary_lists_each_layer_with_its_output_shape_and_parameters(capsys):
    summary = ModelSummary()
    learner = make_learner([summary])  # Linear(4, 2), LogSoftmax; batches of 16
    learner.fit(2)

    assert summary.rows == [("0", "Linear", "16x2", 10), ("1", "LogSoftmax", "16x2", 0)]
    assert (summary.total, summary.trainable) == (10, 10)
    assert summary.memory == {"parameters": 40, "gradients": 40, "activations": 256}
    printed = capsys.readouterr().out
    assert printed.count("layer  type") == 1  # the first training batch only
    assert "10 parameters (10 trainable); memory: parameters 40 B, gradients 40 B" in printed


def test_the_hooks_are_gone_after_the_first_batch_and_training_is_unchanged():
    plain = make_learner()
    plain.fit(2)
    summarised = make_learner([ModelSummary()])
    summarised.fit(2)
    for module in summarised.model.modules():
        assert not module._forward_hooks
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, summarised.model.state_dict()[name])


def test_summary_is_an_option_of_every_run(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    assert main(["run", str(recipe), "--summary", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert ["0", "Linear", "8x2", "10"] in rows and ["1", "LogSoftmax", "8x2", "0"] in rows
    assert main(["run", str(recipe), "--out", str(tmp_path / "plain")]) == 0
    assert "parameters (" not in capsys.readouterr().out
