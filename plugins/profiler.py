"""profiler: ``--profile N`` traces N training steps with torch.profiler; time per plugin hook."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pluggy
import torch
from torch.profiler import ProfilerAction

from trainloop import Learner, PluginManager, RunConfig, UsageError, hookimpl

FOLDER = "profile"
"""The run folder's sub-folder for what the profiler writes."""
TRACE_NAME = "trace.json"
"""The Chrome trace of the profiled steps (chrome://tracing, https://ui.perfetto.dev)."""
OPERATORS_NAME = "operators.txt"
"""torch.profiler's table of every operator of the profiled steps, by self time."""
PLUGINS_NAME = "plugins.txt"
"""The table of time per plugin and hook, as printed."""
PLUGINS_JSON_NAME = "plugins.json"
"""The same numbers as JSON: ``{"epochs", "fit_seconds", "hooks": [{"plugin", "hook",
"calls", "seconds"}, ...]}``."""
TOP = 10
"""How many operators the printed table shows."""


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("profiler")
    group.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="trace N training steps with torch.profiler after --profile-warmup steps: a "
        f"Chrome/Perfetto trace in the run folder's {FOLDER}/, the top operators by self "
        "time, and the time each plugin's hooks took (default: 0, off)",
    )
    group.add_argument(
        "--profile-warmup",
        type=int,
        default=3,
        metavar="W",
        help="training steps run before the traced ones (default: 3)",
    )
    group.add_argument(
        "--profile-plugins",
        action="store_true",
        help="time each plugin's hooks during fit and print a table (on with --profile; "
        "default: off)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    for option, value in (
        ("--profile", options.profile),
        ("--profile-warmup", options.profile_warmup),
    ):
        if value < 0:
            raise UsageError(f"{option} {value}: give a number of steps, 0 or more")
    if not config.is_main_process or not (options.profile or options.profile_plugins):
        return
    profiler = Profiler(
        config.run_dir / FOLDER, steps=options.profile, warmup=options.profile_warmup
    )
    config.plugin_manager.register(profiler, "profiler.run")


