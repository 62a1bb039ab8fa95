"""The device plugin: choosing a device, moving the model once and each batch, compile."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_learner

from trainloop import Learner, PluginManager, RunConfig, UsageError
from trainloop.cli import main
from trainloop.context import current_run, pin_memory_default
from trainloop.plugins import device as device_plugin
from trainloop.plugins.device import Compile, CompiledModule, Device, move_batch, resolve_device

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def configure(**options) -> RunConfig:
    """Run the device plugin's configure hook with these options; return the config."""
    values = {"device": "auto", "channels_last": False, "compile": False, **options}
    options = argparse.Namespace(**values)
    config = RunConfig(options, Path("unused"), Path("r.py"), None, PluginManager())
    device_plugin.configure_context(context=config.context, options=options)
    device_plugin.configure(config=config)
    return config


def extra_plugins(config: RunConfig) -> list[str]:
    return [name for name, _ in config.plugin_manager.list_name_plugin()]


class TinyConvNet(torch.nn.Module):
    """Records the memory format of the inputs it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(4, 2)
        self.inputs_channels_last: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs_channels_last.append(images.is_contiguous(memory_format=torch.channels_last))
        features = self.conv(images).mean(dim=(2, 3))
        return torch.log_softmax(self.head(features), dim=1)


def conv_learner(plugins=()) -> Learner:
    torch.manual_seed(0)
    images = torch.randn(8, 3, 6, 6)
    target = torch.randint(0, 2, (8,))
    data = [(images[:4], target[:4]), (images[4:], target[4:])]
    return Learner(
        TinyConvNet(),
        data,
        data,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        plugins=plugins,
    )


# --- choosing the device ---------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA or torch.backends.mps.is_available(), reason="a GPU is present")
def test_auto_is_the_cpu_on_a_machine_without_gpu():
    assert resolve_device("auto") == torch.device("cpu")


def test_cpu_is_accepted_as_given():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("value", "words"),
    [("banana", "not a device"), ("cuda:99", "cuda")],
)
def test_a_bad_device_is_a_usage_error_naming_the_option(value, words):
    with pytest.raises(UsageError, match=f"--device {value}: .*{words}"):
        resolve_device(value)


def test_a_bad_device_on_the_command_line_is_one_line_and_exit_status_2(capsys):
    status = main(["run", str(ROOT / "recipes" / "single_node.py"), "--device", "cuda:99"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1
    assert err.startswith("trainloop: error: --device cuda:99:")


# --- zero cost on the CPU --------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA or torch.backends.mps.is_available(), reason="a GPU is present")
def test_on_the_cpu_without_options_the_plugin_registers_nothing():
    config = configure()
    assert extra_plugins(config) == []
    assert config.context.device == torch.device("cpu")
    learner = make_learner(plugin_manager=config.plugin_manager)
    owners = [impl.plugin_name for impl in learner.hook.transfer_batch.get_hookimpls()]
    assert owners == ["core"]  # the learner then calls the core's transfer directly


def test_channels_last_or_compile_register_their_plugins_even_on_the_cpu():
    assert extra_plugins(configure(device="cpu", channels_last=True)) == ["device.placement"]
    assert extra_plugins(configure(device="cpu", compile=True)) == ["device.compile"]


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is present")
def test_memory_is_not_pinned_when_batches_stay_on_the_cpu():
    config = configure(device="cpu")
    with current_run(config.context, config.plugin_manager):
        assert pin_memory_default() is False
    assert pin_memory_default() is False


# --- moving batches --------------------------------------------------------------------

Pair = collections.namedtuple("Pair", ["image", "label"])


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    meta: dict
    name: str = "x"


def test_move_batch_moves_every_tensor_in_nested_structures_and_keeps_their_types():
    batch = {
        "pair": Pair(torch.ones(2, 3), torch.tensor([1, 2])),
        "list": [torch.zeros(1, dtype=torch.float16), 7, "text"],
        "sample": Sample(torch.ones(1), {"mask": torch.zeros(2, dtype=torch.bool)}),
        "tuple": (torch.ones(1, dtype=torch.float64),),
    }
    moved = move_batch(batch, "meta")  # the meta device: a real move, no GPU needed
    assert type(moved["pair"]) is Pair
    assert moved["pair"].image.device.type == "meta"
    assert moved["pair"].label.dtype == torch.int64
    assert moved["list"][0].device.type == "meta" and moved["list"][0].dtype == torch.float16
    assert moved["list"][1:] == [7, "text"]
    assert type(moved["sample"]) is Sample and moved["sample"] is not batch["sample"]
    assert moved["sample"].image.device.type == "meta"
    assert moved["sample"].meta["mask"].dtype == torch.bool
    assert moved["sample"].meta["mask"].device.type == "meta"
    assert moved["sample"].name == "x"
    assert type(moved["tuple"]) is tuple and moved["tuple"][0].dtype == torch.float64
    assert batch["pair"].image.device.type == "cpu"  # the original is left alone


def test_channels_last_applies_to_four_dimensional_tensors_only():
    images, masks = torch.randn(2, 3, 4, 5), torch.randn(2, 4, 5)
    moved_images, moved_masks = move_batch((images, masks), "cpu", channels_last=True)
    assert moved_images.is_contiguous(memory_format=torch.channels_last)
    assert not images.is_contiguous(memory_format=torch.channels_last)
    assert moved_masks is masks
    assert torch.equal(moved_images, images)


def test_the_model_is_placed_before_plain_on_fit_begin_plugins_run():
    seen = []

    class RestoresACheckpoint:  # a plain on_fit_begin, as the checkpoint plugin's
        def on_fit_begin(self, learner):
            weight = learner.model.conv.weight
            seen.append(weight.is_contiguous(memory_format=torch.channels_last))

    learner = conv_learner(plugins=[RestoresACheckpoint(), Device("cpu", channels_last=True)])
    learner.fit(1)
    assert seen == [True]
    assert all(learner.model.inputs_channels_last)
    assert len(learner.model.inputs_channels_last) == 4  # 2 training + 2 validation batches


def test_predict_moves_batches_through_the_plugin_without_fit():
    learner = conv_learner(plugins=[Device("cpu", channels_last=True)])
    predictions = learner.predict([torch.randn(2, 3, 6, 6)])
    assert predictions.shape == (2, 2)
    assert learner.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert learner.model.inputs_channels_last == [True]


@needs_cuda
def test_cuda_gets_the_model_once_and_pinned_batches_without_blocking():
    learner = make_learner(plugins=[Device("cuda")])
    pinned = [(inputs.pin_memory(), target.pin_memory()) for inputs, target in learner.train_data]
    learner.train_data = pinned
    devices = []

    class Where:
        def on_batch_begin(self, learner):
            devices.append(learner.batch[0].device.type)

    learner.add_plugin(Where())
    learner.fit(1)
    assert next(learner.model.parameters()).device.type == "cuda"
    assert set(devices) == {"cuda"}
    config = configure(device="auto")
    with current_run(config.context, config.plugin_manager):
        assert pin_memory_default() is True


# --- torch.compile ---------------------------------------------------------------------


def test_compile_runs_the_forward_pass_compiled_and_keeps_the_plain_module():
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    plugin = Compile(backend=recording_backend)
    learner = make_learner(plugins=[plugin])
    model = learner.model
    history = learner.fit(2)
    assert graphs, "the compiled forward pass was never used"
    assert isinstance(learner.module, CompiledModule) and learner.module.failed is None
    assert learner.model is model
    assert all(not key.startswith("_orig_mod") for key in learner.model.state_dict())
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_compile_that_fails_says_so_in_one_line_once_and_training_goes_on(capsys):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler on this platform")

    learner = make_learner(plugins=[Compile(backend=broken_backend)])
    history = learner.fit(2)
    err = capsys.readouterr().err
    assert err.count("cannot compile here") == 1
    assert "no C++ compiler" in err
    assert learner.module.failed is not None
    assert len(history) == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is present: the check would run")
def test_the_gpu_check_says_in_one_line_that_it_needs_cuda_and_exits_0(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclass looks it up
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("gpu_check: needs an NVIDIA GPU with CUDA")
