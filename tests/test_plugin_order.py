"""The order of the built-in plugins' hook implementations: declared, shown, fixed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import TINY_RECIPE

from trainloop.manager import BUILTIN_PLUGINS, PluginManager, builtin_plugin_modules


@pytest.fixture(scope="module")
def builtins() -> PluginManager:
    manager = PluginManager()
    manager.load_builtins()
    return manager


def test_every_plugin_module_is_declared_once_in_the_registration_order():
    assert sorted(BUILTIN_PLUGINS) == builtin_plugin_modules()
    assert len(set(BUILTIN_PLUGINS)) == len(BUILTIN_PLUGINS)


def test_the_builtins_register_in_the_declared_order_not_by_file_name(builtins):
    names = [name for name, plugin in builtins.list_name_plugin() if plugin is not None]
    assert names == list(BUILTIN_PLUGINS)


# The hooks where the order between plugins decides behaviour, as it must stay.
FIXED_ORDER = {
    "configure_context": [
        ("precision", ""),  # independent of the others: sets the mixed precision dtype
        ("device", ""),
        ("distributed", "trylast"),  # joins the process group on the device chosen
    ],
    "on_epoch_end": [
        ("checkpoint:Checkpoint", "wrapper"),  # writes after everyone's epoch end
        ("nan_guard:NanGuard", "tryfirst"),
        # steps its SWA schedule, like lr_scheduler its own (the two are not combined)
        ("weight_averaging:WeightAveraging", ""),
        ("throughput:Throughput", ""),  # a cancelled epoch's figures, before the writers
        ("profiler:Profiler", ""),
        ("lr_scheduler:LRScheduler", ""),  # adds `lr` before the writers read metrics
        ("tensorboard:TensorBoardLogger", "trylast"),
        ("progress:Progress", "trylast"),
        ("model_saver:ModelSaver", "trylast"),
        ("metrics_jsonl:MetricsFile", "trylast"),
        ("early_stopping:EarlyStopping", "trylast"),
    ],
    "on_step_begin": [
        ("precision:ScaledPrecision", "tryfirst"),  # unscale before clipping
        ("grad_accumulation:GradAccumulation", "tryfirst"),
        ("grad_clip:GradClip", ""),
    ],
    "iter_train_data": [
        ("throughput:Throughput", "wrapper"),  # times the iterator of whoever makes it
        ("checkpoint:Checkpoint", "tryfirst"),  # resumes mid-epoch (the core's: trylast)
    ],
    "on_fit_end": [
        ("profiler:Profiler", "wrapper, tryfirst"),  # the outermost: times all the others
        ("nan_guard:NanGuard", "wrapper"),
        ("interrupt:Interrupt", "wrapper"),
        ("weight_averaging:WeightAveraging", "tryfirst"),  # SWA's BatchNorm update first
        ("tensorboard:TensorBoardLogger", ""),
        ("summary:ModelSummary", ""),
        ("progress:Progress", ""),
        ("model_saver:ModelSaver", ""),
        ("lr_scheduler:LRScheduler", ""),
        ("checkpoint:Checkpoint", ""),
    ],
    "on_batch_end": [
        ("tensorboard:_ValidationSamples", ""),  # one module: the class defined last first
        ("tensorboard:_BatchScalars", ""),
        ("profiler:_TraceSteps", ""),
        ("interrupt:_StopAgreement", ""),
        ("checkpoint:_EveryBatches", "trylast"),  # after the other per-batch updates
    ],
}


@pytest.mark.parametrize("hook", sorted(FIXED_ORDER))
def test_the_order_of_the_builtins_where_it_matters(builtins, hook):
    assert builtins.call_order(hook) == FIXED_ORDER[hook]


def test_the_restoring_plugins_run_after_those_that_must_exist_before_a_restore(builtins):
    order = [name for name, _ in builtins.call_order("on_fit_begin")]
    # the scaler and the schedule exist before the checkpoint plugin restores their state
    assert order.index("precision:ScaledPrecision") < order.index("checkpoint:Checkpoint")
    assert order.index("lr_scheduler:LRScheduler") < order.index("checkpoint:Checkpoint")
    assert order.index("weight_averaging:WeightAveraging") < order.index("checkpoint:Checkpoint")
    # plugins that read the restored state come after it
    assert order.index("checkpoint:Checkpoint") < order.index("tensorboard:TensorBoardLogger")


@pytest.mark.parametrize("hook", ["on_fit_end", "on_predict_begin", "on_save_checkpoint"])
def test_the_weight_average_is_in_the_model_and_checkpoint_before_the_model_saver_reads_them(
    builtins, hook
):
    # fit's end and predict: model.pt and the predictions get the averaged weights (and
    # the best epoch's, loaded by model_saver, over them); a checkpoint's "model" is the
    # training weights before model_saver compares it with its best
    order = [name for name, _ in builtins.call_order(hook)]
    assert order.index("weight_averaging:WeightAveraging") < order.index("model_saver:ModelSaver")


def test_plugins_order_prints_each_hook_in_call_order_with_its_marker():
    result = subprocess.run(
        [sys.executable, "-m", "trainloop", "plugins", "--order"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("on_step_begin:\n")[1].split("\n\n")[0].splitlines()
    assert section[:3] == [
        "  1. precision:ScaledPrecision  [tryfirst]",
        "  2. grad_accumulation:GradAccumulation  [tryfirst]",
        "  3. grad_clip:GradClip",
    ]
    assert "forward:\n" in result.stdout and "core  [trylast]" in result.stdout


PROBE = """
import json

