"""The precision plugin: autocast around forward and loss, the GradScaler for float16."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import make_data

from trainloop import Learner, PluginManager, RunConfig, UsageError
from trainloop.cli import main
from trainloop.plugins import precision as precision_plugin
from trainloop.plugins.precision import Precision, ScaledPrecision
from trainloop.tasks.mnist.data import write_idx_files

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class RecordingNet(torch.nn.Module):
    """A small classifier that records the dtype of its hidden activations."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(4, 16)
        self.out = torch.nn.Linear(16, 2)
        self.hidden_dtypes: list[torch.dtype] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.hidden(inputs))
        self.hidden_dtypes.append(hidden.dtype)
        return torch.log_softmax(self.out(hidden).float(), dim=1)


def learner_with(*plugins, epochs_data: int = 64) -> Learner:
    torch.manual_seed(0)
    return Learner(
        RecordingNet(),
        make_data(samples=epochs_data, batch=16),
        make_data(samples=32, batch=16, seed=1),
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        plugins=plugins,
    )


def test_bf16_mixed_runs_the_forward_pass_in_bfloat16_on_the_cpu_and_still_trains():
    learner = learner_with(Precision("bf16-mixed"))
    history = learner.fit(4)
    assert set(learner.model.hidden_dtypes) == {torch.bfloat16}
    assert learner.model.hidden.weight.dtype == torch.float32  # the weights stay float32
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 0.8


def test_the_loss_is_computed_under_autocast_too():
    seen = []

    def loss_func(pred, target):
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.nn.functional.nll_loss(pred, target)

    learner = learner_with(Precision("bf16-mixed"))
    learner.loss_func = loss_func
    learner.fit(1)
    assert seen and all(seen)
    assert not torch.is_autocast_enabled("cpu")  # and only there


def test_precision_32_registers_nothing():
    options = argparse.Namespace(precision="32", device="cpu")
    config = RunConfig(options, Path("unused"), Path("r.py"), None, PluginManager())
    precision_plugin.configure(config=config)
    assert list(config.plugin_manager.list_name_plugin()) == []


def test_bf16_mixed_needs_no_grad_scaler_hooks():
    learner = learner_with(Precision("bf16-mixed"))
    for step in ("backward", "optimizer_step"):
        owners = [impl.plugin_name for impl in getattr(learner.hook, step).get_hookimpls()]
        assert owners == ["core"]


def test_an_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError, match="--precision 8-bit: use one of 32, 16-mixed, bf16-mixed"):
        Precision("8-bit")


def test_an_unknown_precision_on_the_command_line_is_one_line_and_exit_status_2(capsys):
    status = main(["run", str(ROOT / "recipes" / "single_node.py"), "--precision", "8"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "--precision" in err


def test_the_mnist_recipe_trains_with_bf16_mixed_from_the_command_line(tmp_path, capsys):
    write_idx_files(tmp_path / "data" / "MNIST" / "raw", n_train=400, n_test=100, gz=False)
    out = tmp_path / "run"
    status = main(
        [
            "run",
            str(ROOT / "recipes" / "mnist_mlp.py"),
            "--data-dir",
            str(tmp_path / "data"),
            "--no-download",
            "--epochs",
            "3",
            "--batch-size",
            "50",
            "--lr",
            "0.05",
            "--precision",
            "bf16-mixed",
            "--out",
            str(out),
        ]
    )
    capsys.readouterr()
    assert status == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert lines[-1]["valid_accuracy"] > 0.5


# --- float16 with the GradScaler (torch runs it on the CPU too) -------------------------


def test_16_mixed_is_a_scaled_precision_with_a_grad_scaler():
    plugin = ScaledPrecision(init_scale=256.0)
    assert isinstance(plugin, ScaledPrecision)
    learner = learner_with(plugin)
    learner.fit(1)
    assert set(learner.model.hidden_dtypes) == {torch.float16}
    assert plugin.scaler.get_scale() == 256.0


def test_gradients_are_unscaled_before_plain_on_step_begin_plugins_such_as_clipping():
    seen = []

    class LooksAtGradients:  # a plain on_step_begin, like the grad_clip plugin's
        def on_step_begin(self, learner):
            seen.append(learner.model.out.bias.grad.clone())

    scaled = learner_with(ScaledPrecision(init_scale=1024.0), LooksAtGradients())
    scaled.train_data = scaled.train_data[:1]
    scaled.fit(1)
    reference = learner_with(LooksAtGradients())  # float32, no scaler
    reference.train_data = reference.train_data[:1]
    reference.fit(1)
    scaled_grad, true_grad = seen
    assert torch.allclose(scaled_grad, true_grad, rtol=0.05, atol=1e-3)


def test_a_step_with_infinite_gradients_is_skipped_and_the_scale_lowered():
    class PoisonsTheFirstGradients:
        def on_backward_end(self, learner):
            if learner.step == 0:
                learner.model.out.weight.grad[0, 0] = float("inf")

    plugin = ScaledPrecision(init_scale=256.0)
    learner = learner_with(plugin, PoisonsTheFirstGradients())
    learner.train_data = learner.train_data[:1]
    before = {key: value.clone() for key, value in learner.model.state_dict().items()}
    history = learner.fit(1)
    after = learner.model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # no step taken
    assert plugin.scaler.get_scale() == 128.0
    assert history[0]["train_loss"] == pytest.approx(history[0]["train_loss"])  # finite

    control = ScaledPrecision(init_scale=256.0)
    learner = learner_with(control)
    learner.train_data = learner.train_data[:1]
    learner.fit(1)
    assert not torch.equal(before["out.weight"], learner.model.state_dict()["out.weight"])
    assert control.scaler.get_scale() == 256.0


def test_the_grad_scaler_state_goes_into_checkpoints_and_comes_back(tmp_path):
    trained = ScaledPrecision(init_scale=512.0, growth_interval=1)
    learner = learner_with(trained)
    learner.fit(1)  # grows the scale once per clean step
    checkpoint = {}
    learner.hook.on_save_checkpoint(learner=learner, checkpoint=checkpoint)
    torch.save(checkpoint, tmp_path / "last.pt")
    saved_scale = trained.scaler.get_scale()
    assert checkpoint["grad_scaler"]["scale"] == saved_scale
    assert saved_scale != 512.0

    loaded = torch.load(tmp_path / "last.pt", weights_only=True)
    scales_at_fit_begin = []

    class Resumes:  # restores in a plain on_fit_begin, as the checkpoint plugin does
        def __init__(self, plugin):
            self.plugin = plugin

        def on_fit_begin(self, learner):
            learner.hook.on_load_checkpoint(learner=learner, checkpoint=loaded)
            scales_at_fit_begin.append(self.plugin.scaler.get_scale())

    resumed = ScaledPrecision(init_scale=512.0)
    learner_with(resumed, Resumes(resumed)).fit(1)
    assert scales_at_fit_begin == [saved_scale]

    loaded_before_fit = ScaledPrecision(init_scale=512.0)
    learner = learner_with(loaded_before_fit)
    learner.hook.on_load_checkpoint(learner=learner, checkpoint=loaded)
    learner.train_data = learner.train_data[:1]
    learner.fit(1)
    assert loaded_before_fit.scaler.state_dict()["growth_interval"] == 1  # the saved one


@needs_cuda
@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)]
)
def test_mixed_precision_on_cuda_autocasts_to_its_dtype(precision, dtype):
    from trainloop.plugins.device import Device

    learner = learner_with(Device("cuda"), Precision(precision))
    history = learner.fit(2)
    assert set(learner.model.hidden_dtypes) == {dtype}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
