"""check-resume: kill a run with SIGKILL, resume it, compare it bit for bit with one never stopped."""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainloop.errors import Stopped, UsageError
from trainloop.hookspecs import hookimpl
from trainloop.state import capture_rng_state

__all__ = [
    "KillResult",
    "ResumeProbe",
    "ResumeReport",
    "check_resume",
    "fingerprint",
    "main",
    "timing_metrics",
]

PROBE_SPEC = "trainloop.check_resume:ResumeProbe"
"""How the runs of a check load :class:`ResumeProbe` (``-p``)."""
ENVIRONMENT = "TRAINLOOP_CHECK_RESUME"
"""The environment variable that tells a run's probe where to record, kill and stop."""
TAIL = 5
"""By default a check trains one epoch and this many batches of the next (fewer if the
epoch is shorter), so that it crosses an epoch end."""
CHECKPOINT_PARTS = ("model", "optimizer", "learner", "rng", "epoch_rng")
"""A checkpoint's core parts; its other keys are plugins' states or the run's settings."""
SETTINGS_PARTS = ("format", "version", "config", "options", "world_size", "train_batches")
RECIPE_DOCS = "docs/writing-a-recipe.md#random-numbers-and-exact-resumes"
PLUGIN_DOCS = "docs/plugins/checkpoint.md#checkpointing-your-own-plugins-state"
CHECK_DOCS = "docs/plugins/checkpoint.md#checking-that-a-resume-is-exact"
_RUN_FOLDER_OPTIONS = ("--out", "--resume", "--overwrite")


# --- the report ------------------------------------------------------------------------


@dataclasses.dataclass
class KillResult:
    """What one kill and its resume gave, compared with the run never stopped.

    Attributes:
        number: the kill's number, from 1.
        kill_step: the training batch (counted from 1) at whose end the run was killed,
            after the optimizer step and before that batch's checkpoint was written.
        resumed_from: the steps done at the checkpoint the resume continued from.
        identical: whether every per-step record and the final state are the same.
        seconds: how long the killed run and its resume took.
        first_difference: where the resumed run first differed, in words.
        first_batch_step: the first step whose batch differs (its fingerprint).
        first_loss_step: the first step whose loss differs.
        first_loss: that step's loss in the resumed run and in the run never stopped.
        differences: what differs at the end, one part per item (parameter names,
            optimizer slots, a plugin's state, RNG states, ``metrics.jsonl`` lines).
        culprit: the likely cause, in one line.
        warnings: the warnings the resumed run printed (``resume may not be exact: ...``).
        error: the error that ended the killed run or the resume, if one did.
    """

    number: int
    kill_step: int
    resumed_from: int | None = None
    identical: bool = False
    seconds: float = 0.0
    first_difference: str | None = None
    first_batch_step: int | None = None
    first_loss_step: int | None = None
    first_loss: tuple[float | None, float | None] | None = None
    differences: list[str] = dataclasses.field(default_factory=list)
    culprit: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None

    def row(self) -> str:
        """This kill's line of the report's table."""
        resumed = "-" if self.resumed_from is None else str(self.resumed_from)
        result = "identical" if self.identical else "failed" if self.error else "differs"
        return f"{self.number:>4}  {self.kill_step:>14}  {resumed:>17}  {result}"

    def diagnosis(self) -> list[str]:
        """The lines that say where and how this kill's resume differs (none if identical)."""
        if self.identical:
            return []
        lines = [f"kill {self.number}: killed at step {self.kill_step}" + _resumed(self)]
        if self.error:
            lines.append(f"  error: {self.error}")
        if self.first_difference:
            lines.append(f"  first difference: {self.first_difference}")
        if self.first_batch_step is not None:
            lines.append(f"  first different batch: step {self.first_batch_step}")
        if self.first_loss_step is not None and self.first_loss is not None:
            here, there = (_number(loss) for loss in self.first_loss)
            lines.append(
                f"  first different loss: step {self.first_loss_step} ({here} resumed, "
                f"{there} uninterrupted)"
            )
        if self.differences:
            lines.append("  at the end: " + "; ".join(self.differences))
        lines.extend(f"  the resume warned: {warning}" for warning in self.warnings)
        if self.culprit:
            lines.append(f"  likely culprit: {self.culprit}")
        return lines


