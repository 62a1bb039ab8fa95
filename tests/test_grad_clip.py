"""grad_clip: gradients are clipped before the optimizer steps, after rescaling plugins."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import make_learner, write_tiny_recipe

from trainloop import PluginManager, RunConfig, UsageError, hookimpl
from trainloop.cli import main
from trainloop.plugins import grad_clip
from trainloop.plugins.grad_accumulation import GradAccumulation
from trainloop.plugins.grad_clip import GradClip


class GradientSpy:
    """Records the gradients the optimizer is about to use (trylast: after clipping)."""

    def __init__(self):
        self.norms = []
        self.max_abs = []

    @hookimpl(trylast=True)
    def on_step_begin(self, learner):
        grads = [p.grad for p in learner.model.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())
        self.max_abs.append(max(g.abs().max().item() for g in grads))


class ScaleLoss:
    """Makes the gradients large: the loss times 1000."""

    @hookimpl
    def compute_loss(self, learner, pred, batch):
        return 1000 * learner.loss_func(pred, batch[1])


class PreClipSpy(GradientSpy):
    """Records the gradients before clipping (tryfirst, where AMP would unscale)."""

    @hookimpl(tryfirst=True)
    def on_step_begin(self, learner):
        GradientSpy.on_step_begin(self, learner)


def test_clip_grad_norm_caps_the_total_norm_the_optimizer_sees():
    before, after = PreClipSpy(), GradientSpy()
    learner = make_learner(plugins=[ScaleLoss(), GradClip(max_norm=0.5), before, after])
    learner.train_data = learner.train_data * 2  # 8 steps
    learner.fit(1)
    assert min(before.norms) > 0.5  # the clip had work to do on every step
    assert after.norms == pytest.approx([0.5] * 8, rel=1e-5)


def test_clip_grad_value_clamps_every_element():
    spy = GradientSpy()
    make_learner(plugins=[ScaleLoss(), GradClip(max_value=0.01), spy], valid=False).fit(1)
    assert spy.max_abs == pytest.approx([0.01] * len(spy.max_abs))


def test_clipping_leaves_small_gradients_alone():
    clipped, plain = make_learner(plugins=[GradClip(max_norm=1e6)]), make_learner()
    clipped.fit(2), plain.fit(2)
    for mine, theirs in zip(clipped.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def test_with_accumulation_the_clip_sees_the_averaged_gradient():
    # The 4 batches of an epoch accumulate into one step; clipping must apply to their
    # mean, so a max_norm above the mean's norm (but below the sum's) changes nothing.
    spy = GradientSpy()
    accumulated = make_learner(plugins=[GradAccumulation(4), spy], valid=False)
    accumulated.fit(1)
    mean_norm = spy.norms[0]
    spy_clipped = GradientSpy()
    clipped = make_learner(
        plugins=[GradAccumulation(4), GradClip(max_norm=mean_norm * 1.5), spy_clipped], valid=False
    )
    clipped.fit(1)
    assert spy_clipped.norms[0] == pytest.approx(mean_norm, rel=1e-6)
    for mine, theirs in zip(
        clipped.model.parameters(), accumulated.model.parameters(), strict=True
    ):
        torch.testing.assert_close(mine, theirs)


def test_grad_clip_needs_a_limit_and_a_positive_one():
    with pytest.raises(ValueError, match="needs max_norm, max_value or both"):
        GradClip()
    with pytest.raises(ValueError, match="max_norm=0"):
        GradClip(max_norm=0)


def test_the_cli_registers_the_clipper_only_when_asked(tmp_path):
    def registered(**values):
        manager = PluginManager()
        options = argparse.Namespace(**{"clip_grad_norm": None, "clip_grad_value": None, **values})
        grad_clip.configure(RunConfig(options, tmp_path, tmp_path / "r.py", None, manager))
        return [(plugin.max_norm, plugin.max_value) for _, plugin in manager.list_name_plugin()]

    assert registered() == []
    assert registered(clip_grad_norm=1.0) == [(1.0, None)]
    assert registered(clip_grad_value=0.5) == [(None, 0.5)]


def test_a_non_positive_clip_is_a_usage_error_on_the_command_line(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    status = main(["run", str(recipe), "--out", str(tmp_path / "run"), "--clip-grad-norm", "-1"])
    assert status == 2
    assert "--clip-grad-norm -1.0: give a positive number" in capsys.readouterr().err


def test_with_fp16_amp_the_clip_sees_unscaled_gradients():
    from trainloop.plugins.precision import ScaledPrecision

    try:
        amp = ScaledPrecision()
    except UsageError as error:
        pytest.skip(f"no float16 autocast here: {error}")
    after = GradientSpy()
    learner = make_learner(plugins=[amp, GradClip(max_norm=0.01), after])
    learner.fit(1)
    # the scaler multiplies the loss by 2**16: clipping those gradients to 0.01 and then
    # unscaling would leave norms near 1.5e-7, not 0.01
    assert after.norms == pytest.approx([0.01] * 4, rel=1e-3)