class Probe:
    \"\"\"Writes, for every hook, the run's implementations in pluggy's calling order.\"\"\"

    def on_train_begin(self, learner):  # every per-batch helper is registered by now
        order = {}
        for hook in learner.plugin_manager.hook_names():
            impls = getattr(learner.plugin_manager.hook, hook).get_hookimpls()
            order[hook] = [label(impl.plugin, impl.plugin_name) for impl in reversed(impls)]
        with open("order.json", "w") as file:
            json.dump(order, file)

def label(plugin, name):
    module = type(plugin).__module__
    if module.startswith("trainloop.plugins."):
        return module.rsplit(".", 1)[1] + ":" + type(plugin).__name__
    return name
"""
LEARNER = (
    "return Learner(model, data, data, optimizer=functools.partial(torch.optim.SGD, lr=cfg.lr)"
)
PROBED_RECIPE = TINY_RECIPE.replace(LEARNER, LEARNER + ", plugins=[Probe()]") + PROBE


def test_a_run_calls_the_builtins_in_the_order_plugins_order_prints(tmp_path, monkeypatch):
    # Every plugin with a feature switched on, so that its per-run object and per-batch
    # helpers register (in configure, at on_fit_begin) in whatever order the run makes.
    from trainloop.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "probed.py"
    assert "plugins=[Probe()]" in PROBED_RECIPE
    recipe.write_text(PROBED_RECIPE)
    status = main(["run", str(recipe), "--out", "run", "--epochs", "2", "--progress", "plain",
                   "--ema", "0.9", "--lr-schedule", "onecycle", "--checkpoint-every", "1",
                   "--keep-best", "2", "--tensorboard-every", "1", "--clip-grad-norm", "1",
                   "--accumulate", "2", "--summary", "--early-stop-patience", "2",
                   "--profile", "1", "--profile-warmup", "0"])  # fmt: skip
    assert status == 0
    run_order = json.loads((tmp_path / "order.json").read_text())
    listing = PluginManager()
    listing.load_builtins()
    compared = 0
    for hook, called in run_order.items():
        printed = [name for name, _ in listing.call_order(hook)]
        both = set(called) & set(printed)
        assert [name for name in called if name in both] == [
            name for name in printed if name in both
        ], hook
        compared += len(both) > 1
    assert compared >= 15  # hooks with two or more built-ins to order