@dataclasses.dataclass
class ResumeReport:
    """The result of :func:`check_resume`: the run never stopped, and each kill.

    ``report.identical`` is the verdict; ``report.format()`` is the text that
    ``trainloop check-resume`` prints.

    Attributes:
        recipe: the recipe file, or ``module:function`` of a Learner factory.
        options: the recipe options every run was given.
        steps: the training batches of the checked stretch.
        batches_per_epoch: the batches of the first epoch, if it ended within the stretch.
        epoch_ends: how many epoch ends the stretch crosses.
        checkpoint_every: the runs wrote a checkpoint every this many batches.
        kill_seed: the seed the kill points were drawn with.
        kill_steps: the steps drawn to kill at, in order.
        ignored_metrics: the run's metrics left out of the comparisons (timings).
        reference_seconds: how long the run never stopped took.
        seconds: how long the whole check took.
        kills: one :class:`KillResult` per kill, in the order of their steps.
    """

    recipe: str
    options: list[str]
    steps: int
    batches_per_epoch: int | None
    epoch_ends: int
    checkpoint_every: int
    kill_seed: int
    kill_steps: list[int]
    reference_seconds: float
    ignored_metrics: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    kills: list[KillResult] = dataclasses.field(default_factory=list)

    @property
    def identical(self) -> bool:
        """Whether every kill's resume ended bit-identical to the run never stopped."""
        return bool(self.kills) and all(kill.identical for kill in self.kills)

    def header(self) -> list[str]:
        """The lines printed before the kills: what is checked, and the table's head."""
        every = (
            "every batch"
            if self.checkpoint_every == 1
            else f"every {self.checkpoint_every} batches"
        )
        if self.batches_per_epoch is None:
            epochs = "within the first epoch"
        else:
            ends = _count(self.epoch_ends, "epoch end")
            epochs = f"{ends}, epochs of {_count(self.batches_per_epoch, 'batch')}"
        lines = [
            f"check-resume {self.recipe}: {self.steps} steps ({epochs}), a checkpoint {every}",
            f"uninterrupted: {self.steps} steps in {self.reference_seconds:.1f}s; "
            f"{_count(len(self.kill_steps), 'kill')} (--kill-seed {self.kill_seed}), each "
            "resumed with --resume",
            "kill  killed at step  resumed from step  result",
        ]
        if self.ignored_metrics:  # before the table's head
            lines.insert(2, f"not compared (timings): {', '.join(self.ignored_metrics)}")
        return lines

    def footer(self) -> list[str]:
        """The lines printed after the kills: each differing kill's diagnosis, the verdict."""
        lines = [line for kill in self.kills for line in kill.diagnosis()]
        total = len(self.kills)
        if self.identical:
            lines.append(
                f"resume is exact: {total} of {total} kills identical (parameters and buffers, "
                f"optimizer, plugin states, RNG states, per-step losses and batches, "
                f"metrics.jsonl) in {self.seconds:.1f}s"
            )
        else:
            bad = sum(not kill.identical for kill in self.kills)
            lines.append(f"resume is not exact: {bad} of {total} kills differ ({CHECK_DOCS})")
        return lines

    def format(self) -> str:
        """The whole report as ``trainloop check-resume`` prints it."""
        lines = self.header() + [kill.row() for kill in self.kills] + self.footer()
        return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("ch") else "s")
    return f"{number} {noun if number == 1 else plural}"


def _resumed(kill: KillResult) -> str:
    return "" if kill.resumed_from is None else f", resumed from step {kill.resumed_from}"


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.8g}"


# --- the check -------------------------------------------------------------------------


def check_resume(
    recipe: str | Path | Callable[[], Any],
    options: Sequence[str] = (),
    *,
    kills: int = 3,
    steps: int | None = None,
    kill_seed: int = 0,
    checkpoint_every: int = 1,
    compare_files: Sequence[str] = (),
    ignore_metrics: Sequence[str] = (),
    jobs: int = 1,
    work_dir: str | Path | None = None,
    timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
) -> ResumeReport:
    """Run a recipe once uninterrupted, then ``kills`` times killed and resumed; compare.

    Every run is a real ``python -m trainloop run RECIPE OPTIONS --out DIR
    --checkpoint-every N`` subprocess with :class:`ResumeProbe` loaded, which records
    each training batch's fingerprint, the RNG states before it and its loss, and a
    fingerprint of every part of every checkpoint. A killed run is stopped with
    SIGKILL at the end of a training batch drawn with ``kill_seed`` (after the
    optimizer step, before that batch's checkpoint), then resumed with ``--resume``.
    Each resumed run must end with the same model parameters and buffers, optimizer
    state, plugin states, RNG states and ``metrics.jsonl`` as the run never stopped,
    bit for bit, and go through the same batches and losses.

    Example::

        report = check_resume("recipes/single_node.py", ["--epochs", "2"], kills=2)
        assert report.identical, report.format()

    Args:
        recipe: a recipe file, or a Learner factory: a function without arguments
            defined at the top level of an importable module (the runs import it by
            name), which returns the Learner to fit.
        options: the recipe's options, as on the command line (``--epochs 2``, ``-p NAME``).
        kills: how many killed-and-resumed runs (each from a fresh start).
        steps: train this many batches; by default one epoch and up to 5 batches of
            the next. A run that ends sooner ends where it ends.
        kill_seed: the seed of the kill points: the same seed, the same kills. The first
            kill falls after the first epoch's end when the stretch has one.
        checkpoint_every: the runs write ``last.pt`` every this many batches.
        compare_files: files of the run folder to compare too (``metrics.csv``); a
            ``.jsonl`` or ``.csv`` file without the metrics left out.
        ignore_metrics: metrics to leave out of every comparison, besides the timings
            of ``timing_metrics()`` (a timing that a plugin of yours reports).
        jobs: how many killed runs go on at a time.
        work_dir: where the run folders go (kept); default a temporary folder, removed.
        timeout: seconds after which a run counts as hung (default: no limit).
        echo: called with each line of the report as soon as it is known.

    Returns:
        The :class:`ResumeReport`; ``report.identical`` is the verdict.

    Raises:
        UsageError: bad input: ``kills`` below 1, an option that chooses the run
            folder (``--out``, ``--resume``, ``--overwrite``), a recipe that fails on
            its own (its error), or a run too short to kill (fewer than two
            checkpointed batches).
    """
    started = time.monotonic()
    if isinstance(options, str):
        raise TypeError("check_resume(options=...): give a list of words, not one string")
    _check_arguments(kills, steps, checkpoint_every, jobs, options)
    work, temporary = _work_folder(work_dir)
    try:
        if callable(recipe):
            recipe_path, name = _factory_recipe(recipe, work), _factory_name(recipe)
        else:
            recipe_path = name = str(recipe)
            if not Path(recipe_path).is_file():
                raise UsageError(f"recipe {recipe_path} does not exist: give a recipe .py file")
        ignored = {*timing_metrics(), *ignore_metrics}
        runner = _Runner(
            recipe_path, list(options), checkpoint_every, work, timeout, compare_files, ignored
        )
        reference = runner.reference(steps, name)
        points = _kill_points(reference, kills, kill_seed, name, checkpoint_every)
        report = ResumeReport(
            recipe=name,
            options=list(options),
            steps=reference.steps,
            batches_per_epoch=reference.batches_per_epoch,
            epoch_ends=reference.epoch_ends,
            checkpoint_every=checkpoint_every,
            kill_seed=kill_seed,
            kill_steps=points,
            reference_seconds=reference.seconds,
            ignored_metrics=sorted(ignored & reference.metric_names),
        )
        say = echo or (lambda line: None)
        for line in report.header():
            say(line)
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            results = pool.map(
                lambda numbered: runner.kill_and_resume(*numbered, reference),
                enumerate(points, start=1),
            )
            try:
                for result in results:
                    report.kills.append(result)
                    say(result.row())
            except BaseException:
                runner.cancel()
                raise
        report.seconds = time.monotonic() - started
        for line in report.footer():
            say(line)
        return report
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def _check_arguments(
    kills: int, steps: int | None, every: int, jobs: int, options: Sequence[str]
) -> None:
    if kills < 1:
        raise UsageError(f"--kills {kills}: give 1 or more kills")
    if steps is not None and steps < 2:
        raise UsageError(f"--steps {steps}: give 2 or more (a kill needs a checkpoint before it)")
    if every < 1:
        raise UsageError(f"--checkpoint-every {every}: give 1 or more batches")
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: give 1 or more")
    for option in options:
        name = option.split("=", 1)[0]
        if name == "--checkpoint-every":
            raise UsageError(
                f"{name} in the recipe options: give it as the check's own "
                "(checkpoint_every=N); the check passes it to every run"
            )
        if name in _RUN_FOLDER_OPTIONS:
            raise UsageError(
                f"{name}: check-resume chooses the run folders and resumes itself; drop it "
                "(--work-dir DIR keeps the run folders)"
            )


