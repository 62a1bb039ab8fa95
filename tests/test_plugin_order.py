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
    "on_batch_end": [
        ("tensorboard:_BatchScalars", ""),
        ("tensorboard:_ValidationSamples", ""),
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
    # plugins that read the restored state come after it
    assert order.index("checkpoint:Checkpoint") < order.index("tensorboard:TensorBoardLogger")


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