class Profiler:
    """Times every plugin's hooks during ``fit`` and, with ``steps``, traces training steps.

    The plugin table: each hook implementation of the other plugins is timed while
    ``fit`` runs (its own time, without the hooks it calls in turn), and at the end a
    table of time per plugin and hook is printed and written to ``plugins.txt`` and
    ``plugins.json``. The core's own steps (forward, backward, ...) are the loop's
    work, not a plugin's: they are not in it.

    The trace: with ``steps`` above 0, ``torch.profiler`` records ``steps`` training
    steps once ``warmup`` steps have run, writes a Chrome trace (``trace.json``, with a
    range for each plugin hook called), torch's table of operators
    (``operators.txt``), and prints the operators with the most self time.

    Args:
        folder: where the files go (default: ``profile/`` in ``learner.run_dir``).
        steps: training steps to trace with torch.profiler (0: none).
        warmup: training steps run before the traced ones.
        top: operators in the printed table.
        stream: where the tables go (default: standard output).

    Attributes:
        plugin_times: ``{(plugin, hook): [calls, seconds]}`` of the last ``fit``;
            ``epochs`` and ``fit_seconds``: its epochs and wall time.
        operators: ``(name, calls, self seconds, self fraction)`` rows of the trace,
            most self time first (device time on a GPU).
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        steps: int = 0,
        warmup: int = 3,
        top: int = TOP,
        stream: TextIO | None = None,
    ) -> None:
        if steps < 0 or warmup < 0:
            raise ValueError(f"Profiler(steps={steps}, warmup={warmup}): use 0 or more")
        self.folder = Path(folder) if folder is not None else None
        self.steps = steps
        self.warmup = warmup
        self.top = top
        self.stream = stream
        self.plugin_times: dict[tuple[str, str], list[float]] = {}
        self.operators: list[tuple[str, int, float, float]] = []
        self._timer: _HookTimer | None = None
        self._trace: _TraceSteps | None = None
        self.epochs = 0
        self.fit_seconds = 0.0
        self._started = 0.0

    @hookimpl(wrapper=True, tryfirst=True)  # the outermost: it times every other on_fit_begin
    def on_fit_begin(self, learner: Learner) -> Iterator[None]:
        if self.folder is None:
            if learner.run_dir is None:
                raise ValueError("Profiler needs a folder or a learner with run_dir")
            self.folder = learner.run_dir / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.epochs = 0
        self._started = time.perf_counter()
        self._timer = _HookTimer(learner.plugin_manager, skip=self._own)
        if self.steps:
            self._trace = _TraceSteps(self, learner)
            learner.add_plugin(self._trace, "profiler.steps")
        return (yield)

    def on_epoch_end(self) -> None:
        self.epochs += 1

    @hookimpl(wrapper=True, tryfirst=True)  # the outermost: it times every other on_fit_end
    def on_fit_end(self, learner: Learner) -> Iterator[None]:
        try:
            return (yield)
        finally:
            self._finish(learner)

    def _finish(self, learner: Learner) -> None:
        self.fit_seconds = time.perf_counter() - self._started
        if self._trace is not None:
            self._trace.close(learner)
            self._report_trace(self._trace)
            self._trace = None
        if self._timer is not None:
            self.plugin_times = self._timer.detach()
            self._timer = None
            self._write_plugin_table()

    def _own(self, plugin: Any) -> bool:
        return plugin is self or plugin is self._trace

    # --- the trace ---------------------------------------------------------------------

    def _trace_ready(self, profiler: torch.profiler.profile, device_type: str) -> None:
        profiler.export_chrome_trace(str(self.folder / TRACE_NAME))
        averages = profiler.key_averages()
        time_of = _device_time if device_type != "cpu" else _cpu_time
        operators = [event for event in averages if not event.is_user_annotation]
        total = sum(time_of(event) for event in operators) or 1.0
        operators.sort(key=time_of, reverse=True)
        self.operators = [
            (event.key, event.count, time_of(event) / 1e6, time_of(event) / total)
            for event in operators
        ]
        sort_by = "self_device_time_total" if device_type != "cpu" else "self_cpu_time_total"
        (self.folder / OPERATORS_NAME).write_text(averages.table(sort_by=sort_by) + "\n")

    def _report_trace(self, trace: _TraceSteps) -> None:
        traced = min(max(trace.done - self.warmup, 0), self.steps)
        if not trace.ready or not traced:
            print(
                f"trainloop: warning: --profile: fit ended after {trace.done} training steps, "
                f"before the traced ones (after {self.warmup} warm-up steps): nothing traced; "
                "give fewer --profile-warmup steps or more epochs",
                file=sys.stderr,
                flush=True,
            )
            return
        where = "device" if trace.device_type != "cpu" else "CPU"
        shown = self.operators[: self.top]
        width = min(max([len(name) for name, *_ in shown] + [8]), 60)
        lines = [
            f"profile: {traced} training steps after {self.warmup} warm-up steps, traced in "
            f"{self.folder / TRACE_NAME} (open it in https://ui.perfetto.dev)",
            f"{'operator':<{width}}  {'calls':>7}  {'self ' + where + ' ms':>12}  {'share':>6}",
        ]
        for name, calls, seconds, share in shown:
            lines.append(
                f"{name[:width]:<{width}}  {calls:>7}  {seconds * 1e3:>12.3f}  {share:>6.1%}"
            )
        self._print("\n".join(lines))

    # --- the plugin table --------------------------------------------------------------

    def plugin_table(self) -> str:
        """The last ``fit``'s time per plugin and hook, as text: a line per hook, the
        plugins with the most time first."""
        epochs = max(self.epochs, 1)
        by_plugin: dict[str, float] = {}
        for (plugin, _), (_, seconds) in self.plugin_times.items():
            by_plugin[plugin] = by_plugin.get(plugin, 0.0) + seconds
        total = sum(by_plugin.values())
        fit_seconds = self.fit_seconds or float("inf")
        width = max([len(plugin) for plugin in by_plugin] + [6])
        lines = [
            f"plugin hooks: {total * 1e3:.1f} ms in {self.epochs} epoch(s), "
            f"{total / fit_seconds:.1%} of fit's {self.fit_seconds:.2f} s",
            f"{'plugin':<{width}}  {'hook':<22}  {'calls':>7}  {'total ms':>9}  "
            f"{'ms/epoch':>9}  {'share':>6}",
        ]
        for plugin in sorted(by_plugin, key=by_plugin.__getitem__, reverse=True):
            hooks = sorted(
                (
                    (hook, *value)
                    for (name, hook), value in self.plugin_times.items()
                    if name == plugin
                ),
                key=lambda row: row[2],
                reverse=True,
            )
            for index, (hook, calls, seconds) in enumerate(hooks):
                lines.append(
                    f"{plugin if index == 0 else '':<{width}}  {hook:<22}  {int(calls):>7}  "
                    f"{seconds * 1e3:>9.3f}  {seconds * 1e3 / epochs:>9.3f}  "
                    f"{seconds / fit_seconds:>6.1%}"
                )
        return "\n".join(lines)

    def _write_plugin_table(self) -> None:
        table = self.plugin_table()
        (self.folder / PLUGINS_NAME).write_text(table + "\n")
        document = {
            "epochs": self.epochs,
            "fit_seconds": self.fit_seconds,
            "hooks": [
                {"plugin": plugin, "hook": hook, "calls": int(calls), "seconds": seconds}
                for (plugin, hook), (calls, seconds) in self.plugin_times.items()
            ],
        }
        (self.folder / PLUGINS_JSON_NAME).write_text(json.dumps(document, indent=1) + "\n")
        self._print(table)

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)


class _TraceSteps:
    """Steps torch.profiler at each training batch's end until its steps are traced."""

    def __init__(self, owner: Profiler, learner: Learner) -> None:
        self.owner = owner
        self.device_type = learner.context.device_type
        self.done = 0
        self.ready = False
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device_type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        warmup = min(owner.warmup, 1)  # torch's own warm-up: recording, results dropped
        with warnings.catch_warnings():  # --profile-warmup 0 is a choice, not a mistake
            warnings.filterwarnings("ignore", message=".*warmup.*")
            schedule = torch.profiler.schedule(
                wait=owner.warmup - warmup, warmup=warmup, active=owner.steps, repeat=1
            )
        self.profiler = torch.profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=self._ready
        )
        self.profiler.start()

    def on_batch_end(self, learner: Learner) -> None:
        if not learner.training:
            return
        self.done += 1
        self.profiler.step()
        # Plugin hooks get a range of their own in the trace while it records.
        self.owner._timer.label = self.profiler.current_action != ProfilerAction.NONE
        if self.ready:  # every step traced: no per-batch hook from here on
            self.close(learner)

    def _ready(self, profiler: torch.profiler.profile) -> None:
        self.ready = True
        self.owner._trace_ready(profiler, self.device_type)

    def close(self, learner: Learner) -> None:
        """Stop the profiler (which writes the trace if steps were being traced)."""
        if self.profiler is not None:
            profiler, self.profiler = self.profiler, None
            profiler.stop()
        if self.owner._timer is not None:
            self.owner._timer.label = False
        if learner.plugin_manager.is_registered(self):
            learner.plugin_manager.unregister(self)