def timing_metrics() -> tuple[str, ...]:
    """The metrics that time a run (the throughput plugin's): they differ between any two
    runs, resumed or not, so a check leaves them out."""
    try:
        from trainloop.plugins.throughput import DATA_WAIT, SAMPLES_PER_SECOND
    except ImportError:  # the plugin is not there
        return ()
    return (SAMPLES_PER_SECOND, DATA_WAIT)


def _work_folder(work_dir: str | Path | None) -> tuple[Path, bool]:
    if work_dir is None:
        return Path(tempfile.mkdtemp(prefix="trainloop-check-resume-")), True
    work = Path(work_dir)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise UsageError(f"--work-dir {work}: not an empty folder; give a new or empty one")
    work.mkdir(parents=True, exist_ok=True)
    return work, False


def _factory_name(factory: Callable[[], Any]) -> str:
    return f"{factory.__module__}:{factory.__qualname__}"


def _factory_recipe(factory: Callable[[], Any], work: Path) -> str:
    """Write a recipe whose ``build`` calls ``factory``, found by its module and name."""
    module, qualname = factory.__module__, getattr(factory, "__qualname__", "")
    if not qualname or "<" in qualname:
        raise UsageError(
            f"Learner factory {qualname or factory!r}: define it at the top level of a module "
            "(the runs import it by name; a lambda or a nested function cannot be)"
        )
    source = f"import importlib\nmodule = importlib.import_module({module!r})\n"
    if module == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if main_file is None:
            raise UsageError(
                f"Learner factory {qualname}: defined in an interactive session; define it "
                "in a module the runs can import"
            )
        source = (
            "import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('check_resume_factory', {main_file!r})\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
        )
    path = work / "learner_factory.py"
    path.write_text(
        f'"""The Learner of {module}:{qualname}, as a recipe (written by check-resume)."""\n\n'
        "from dataclasses import dataclass\n\n"
        f"{source}\n\n"
        "@dataclass\nclass Config:\n    pass\n\n\n"
        "def build(cfg):\n"
        "    factory = module\n"
        f"    for name in {qualname.split('.')!r}:\n"
        "        factory = getattr(factory, name)\n"
        "    return factory()\n"
    )
    return str(path)


def _kill_points(reference: _Records, kills: int, seed: int, recipe: str, every: int) -> list[int]:
    """The steps to kill at, drawn with ``seed``: each has a checkpoint before it."""
    batch_saves = sorted({step for (_, iteration, step) in reference.saves if iteration})
    if len(batch_saves) < 2:
        if reference.steps >= 2 and not reference.saves:
            raise UsageError(
                f"{recipe} wrote no checkpoint: check-resume needs the checkpoint plugin "
                "(drop -p no:checkpoint)"
            )
        raise UsageError(
            f"{recipe} trains {_count(reference.steps, 'step')} and checkpoints "
            f"{len(batch_saves)} of them: a kill needs at least 2 checkpointed steps; raise --epochs, --steps or "
            f"the data, or lower --checkpoint-every ({every})"
        )
    first_save = min(step for (_, _, step) in reference.saves)
    candidates = [step for step in range(first_save + 1, reference.steps + 1)]
    draw = random.Random(seed)
    after_epoch = [step for step in candidates if reference.epoch_of(step) >= 1]
    chosen: list[int] = []
    if after_epoch:  # state kept across epochs shows only after an epoch end
        chosen.append(draw.choice(after_epoch))
    rest = [step for step in candidates if step not in chosen]
    while len(chosen) < kills:
        if not rest:
            rest = list(candidates)
        chosen.append(rest.pop(draw.randrange(len(rest))))
    return sorted(chosen[:kills])


# --- running -----------------------------------------------------------------------------


class _Finished:
    def __init__(self, returncode: int, seconds: float, stderr: str) -> None:
        self.returncode = returncode
        self.seconds = seconds
        self.stderr = stderr

    def error(self) -> str:
        """The run's error line (``trainloop: error: ...`` without the prefix)."""
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        for line in reversed(lines):
            if line.startswith("trainloop: error: "):
                return line.removeprefix("trainloop: error: ")
        if self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        return lines[-1] if lines else f"exit status {self.returncode}"

    def warnings(self) -> list[str]:
        prefix = "trainloop: warning: "
        return [line[len(prefix) :] for line in self.stderr.splitlines() if line.startswith(prefix)]


