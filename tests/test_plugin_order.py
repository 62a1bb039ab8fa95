"""The order of the built-in plugins' hook implementations: declared, shown, fixed."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
        ("distributed:Distributed", "trylast"),
    ],
    "on_batch_end": [
        ("tensorboard:_BatchScalars", ""),
        ("tensorboard:_ValidationSamples", ""),
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
