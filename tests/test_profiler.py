"""The profiler plugin: --profile N traces training steps; the time each plugin's hooks took."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import make_learner, write_tiny_recipe

from trainloop import hookimpl
from trainloop.cli import main
from trainloop.plugins.profiler import Profiler

BUILT_IN_OBJECTS = (  # what the built-in plugins register for a default run
    "checkpoint.writer",
    "metrics_jsonl.writer",
    "model_saver.writer",
    "progress.display",
    "tensorboard.logger",
    "throughput.monitor",
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_profile_writes_a_chrome_trace_of_the_steps_and_prints_the_top_operators(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)  # 4 batches an epoch
    out = tmp_path / "run"
    argv = ["run", str(recipe), "--epochs", "2", "--profile", "2", "--profile-warmup", "1"]
    assert main([*argv, "--out", str(out)]) == 0

    trace = json.loads((out / "profile" / "trace.json").read_text())
    names = [event.get("name") for event in trace["traceEvents"]]
    assert names.count("aten::addmm") == 2  # the Linear layer's forward, once a step
    steps = sorted(name for name in names if str(name).startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#1", "ProfilerStep#2"]  # the 2nd and 3rd of the epoch
    printed = capsys.readouterr().out
    assert f"profile: 2 training steps after 1 warm-up steps, traced in {out}" in printed
    table = printed.split("traced in", 1)[1].splitlines()[1:12]
    assert table[0].split() == ["operator", "calls", "self", "CPU", "ms", "share"]
    operators = [line.rsplit(maxsplit=3)[0] for line in table[1:]]
    assert "aten::addmm" in operators
    assert all(any(str(name).startswith(shown) for name in names) for shown in operators)
    assert not any(name.startswith("ProfilerStep") for name in operators)  # ops only
    assert "aten::addmm" in (out / "profile" / "operators.txt").read_text()


def test_traced_steps_show_each_plugin_hook_as_a_range(tmp_path):
    class EveryBatch:
        def on_batch_end(self):
            pass

    profiler = Profiler(tmp_path, steps=2, warmup=1)
    make_learner([profiler, EveryBatch()]).fit(1)

    trace = json.loads((tmp_path / "trace.json").read_text())
    ranges = [
        event for event in trace["traceEvents"] if event.get("name") == "EveryBatch.on_batch_end"
    ]
    assert len(ranges) == 2


def test_the_plugin_table_names_the_built_in_plugins_and_counts_their_calls(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--epochs", "2", "--profile-plugins", "--out", str(out)]) == 0

    document = json.loads((out / "profile" / "plugins.json").read_text())
    calls = {(row["plugin"], row["hook"]): row["calls"] for row in document["hooks"]}
    assert {plugin for plugin, _ in calls} >= set(BUILT_IN_OBJECTS)
    assert calls["metrics_jsonl.writer", "on_epoch_end"] == 2
    assert calls["throughput.monitor", "iter_train_data"] == 2
    assert calls["progress.display", "on_fit_begin"] == 1
    assert document["epochs"] == 2
    plugin_time = sum(row["seconds"] for row in document["hooks"])
    assert 0 < plugin_time < document["fit_seconds"]
    printed = capsys.readouterr().out
    table = (out / "profile" / "plugins.txt").read_text()
    assert table.strip() in printed
    assert table.splitlines()[1].split() == [
        "plugin", "hook", "calls", "total", "ms", "ms/epoch", "share"
    ]  # fmt: skip
    assert not (out / "profile" / "trace.json").exists()  # no torch.profiler without --profile


class Sleeper:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class Outer(Sleeper):
    def on_epoch_end(self, learner):
        time.sleep(self.seconds)
        learner.hook.on_load_checkpoint(learner=learner, checkpoint={})


class Inner(Sleeper):
    def on_load_checkpoint(self):
        time.sleep(self.seconds)


class AroundEpochEnd(Sleeper):
    @hookimpl(wrapper=True)
    def on_epoch_end(self):
        time.sleep(self.seconds)
        result = yield
        time.sleep(self.seconds)
        return result


def test_each_plugin_is_timed_for_its_own_code_not_for_the_hooks_it_calls_or_wraps(tmp_path):
    profiler = Profiler(tmp_path)
    learner = make_learner([profiler, Outer(0.01), Inner(0.05), AroundEpochEnd(0.02)])
    learner.fit(1)

    times = profiler.plugin_times
    assert times["Inner", "on_load_checkpoint"][0] == 1
    assert 0.05 <= times["Inner", "on_load_checkpoint"][1] < 0.09
    assert 0.01 <= times["Outer", "on_epoch_end"][1] < 0.045  # without Inner's 50 ms
    assert times["AroundEpochEnd", "on_epoch_end"][0] == 1  # one call, two timed parts
    assert 0.04 <= times["AroundEpochEnd", "on_epoch_end"][1] < 0.075  # without Outer
    assert "core" not in {plugin for plugin, _ in times}  # the loop's own steps


def test_without_an_option_it_registers_nothing(tmp_path):
    recipe = write_tiny_recipe(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    assert not (out / "profile").exists()


def test_hooks_are_put_back_and_errors_still_name_their_plugin(tmp_path):
    class Failing:
        def on_epoch_end(self):
            raise RuntimeError("broken")

    failing = Failing()
    profiler = Profiler(tmp_path, steps=1, warmup=0)
    learner = make_learner([profiler, failing])
    with pytest.raises(RuntimeError, match="broken") as raised:
        learner.fit(1)

    assert "plugin 'Failing' raised it in hook 'on_epoch_end'" in raised.value.__notes__
    impls = learner.plugin_manager.hook.on_epoch_end.get_hookimpls()
    assert [impl.function for impl in impls if impl.plugin is failing] == [failing.on_epoch_end]
    assert not learner.plugin_manager.has_plugin("profiler.steps")
    assert (tmp_path / "plugins.json").exists()  # written whatever happened


def test_a_fit_shorter_than_the_warm_up_says_nothing_was_traced(tmp_path, capsys):
    make_learner([Profiler(tmp_path, steps=2, warmup=10)]).fit(1)  # 4 steps
    assert "fit ended after 4 training steps, before the traced ones" in capsys.readouterr().err
    assert not (tmp_path / "trace.json").exists()


@pytest.mark.parametrize("option", ["--profile", "--profile-warmup"])
def test_a_negative_number_of_steps_is_refused(tmp_path, capsys, option):
    recipe = write_tiny_recipe(tmp_path)
    assert main(["run", str(recipe), option, "-1", "--out", str(tmp_path / "run")]) == 2
    assert f"{option} -1: give a number of steps, 0 or more" in capsys.readouterr().err