class _Runner:
    """Starts the runs of one check and compares them."""

    def __init__(
        self,
        recipe: str,
        options: list[str],
        every: int,
        work: Path,
        timeout: float | None,
        compare_files: Sequence[str],
        ignored: Collection[str],
    ) -> None:
        self.recipe = recipe
        self.options = options
        self.every = every
        self.work = work
        self.timeout = timeout
        self.compare_files = list(compare_files)
        self.ignored = sorted(ignored)
        self.stop_at: int | None = None
        self.live: set[subprocess.Popen] = set()  # the runs going on, to stop on Ctrl-C
        self.lock = threading.Lock()
        self.cancelled = False

    def command(self, out: Path, resume: bool = False) -> list[str]:
        command = [sys.executable, "-m", "trainloop", "run", self.recipe, *self.options]
        command += ["--out", str(out), "--checkpoint-every", str(self.every), "-p", PROBE_SPEC]
        return command + (["--resume"] if resume else [])

    def run(
        self, name: str, out: Path, settings: dict[str, Any], resume: bool = False
    ) -> _Finished:
        settings = {**settings, "ignore": self.ignored}
        environment = {**os.environ, ENVIRONMENT: json.dumps(settings)}
        environment["PYTHONPATH"] = _python_path(environment.get("PYTHONPATH"))
        started = time.monotonic()
        log = self.work / name
        with open(f"{log}.out", "wb") as stdout, open(f"{log}.err", "wb") as stderr:
            with self.lock:
                if self.cancelled:
                    raise RuntimeError("check-resume was stopped")
                # A session of its own: the DataLoader workers of a killed run go with it.
                process = subprocess.Popen(
                    self.command(out, resume),
                    stdout=stdout,
                    stderr=stderr,
                    env=environment,
                    start_new_session=True,
                )
                self.live.add(process)
            try:
                returncode = process.wait(self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                raise UsageError(
                    f"{self.recipe}: the run in {out} took more than {self.timeout:g}s; it is "
                    f"hung, or give more time (its output: {log}.out, {log}.err)"
                ) from None
            except BaseException:
                _kill_group(process)
                raise
            finally:
                with self.lock:
                    self.live.discard(process)
            if returncode < 0:  # killed: its DataLoader workers may still be there
                _kill_group(process)
        return _Finished(returncode, time.monotonic() - started, Path(f"{log}.err").read_text())

    def cancel(self) -> None:
        """Stop every run now (Ctrl-C), and start no other."""
        with self.lock:
            self.cancelled = True
            for process in self.live:
                _kill_group(process)

    def reference(self, steps: int | None, name: str) -> _Records:
        out = self.work / "uninterrupted"
        records = self.work / "uninterrupted.records.jsonl"
        settings = {"records": str(records), "stop_at": steps, "tail": None if steps else TAIL}
        finished = self.run("uninterrupted", out, settings)
        if finished.returncode != 0:
            raise UsageError(
                f"{name} fails on its own, before any kill (exit status {finished.returncode}): "
                f"{finished.error()}"
            )
        segments = _read_records(records)
        if len(segments) != 1 or segments[0].end is None:
            raise UsageError(f"{name}: the run never stopped left no records of its batches")
        reference = segments[0]
        reference.seconds = finished.seconds
        reference.out = out
        if reference.end.get("stopped"):  # the killed runs stop at the same batch
            self.stop_at = reference.steps
        return reference

    def kill_and_resume(self, number: int, kill_step: int, reference: _Records) -> KillResult:
        result = KillResult(number=number, kill_step=kill_step)
        name = f"kill-{number}"
        out = self.work / name
        settings = {"records": str(self.work / f"{name}.records.jsonl"), "stop_at": self.stop_at}
        killed = self.run(name, out, {**settings, "kill_at": kill_step})
        result.seconds = killed.seconds
        if killed.returncode != -signal.SIGKILL:
            result.error = (
                f"the run to be killed ended first ({killed.error()})"
                if killed.returncode
                else f"the run to be killed ended before its step {kill_step}"
            )
            result.culprit = "the run is not reproducible: it does not repeat the run never stopped"
            return result
        resumed = self.run(f"{name}.resume", out, settings, resume=True)
        result.seconds += resumed.seconds
        result.warnings = resumed.warnings()
        segments = _read_records(Path(settings["records"]))
        if len(segments) > 1:
            result.resumed_from = segments[1].start_step
        if resumed.returncode != 0:
            result.error = (
                f"the resume failed (exit status {resumed.returncode}): {resumed.error()}"
            )
            result.culprit = f"the resume itself fails: {resumed.error()}"
            return result
        _compare(result, reference, segments, reference.out, out, self.compare_files, self.ignored)
        return result


def _python_path(existing: str | None) -> str:
    """This process's ``sys.path`` entries a fresh interpreter would not have, then ``existing``.

    A Learner factory, or a plugin given with ``-p module``, imports in the runs as it
    does here (pytest and ``monkeypatch.syspath_prepend`` add folders to ``sys.path``).
    """
    prefixes = {Path(prefix).resolve() for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    entries = []
    for entry in sys.path:
        path = Path(entry or os.getcwd()).resolve()
        if any(path == prefix or prefix in path.parents for prefix in prefixes):
            continue
        if str(path) not in entries:
            entries.append(str(path))
    if existing:
        entries.append(existing)
    return os.pathsep.join(entries)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the run and its workers are gone already
    process.wait()


# --- the records -------------------------------------------------------------------------


@dataclasses.dataclass
class _Records:
    """What a probe recorded in one process: from ``fit``'s start to its end or the kill."""

    start: dict[str, Any]
    batches: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    saves: dict[tuple[int, int, int], dict[str, str]] = dataclasses.field(default_factory=dict)
    end: dict[str, Any] | None = None
    seconds: float = 0.0
    out: Path | None = None

    @property
    def start_step(self) -> int:
        return int(self.start["step"])

    @property
    def steps(self) -> int:
        return max(self.batches, default=self.start_step)

    @property
    def metric_names(self) -> set[str]:
        return set((self.end or {}).get("metrics") or ())

    @property
    def epoch_ends(self) -> int:
        return sum(1 for (_, iteration, _) in self.saves if iteration == 0)

    @property
    def batches_per_epoch(self) -> int | None:
        ends = sorted(step for (_, iteration, step) in self.saves if iteration == 0)
        return ends[0] if ends else None

    def epoch_of(self, step: int) -> int:
        return int(self.batches[step]["epoch"]) if step in self.batches else 0


def _read_records(path: Path) -> list[_Records]:
    """The segments of a records file, one per process that wrote it."""
    segments: list[_Records] = []
    if not path.exists():
        return segments
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        event = record.pop("event", None)
        if event == "start":
            segments.append(_Records(start=record))
        elif not segments:
            continue
        elif event == "batch":
            segments[-1].batches[int(record["step"])] = record
        elif event == "save":
            key = (int(record["epoch"]), int(record["iteration"]), int(record["step"]))
            segments[-1].saves[key] = record["parts"]
        elif event == "end":
            segments[-1].end = record
    return segments


# --- comparing ---------------------------------------------------------------------------


def _events(records: _Records, after: int = 0) -> Iterator[tuple[tuple[int, int], str, Any]]:
    """``((step, phase), what, value)`` in the order they happened, for steps after ``after``."""
    for step, batch in records.batches.items():
        if step > after:
            yield (step, 0), "batch", batch.get("batch")
            for generator, state in (batch.get("rng") or {}).items():
                yield (step, 1), f"rng:{generator}", state
            yield (step, 2), "loss", batch.get("loss")
    for (_, iteration, step), parts in records.saves.items():
        if step > after:  # a batch's checkpoint, then the epoch end's at the same step
            for part, value in parts.items():
                yield (step, 3 if iteration else 4), f"save:{part}", value


def _first_difference(
    reference: _Records, records: _Records, after: int, prefix: bool = False
) -> tuple[tuple[int, int], list[str]] | None:
    """The first moment where ``records`` differ from ``reference``, and what differs then.

    With ``prefix``, ``records`` stop early (a killed run): only what they hold counts.
    """
    expected = {(when, what): value for when, what, value in _events(reference, after)}
    seen = {(when, what): value for when, what, value in _events(records, after)}
    moments: dict[tuple[int, int], list[str]] = {}
    for key in sorted(set(seen) if prefix else set(expected) | set(seen)):
        if expected.get(key, "missing") != seen.get(key, "missing"):
            moments.setdefault(key[0], []).append(key[1])
    if not moments:
        return None
    first = min(moments)
    return first, moments[first]


def _compare(
    result: KillResult,
    reference: _Records,
    segments: list[_Records],
    reference_out: Path,
    out: Path,
    compare_files: Sequence[str],
    ignored: Collection[str] = (),
) -> None:
    killed, resumed = segments[0], segments[1] if len(segments) > 1 else None
    before = _first_difference(reference, killed, 0, prefix=True)
    if resumed is None:
        result.error = "the resumed run left no records (it failed before fit started)"
        return
    after = _first_difference(reference, resumed, resumed.start_step)
    for step in sorted(resumed.batches):
        mine, theirs = resumed.batches[step], reference.batches.get(step, {})
        if result.first_batch_step is None and mine.get("batch") != theirs.get("batch"):
            result.first_batch_step = step
        if result.first_loss_step is None and mine.get("loss") != theirs.get("loss"):
            result.first_loss_step = step
            result.first_loss = (mine.get("loss"), theirs.get("loss"))
    result.differences = _end_differences(reference_out, out, compare_files, ignored)
    if resumed.steps != reference.steps:
        result.differences.append(
            f"the resumed run stopped after step {resumed.steps}, the uninterrupted one "
            f"after step {reference.steps}"
        )
    moment = before or after
    result.identical = moment is None and not result.differences
    if result.identical:
        return
    if moment is not None:
        (step, _), what = moment
        result.first_difference = _describe_moment(step, what, reference)
    if before is not None:
        result.culprit = (
            f"the run is not reproducible: before its kill it already differs from the run "
            f"never stopped (at step {before[0][0]}); something is not seeded from --seed "
            f"(a generator of its own, the time, a non-deterministic kernel) — see {RECIPE_DOCS}"
        )
    else:
        result.culprit = _culprit(after, reference, resumed, result)


def _describe_moment(step: int, what: list[str], reference: _Records) -> str:
    batch = reference.batches.get(step)
    where = f"step {step}"
    if batch is not None:
        where += f" (epoch {int(batch['epoch']) + 1}, batch {int(batch['iteration']) + 1})"
    names = []
    for item in what:
        if item == "batch":
            names.append("the batch")
        elif item == "loss":
            names.append("the loss")
        elif item.startswith("rng:"):
            names.append(f"the {item[4:]} RNG state before the batch")
        elif item.startswith("save:"):
            names.append(f"the checkpoint's {_part_name(item[5:])}")
    return f"{where}: {', '.join(names)}"


def _part_name(part: str) -> str:
    if part in ("model", "optimizer", "learner"):
        return {"model": "model", "optimizer": "optimizer state", "learner": "learner state"}[part]
    if part in ("rng", "epoch_rng"):
        return "RNG states" if part == "rng" else "epoch-start RNG states"
    if part in SETTINGS_PARTS:
        return f"settings ({part})"
    return f"plugin state {part!r}"


def _culprit(
    moment: tuple[tuple[int, int], list[str]] | None,
    reference: _Records,
    resumed: _Records,
    result: KillResult,
) -> str:
    what = moment[1] if moment is not None else []
    if "batch" in what:
        return (
            "the batches after the resume differ: your sampler or dataset keeps state the "
            f"checkpoint doesn't hold — see {RECIPE_DOCS}"
        )
    generators = [item[4:] for item in what if item.startswith("rng:")]
    if generators:
        return (
            f"the {', '.join(generators)} RNG state differs before a batch that is the same: "
            "something draws random numbers that the checkpoint doesn't restore (code run "
            f"when a run starts, or a generator of its own) — see {RECIPE_DOCS}"
        )
    plugin_parts = [
        item[5:]
        for item in what
        if item.startswith("save:") and item[5:] not in CHECKPOINT_PARTS + SETTINGS_PARTS
    ]
    if plugin_parts:
        return (
            f"the plugin state {plugin_parts[0]!r} in the checkpoint differs after the resume: "
            "the plugin doesn't restore in on_load_checkpoint what on_save_checkpoint saved, or "
            f"keeps more state than it saves — see {PLUGIN_DOCS}"
        )
    hidden = _attribute_differences(reference, resumed)
    if hidden:
        plugin, attributes = next(iter(hidden.items()))
        shown = ", ".join(attributes[:3])
        return (
            f"plugin {plugin!r} keeps state that no checkpoint holds ({shown} at the end): save "
            f"it in on_save_checkpoint and restore it in on_load_checkpoint — see {PLUGIN_DOCS}"
        )
    if moment is None:
        return (
            f"{result.differences[0]}: the file's writer doesn't keep it whole across a resume"
            if result.differences
            else "unknown"
        )
    return (
        "with the same batches and random numbers the training differs after the resume: "
        "the recipe or a plugin keeps state outside the checkpoint (a counter, a cache, a "
        f"schedule of its own) — see {PLUGIN_DOCS}"
    )


def _attribute_differences(reference: _Records, resumed: _Records) -> dict[str, list[str]]:
    """Plugins whose attributes differ at the end: ``{plugin: [attribute or attribute (a vs b)]}``."""
    if reference.end is None or resumed.end is None:
        return {}
    theirs = reference.end.get("attributes") or {}
    mine = resumed.end.get("attributes") or {}
    found: dict[str, list[str]] = {}
    for plugin, attributes in mine.items():
        for attribute, (value, shown) in attributes.items():
            expected = theirs.get(plugin, {}).get(attribute)
            if expected is not None and expected[0] != value:
                both = f" ({shown} resumed, {expected[1]} uninterrupted)" if shown else ""
                found.setdefault(plugin, []).append(attribute + both)
    return found


def _end_differences(
    reference_out: Path, out: Path, compare_files: Sequence[str], ignored: Collection[str]
) -> list[str]:
    """What differs between the two run folders' final checkpoints and files."""
    found = []
    theirs = _load(reference_out / "checkpoints" / "last.pt")
    mine = _load(out / "checkpoints" / "last.pt")
    if theirs is None or mine is None:
        found.append("the final checkpoint is missing")
    else:
        found.extend(_state_differences(mine, theirs, ignored))
    for name in ("metrics.jsonl", *compare_files):
        difference = _file_difference(reference_out / name, out / name, ignored)
        if difference:
            found.append(f"{name}: {difference}")
    return found


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None


def _state_differences(
    mine: dict[str, Any], theirs: dict[str, Any], ignored: Collection[str]
) -> list[str]:
    leaves: dict[str, list[tuple[Any, ...]]] = {}
    for path in _leaf_differences(mine, theirs, ignored):
        leaves.setdefault(str(path[0]), []).append(path[1:])
    found = []
    for part, paths in leaves.items():
        if part == "model":
            found.append(f"parameters and buffers: {_first_names(paths)}")
        elif part == "optimizer":
            found.append(f"optimizer: {_optimizer_slots(paths)}")
        elif part == "learner":
            found.append(f"learner: {_first_names(paths)}")
        elif part in ("rng", "epoch_rng"):
            found.append(f"{_part_name(part)}: {_first_names(paths)}")
        else:
            found.append(f"{_part_name(part)}: {_first_names(paths) or 'all of it'}")
    return found


def _first_names(paths: list[tuple[Any, ...]], shown: int = 4) -> str:
    names = list(dict.fromkeys(".".join(str(key) for key in path[:1]) for path in paths if path))
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _optimizer_slots(paths: list[tuple[Any, ...]]) -> str:
    slots: dict[str, set[Any]] = {}
    settings: list[str] = []
    for path in paths:
        if len(path) >= 3 and path[0] == "state":
            slots.setdefault(str(path[2]), set()).add(path[1])
        elif len(path) >= 3 and path[0] == "param_groups":
            settings.append(f"{path[2]} of group {path[1]}")
        else:
            settings.append(".".join(map(str, path)) or "all of it")
    parts = [f"{slot} of {len(owners)} parameters" for slot, owners in slots.items()]
    return ", ".join(parts + list(dict.fromkeys(settings)))


def _leaf_differences(
    mine: Any, theirs: Any, ignored: Collection[str], path: tuple[Any, ...] = ()
) -> Iterator[tuple]:
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in list(mine) + [key for key in theirs if key not in mine]:
            if isinstance(key, str) and key in ignored:
                continue
            if key not in mine or key not in theirs:
                yield (*path, key)
            else:
                yield from _leaf_differences(mine[key], theirs[key], ignored, (*path, key))
    elif (
        isinstance(mine, (list, tuple))
        and isinstance(theirs, (list, tuple))
        and len(mine) == len(theirs)
        and not _is_leaf_sequence(mine)
    ):
        for index, (a, b) in enumerate(zip(mine, theirs)):
            yield from _leaf_differences(a, b, ignored, (*path, index))
    elif fingerprint(mine, skip_keys=ignored) != fingerprint(theirs, skip_keys=ignored):
        yield path


def _is_leaf_sequence(value: Sequence[Any]) -> bool:
    """A list of numbers (a history of losses, Python's RNG state) is one value."""
    return all(isinstance(item, (int, float, str, type(None))) for item in value)


def _file_difference(theirs: Path, mine: Path, ignored: Collection[str]) -> str | None:
    """How ``mine`` differs from ``theirs``, or ``None``; ``.jsonl`` and ``.csv`` files
    are compared without the ``ignored`` keys or columns (timings)."""
    if not theirs.exists() and not mine.exists():
        return None
    if not theirs.exists() or not mine.exists():
        return "only in the " + ("resumed run" if mine.exists() else "run never stopped")
    expected, got = _file_rows(theirs, ignored), _file_rows(mine, ignored)
    if expected == got:
        return None
    for number, (a, b) in enumerate(zip(expected, got), start=1):
        if a != b:
            return f"line {number} differs"
    return f"{len(got)} lines, the run never stopped has {len(expected)}"


def _file_rows(path: Path, ignored: Collection[str]) -> list[Any]:
    """A file's lines (bytes); a ``.jsonl`` file's records or a ``.csv`` file's rows
    without the ``ignored`` keys or columns."""
    if path.suffix == ".jsonl":
        rows: list[Any] = []
        for line in path.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                rows.append(line)
                continue
            if isinstance(record, dict):
                record = {key: value for key, value in record.items() if key not in ignored}
            rows.append(record)
        return rows
    if path.suffix == ".csv":
        with open(path, newline="") as file:
            lines = list(csv.reader(file))
        kept = [
            index for index, name in enumerate(lines[0] if lines else []) if name not in ignored
        ]
        return [[row[index] for index in kept if index < len(row)] for row in lines]
    return path.read_bytes().splitlines()


# --- fingerprints ------------------------------------------------------------------------


def fingerprint(
    value: Any, skip_text: str | None = None, skip_keys: Collection[str] = ()
) -> str | None:
    """A short hash of ``value``'s exact content (tensors bit for bit), or ``None``.

    Numbers, strings, bytes, tensors, NumPy arrays and lists, tuples, dicts and sets of
    them have one; anything else (an object, a file, a path) has none, and neither does
    a string containing ``skip_text`` (a run folder's path, which differs between runs).
    Dict entries whose key is in ``skip_keys`` (timings) are left out.
    """
    digest = hashlib.blake2b(digest_size=10)
    return digest.hexdigest() if _feed(digest, value, skip_text, skip_keys) else None


def _feed(digest: Any, value: Any, skip_text: str | None, skip_keys: Collection[str]) -> bool:
    if value is None or isinstance(value, (bool, int, float, complex)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, str):
        if skip_text and skip_text in value:
            return False
        digest.update(f"str:{len(value)}:".encode() + value.encode("utf-8", "replace"))
    elif isinstance(value, bytes):
        digest.update(f"bytes:{len(value)}:".encode() + value)
    elif isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized or value.device.type == "meta":
            return False
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            return False
        digest.update(f"array:{value.dtype}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).view(np.uint8))
    elif isinstance(value, np.generic):
        digest.update(f"{value.dtype}:{value!r};".encode())
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}:{len(value)}[".encode())
        if not all(_feed(digest, item, skip_text, skip_keys) for item in value):
            return False
        digest.update(b"]")
    elif isinstance(value, dict):
        keys = [key for key in value if not (isinstance(key, str) and key in skip_keys)]
        digest.update(f"dict:{len(keys)}{{".encode())
        for key in sorted(keys, key=lambda key: (type(key).__name__, repr(key))):
            if not (
                _feed(digest, key, skip_text, skip_keys)
                and _feed(digest, value[key], skip_text, skip_keys)
            ):
                return False
        digest.update(b"}")
    elif isinstance(value, (set, frozenset)):
        items = [fingerprint(item, skip_text, skip_keys) for item in value]
        if any(item is None for item in items):
            return False
        digest.update(f"set:{sorted(items)};".encode())
    else:
        return False
    return True


# --- the probe: the plugin that records, kills and stops a run ---------------------------


class ResumeProbe:
    """The plugin a check loads into each run (``-p trainloop.check_resume:ResumeProbe``).

    It reads what to do from the ``TRAINLOOP_CHECK_RESUME`` environment variable (a
    JSON object: ``records``, the file to append to; ``kill_at``, the training batch at
    whose end to SIGKILL its own process, before that batch's checkpoint is written;
    ``stop_at``, the batch after which ``fit`` stops, after its epoch's end if it is
    the epoch's last; ``tail``, to stop that many batches into the second epoch). It appends one JSON line per training
    batch (fingerprints of the batch and of the RNG states before it, and the loss),
    one per checkpoint written (a fingerprint of each of its parts) and one when
    ``fit`` ends (the fingerprints of the plugins' plain attributes). It loads only
    for a check, so normal runs never pay for it.
    """

    def __init__(self) -> None:
        text = os.environ.get(ENVIRONMENT)
        if not text:
            raise UsageError(
                f"{PROBE_SPEC} is the probe of 'trainloop check-resume': it runs only there"
            )
        settings = json.loads(text)
        self.path = Path(settings["records"])
        self.kill_at: int | None = settings.get("kill_at")
        self.stop_at: int | None = settings.get("stop_at")
        self.tail: int | None = settings.get("tail")
        self.ignore: list[str] = settings.get("ignore") or []
        self.stopped = False
        self.stop_after_epoch = False
        self.file: Any = None
        self.pending: dict[str, Any] = {}

    def write(self, event: str, **record: Any) -> None:
        if self.file is None:  # a checkpoint written outside fit
            return
        self.file.write(json.dumps({"event": event, **record}) + "\n")
        self.file.flush()

    @hookimpl(trylast=True)  # after the checkpoint plugin has restored a resumed run
    def on_fit_begin(self, learner: Any) -> None:
        self.file = open(self.path, "a")
        self.write("start", epoch=learner.epoch, iteration=learner.iteration, step=learner.step)

    def on_batch_begin(self, learner: Any) -> None:
        if learner.training:
            self.pending = {"batch": fingerprint(learner.batch), "rng": _rng_fingerprints(learner)}

    @hookimpl(tryfirst=True)  # before the checkpoint plugin writes this batch's checkpoint
    def on_batch_end(self, learner: Any) -> None:
        if not learner.training:
            return
        step = learner.step + 1
        loss = None if learner.loss is None else float(learner.loss.detach().float())
        self.write(
            "batch",
            step=step,
            epoch=learner.epoch,
            iteration=learner.iteration,
            loss=loss,
            **self.pending,
        )
        self.pending = {}
        if step == self.kill_at:
            self.file.close()
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.stop_at:
            last_of_epoch = _last_batch_of_epoch(learner)
            if not (last_of_epoch and learner.epoch + 1 >= learner.epochs):  # else fit ends
                self.stopped = True
                # At an epoch's last batch, stop after its end: validation, metrics, checkpoint.
                self.stop_after_epoch = last_of_epoch
                learner.should_stop = not last_of_epoch

    def on_epoch_end(self, learner: Any) -> None:
        if self.stop_after_epoch:
            learner.should_stop = True
        if self.tail and self.stop_at is None:
            self.stop_at = learner.step + min(learner.step, self.tail)

    @hookimpl(wrapper=True)  # sees the checkpoint once every plugin has added its part
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> Iterator[None]:
        result = yield
        state = checkpoint.get("learner") or {}
        parts = {
            str(key): fingerprint(value, skip_keys=self.ignore) for key, value in checkpoint.items()
        }
        self.write(
            "save",
            epoch=int(state.get("epoch", -1)),
            iteration=int(state.get("iteration", -1)),
            step=int(state.get("step", -1)),
            parts=parts,
        )
        return result

    @hookimpl(trylast=True)
    def on_fit_end(self, learner: Any) -> None:
        if self.file is None:
            return
        attributes = _plugin_attributes(learner, self)
        metrics = sorted({str(key) for record in learner.history for key in record})
        self.write(
            "end", step=learner.step, stopped=self.stopped, metrics=metrics, attributes=attributes
        )
        self.file.close()


def _last_batch_of_epoch(learner: Any) -> bool:
    """Whether this training batch is its epoch's last (``False`` when the data has no length)."""
    try:
        batches = len(learner.train_data)
    except TypeError:
        return False
    return learner.iteration + 1 >= batches


def _rng_fingerprints(learner: Any) -> dict[str, str | None]:
    """A fingerprint of each RNG state a checkpoint saves (``python``, ``torch``, ...)."""
    states = capture_rng_state(learner.train_data)
    return {name: fingerprint(state) for name, state in states.items()}


def _plugin_attributes(learner: Any, probe: ResumeProbe) -> dict[str, dict[str, list[Any]]]:
    """``{plugin: {attribute: [fingerprint, short value or None]}}`` of the user's plugins.

    Only plugins from outside trainloop (the recipe's, third-party ones) and only their
    plain attributes (numbers, strings, tensors, containers of them) are recorded; a
    string that names the run folder is left out, as it differs between runs.
    """
    found: dict[str, dict[str, list[Any]]] = {}
    run_dir = str(learner.run_dir) if learner.run_dir is not None else None
    for name, plugin in learner.plugin_manager.list_name_plugin():
        if plugin is None or plugin is probe or isinstance(plugin, types.ModuleType):
            continue
        module = type(plugin).__module__
        if module == "trainloop" or module.startswith("trainloop."):
            continue
        attributes = {}
        for attribute, value in sorted(getattr(plugin, "__dict__", {}).items()):
            value_print = fingerprint(value, skip_text=run_dir, skip_keys=probe.ignore)
            if value_print is not None:
                shown = repr(value) if isinstance(value, (bool, int, float, str)) else None
                attributes[attribute] = [value_print, shown if shown and len(shown) <= 40 else None]
        if attributes:
            found[name] = attributes
    return found


# --- the command -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UsageError: one line, exit status 2."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def main(argv: Sequence[str]) -> int:
    """``trainloop check-resume RECIPE [recipe options] [check options]``: 0 if exact, 1 if not."""
    parser = _Parser(
        prog="trainloop check-resume",
        usage="trainloop check-resume RECIPE.py [recipe options] [--kills K] [--steps N] ...",
        description="Run a recipe once uninterrupted, then K times killed with SIGKILL at "
        "random batches and resumed with --resume; compare the runs bit for bit and say "
        "where a resume differs. Options that are not the check's go to every run.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--kills", type=int, default=3, metavar="K", help="killed-and-resumed runs (default: 3)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help=f"training batches to check (default: one epoch and up to {TAIL} batches more)",
    )
    parser.add_argument(
        "--kill-seed", type=int, default=0, metavar="S", help="seed of the kill points (default: 0)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="the runs checkpoint every N batches (default: 1)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="FILE",
        help="also compare this file of the run folders (may be repeated)",
    )
    parser.add_argument(
        "--ignore-metric",
        action="append",
        default=[],
        metavar="NAME",
        help="leave this metric out of the comparisons, as the timings are (may be repeated)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="J", help="killed runs at a time (default: 1)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the run folders and logs in DIR (default: a temporary folder, removed)",
    )
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0
        raise UsageError("give a recipe: trainloop check-resume RECIPE.py [options]")
    known, recipe_options = parser.parse_known_args(argv[1:])
    # SIGTERM stops the check as Ctrl-C does: its runs, in sessions of their own, with it.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if main_thread else None
    try:
        report = check_resume(
            argv[0],
            recipe_options,
            kills=known.kills,
            steps=known.steps,
            kill_seed=known.kill_seed,
            checkpoint_every=known.checkpoint_every,
            compare_files=known.compare,
            ignore_metrics=known.ignore_metric,
            jobs=known.jobs,
            work_dir=known.work_dir,
            echo=lambda line: print(line, flush=True),
        )
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0 if report.identical else 1


def _stop(number: int, frame: Any) -> None:
    raise Stopped(number)