def _cpu_time(event: Any) -> float:
    return event.self_cpu_time_total


def _device_time(event: Any) -> float:
    return event.self_device_time_total


class _HookTimer:
    """Times every hook implementation of ``manager`` until :meth:`detach`.

    Each implementation's function is replaced by a :class:`_Timed` call of it (plugins
    registered later too, through the manager's listener) and put back by ``detach``.
    Times are each implementation's own: a hook called from inside another plugin's hook
    counts for its own plugin, not for both.
    """

    def __init__(self, manager: PluginManager, skip: Callable[[Any], bool]) -> None:
        self.manager = manager
        self.skip = skip
        self.label = False  # give each call a range in the torch.profiler trace
        self.times: dict[tuple[str, str], list[float]] = {}
        self.nested: list[float] = []  # time of the hooks called inside the running ones
        self._wrapped: list[tuple[pluggy.HookImpl, Any]] = []
        self._active = True
        self._wrap_new()
        manager.add_listener(self._wrap_new)

    def _wrap_new(self) -> None:
        if not self._active:
            return
        for caller in vars(self.manager.hook).values():
            if not isinstance(caller, pluggy.HookCaller):
                continue
            for impl in caller.get_hookimpls():
                if isinstance(impl.function, _Timed) or self.skip(impl.plugin):
                    continue
                if self.manager.origins.get(impl.plugin_name) == "core":
                    continue  # the loop's own steps: not a plugin's time
                key = (impl.plugin_name, caller.name)
                self.times.setdefault(key, [0, 0.0])
                timed_class = _TimedWrapper if impl.wrapper or impl.hookwrapper else _Timed
                self._wrapped.append((impl, impl.function))
                impl.function = timed_class(impl.function, self, key)  # type: ignore[misc]

    def record(self, key: tuple[str, str], start: float, segment: bool = False) -> None:
        elapsed = time.perf_counter() - start
        inner = self.nested.pop()
        totals = self.times[key]
        totals[0] += 0 if segment else 1
        totals[1] += elapsed - inner
        if self.nested:
            self.nested[-1] += elapsed

    def detach(self) -> dict[tuple[str, str], list[float]]:
        """Put every function back; return ``{(plugin, hook): [calls, seconds]}``."""
        self._active = False
        for impl, function in self._wrapped:
            impl.function = function  # type: ignore[misc]
        self._wrapped = []
        return {key: value for key, value in self.times.items() if value[0]}


class _Timed:
    """A hook implementation's function, timed for :class:`_HookTimer`."""

    __slots__ = ("function", "timer", "key", "name")

    def __init__(self, function: Callable[..., Any], timer: _HookTimer, key: tuple[str, str]):
        self.function = function
        self.timer = timer
        self.key = key
        self.name = f"{key[0]}.{key[1]}"

    @property
    def __code__(self) -> Any:
        # The manager names the plugin that raised an error from its functions' code.
        return self.function.__code__

    def __call__(self, *args: Any) -> Any:
        if not self.timer.label:
            return self._timed(args)
        with torch.profiler.record_function(self.name):  # a range in the trace
            return self._timed(args)

    def _timed(self, args: tuple[Any, ...]) -> Any:
        timer = self.timer
        timer.nested.append(0.0)
        start = time.perf_counter()
        try:
            return self.function(*args)
        finally:
            timer.record(self.key, start)


class _TimedWrapper(_Timed):
    """A wrapper implementation (a generator): its code before and after ``yield`` is
    timed, not the implementations it wraps."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        return self._segments(self.function(*args))

    def _segments(self, inner: Any) -> Any:
        timer = self.timer
        sent: Any = None
        error: BaseException | None = None
        first = True
        while True:
            timer.nested.append(0.0)
            start = time.perf_counter()
            try:
                value = inner.throw(error) if error is not None else inner.send(sent)
            except StopIteration as stop:
                return stop.value
            finally:
                timer.record(self.key, start, segment=not first)
                first = False
            error = sent = None
            try:
                sent = yield value
            except GeneratorExit:
                inner.close()
                raise
            except BaseException as thrown:  # the wrapped implementations raised it
                error = thrown
