"""checkpoint: resumable checkpoints in ``checkpoints/``, the best ones kept, and ``--resume``.

See docs/plugins/checkpoint.md: what it writes (atomically), what a checkpoint holds,
which changed options a resume applies or refuses, and why a resume is exact.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import math
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainloop import Learner, RunConfig, UsageError, hookimpl, sharded
from trainloop.monitor import Monitor, add_monitor_options, monitored_value
from trainloop.run_folder import (
    RunFileError,
    atomic_copy,
    atomic_save,
    copy_to_temp,
    fsync_directory,
)
from trainloop.state import capture_rng_state, json_safe, set_rng_state

FORMAT = "trainloop-checkpoint"
VERSION = 2
"""The newest format this plugin reads: 2 when the model is sharded, 1 otherwise."""
PLAIN_VERSION = 1
"""The format of a checkpoint that holds the whole model: unchanged since the first."""
SHARDS_DIR = "shards"
"""The folder beside the checkpoint files where sharded checkpoints keep their shards."""
CHECKPOINT_KEY = "checkpoint"
AUTO = "auto"
LAST = "last"
BEST = "best"
_REQUIRED_KEYS = ("model", "optimizer", "learner", "rng")
RUN_ONLY_OPTIONS = frozenset({"resume", "out", "overwrite", "debug", "strict_plugins"})
"""Options that say how to start this process, not what the run is: never compared."""
FIXED_ON_RESUME = frozenset({"seed"})
"""Options a resume cannot honour in any recipe: the random streams come from the checkpoint."""
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
"""Optimizer hyperparameters that a schedule scales: a changed value rescales them."""


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoint")
    group.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="also write checkpoints/last.pt every N training batches (default: 0, epoch ends only)",
    )
    group.add_argument(
        "--keep-best",
        type=int,
        default=1,
        metavar="K",
        help="keep the K best checkpoints by --monitor: best.pt, best-<epoch>.pt (default: 1; 0: none)",
    )
    group.add_argument(
        "--checkpoint-async",
        action="store_true",
        help="write a sharded model's checkpoints in the background (torch.distributed."
        "checkpoint.async_save): training waits only for the copy of the state",
    )
    group.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue from checkpoint PATH; with no PATH, from --out's checkpoints/last.pt; "
        "auto: from it if it exists, else start afresh (for schedulers that relaunch a job)",
    )
    add_monitor_options(parser)


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    if options.checkpoint_every < 0:
        raise UsageError(
            f"--checkpoint-every {options.checkpoint_every}: give a number of batches (0: epoch ends only)"
        )
    if options.keep_best < 0:
        raise UsageError(
            f"--keep-best {options.keep_best}: give a number of checkpoints, 0 or more"
        )
    resume = options.resume
    if resume is True or resume == AUTO:
        out = getattr(options, "out", None)
        if out is None:
            flag = "--resume auto" if resume == AUTO else "--resume"
            raise UsageError(
                f"{flag} without a PATH continues the run in --out: pass --out RUN_DIR "
                "(or --resume PATH/TO/checkpoint.pt)"
            )
        last = Path(out) / "checkpoints" / f"{LAST}.pt"
        # auto: continue if there is a checkpoint, else start: a relaunch is always safe.
        resume = None if resume == AUTO and not last.exists() else last
    plugin = Checkpoint(
        config.run_dir / "checkpoints",
        every=options.checkpoint_every,
        keep_best=options.keep_best,
        monitor=Monitor(options.monitor, options.mode) if options.keep_best else None,
        resume=resume,
        write=config.is_main_process,
        asynchronous=options.checkpoint_async,
    )
    plugin.options = {
        key: value for key, value in json_safe(vars(options)).items() if key not in RUN_ONLY_OPTIONS
    }
    plugin.read_resume()  # a bad file fails now, before the recipe loads its data
    config.plugin_manager.register(plugin, "checkpoint.writer")


@hookimpl
def check_run(config: RunConfig, learner: Learner) -> None:
    plugin = config.plugin_manager.get_plugin("checkpoint.writer")
    if plugin is not None and plugin.resume is not None:
        config.resumed_from = plugin.resume
        config.changed_options = plugin.check_resume(learner)


class Checkpoint:
    """Writes resumable checkpoints and restores one when ``fit`` starts.

    Args:
        directory: the folder of the checkpoint files (default:
            ``learner.run_dir / "checkpoints"``).
        every: also write ``last.pt`` every ``every`` training batches (0: only at
            epoch ends).
        keep_best: how many best checkpoints to keep (``best.pt``, ``best-<epoch>.pt``).
        monitor: which epoch is best (a :class:`~trainloop.monitor.Monitor`, of which
            the plugin keeps its own copy, or a metric name); ``None`` writes no
            ``best.pt``.
        resume: a checkpoint file to continue from when ``fit`` starts (the first
            ``fit`` only; ``resumed_from`` says which file was used).
        write: whether this process writes files (``False`` on all but the main
            process of a distributed run; it still resumes).
        asynchronous: with a sharded model, write the shards in the background: the
            state is copied when the checkpoint is taken, and the checkpoint file that
            names the shards is written once they are (checked after each batch with
            ``every``, and before the next checkpoint or the end of ``fit``).
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        every: int = 0,
        keep_best: int = 1,
        monitor: Monitor | str | None = None,
        resume: str | Path | None = None,
        write: bool = True,
        asynchronous: bool = False,
    ) -> None:
        if every < 0 or keep_best < 0:
            raise ValueError(f"Checkpoint(every={every}, keep_best={keep_best}): give 0 or more")
        self.directory = Path(directory) if directory is not None else None
        self.every = every
        self.keep_best = keep_best
        # A copy: a Monitor shared with another plugin would see each value twice.
        self.monitor = Monitor(monitor) if isinstance(monitor, str) else copy.copy(monitor)
        self.resume = Path(resume) if resume is not None else None
        self.resumed_from: Path | None = None
        self.write = write
        self.options: dict[str, Any] | None = None  # the run's options (set by configure)
        self.kept: list[tuple[float, int]] = []  # (value, epoch) of the best kept, best first
        self.optimizer_start: list[dict[str, Any]] | None = None
        self._resume_checkpoint: dict[str, Any] | None = None
        self._epoch_rng: dict[str, Any] | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._last_written: tuple[int, int, int] | None = None
        self._per_batch: _EveryBatches | None = None
        self.asynchronous = asynchronous
        self._sharded = False
        self._shard_names: tuple[str, int] = ("", 0)  # agreed by every process, a counter
        self._pending: tuple[Future, Callable[[], None] | None] | None = None
        self._async_group: Any = None

    @property
    def _saves(self) -> bool:
        """Whether this process takes part in writing checkpoints (a sharded model: all do)."""
        return self.write or self._sharded

    # --- resume ------------------------------------------------------------------------

    def read_resume(self) -> None:
        """Read and check the ``resume`` file now (``fit`` restores it later)."""
        if self.resume is not None and self._resume_checkpoint is None:
            self._resume_checkpoint = read_checkpoint(self.resume)

    def on_fit_begin(self, learner: Learner) -> None:
        if self.directory is None:
            if learner.run_dir is None:
                raise ValueError("Checkpoint needs a directory or a learner with run_dir")
            self.directory = Path(learner.run_dir) / "checkpoints"
        self.kept = []
        self._epoch_rng = self._resume_rng = None
        self._last_written = None
        if self.monitor is not None:
            self.monitor.best = None
        # A sharded model is saved by every process (each writes its shard).
        self._sharded = sharded.is_sharded(learner.model)
        if self._sharded:
            self._shard_names = _agreed_token(), 0
            if self.asynchronous and self._async_group is None:
                import torch.distributed as dist

                # Its own group: the writing thread's collectives must not mix with training's.
                self._async_group = dist.new_group(backend="gloo")
        elif self.asynchronous and self.write:
            print(
                "checkpoint: --checkpoint-async applies to a sharded model (--strategy fsdp); "
                "this one's checkpoints are written as the run waits",
                file=sys.stderr,
                flush=True,
            )
        if self.write:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".*.tmp"):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)
            remove_unused_shards(self.directory)
        # Only when asked; under distributed training on every process, since they all
        # take part in sharing the epoch's losses before a checkpoint.
        writing = self._saves or learner.context.distributed
        if self.every and self._per_batch is None and writing:
            self._per_batch = _EveryBatches(self)
            learner.add_plugin(self._per_batch, "checkpoint.every-batches")
        self.optimizer_start = optimizer_hyperparameters(learner.optimizer)
        if self.resume is not None:  # the first fit only: a later fit starts afresh
            self.read_resume()
            checkpoint, self._resume_checkpoint = self._resume_checkpoint, None
            self._restore(learner, checkpoint)
            self.resumed_from, self.resume = self.resume, None

    def check_resume(self, learner: Learner) -> dict[str, list[Any]]:
        """Check that the ``resume`` checkpoint can continue in ``learner``, before ``fit``.

        Compares the run's options (and the recipe's Config) with those the checkpoint
        was written under. Returns ``{option: [old, new]}`` of those that changed and
        will apply, after printing them in one line. Raises
        :class:`~trainloop.UsageError` for a change the resume cannot honour: the seed,
        a Config field marked ``metadata={"resume": "fixed"}``, the model's shape, the
        optimizer's parameters, or the batches of an epoch resumed in its middle.
        """
        self.read_resume()
        checkpoint = self._resume_checkpoint
        where = f"--resume {self.resume}"
        changed = changed_options(checkpoint, self.options, learner.config)
        shown = ", ".join(
            f"{_flag(name)} {_show(old)} -> {_show(new)}" for name, (old, new) in changed.items()
        )
        fixed = [name for name in changed if name in FIXED_ON_RESUME | _fixed_fields(learner)]
        if fixed:
            raise UsageError(
                f"{where}: {', '.join(_flag(name) for name in fixed)} cannot change on a resume "
                f"(changed: {shown}); resume with the values it was written with, or start a "
                "fresh run"
            )
        mismatch = _model_mismatch(learner.model, _saved_shapes(checkpoint, self.resume))
        if mismatch:
            because = f" (changed: {shown})" if shown else ""
            raise UsageError(
                f"{where}: its weights do not fit this model ({mismatch}){because}; resume with "
                "the recipe and options that wrote it"
            )
        saved_groups = checkpoint["optimizer"].get("param_groups", [])
        groups = learner.optimizer.param_groups
        if [len(group["params"]) for group in saved_groups] != [len(g["params"]) for g in groups]:
            raise UsageError(
                f"{where}: its optimizer state does not fit this optimizer ({len(saved_groups)} "
                f"parameter groups there, {len(groups)} here); resume with the recipe that wrote it"
            )
        saved_batches, batches = checkpoint.get("train_batches"), _length(learner.train_data)
        stopped_after = int(checkpoint["learner"]["iteration"])
        saved_world, world = int(checkpoint.get("world_size", 1)), learner.context.world_size
        if stopped_after and saved_world != world:
            raise UsageError(
                f"{where}: it was written by {saved_world} process(es) in the middle of an "
                f"epoch, and this run has {world}; the samples each process had left cannot be "
                f"dealt out again: resume with {saved_world} process(es), or from a checkpoint "
                "taken at an epoch end"
            )
        if saved_world != world and self.write:
            print(
                f"resume: {saved_world} process(es) wrote the checkpoint, {world} go on: the "
                "next epochs split the data between them the new way",
                flush=True,
            )
        if stopped_after and saved_batches is not None and batches != saved_batches:
            because = f" (changed: {shown})" if shown else ""
            raise UsageError(
                f"{where}: it stopped after batch {stopped_after} of an epoch of {saved_batches} "
                f"batches, and an epoch now has {batches}{because}; resume with the same data "
                "and batch size, or from a checkpoint taken at an epoch end"
            )
        if changed and self.write:
            print(f"resume: options changed since the checkpoint, applied: {shown}", flush=True)
        from trainloop.data.seeding import resume_exactness_warning

        warning = resume_exactness_warning(learner.train_data)
        if warning and self.write:
            print(f"trainloop: warning: {warning}", file=sys.stderr, flush=True)
        return changed

    def _restore(self, learner: Learner, checkpoint: dict[str, Any]) -> None:
        where = f"--resume {self.resume}"
        shards = checkpoint.get("shards")
        if shards:
            try:  # resharded as this run's processes and model need
                sharded.load(self.resume.parent / shards, learner.model, learner.optimizer)
            except (RuntimeError, ValueError, KeyError) as error:
                raise UsageError(
                    f"{where}: its shards in {self.resume.parent / shards} do not load into "
                    f"this model and optimizer ({_one_line(error)}); resume with the recipe "
                    "and options that wrote it"
                ) from None
            # For the plugins that read the checkpoint's model (the best weights may be it).
            checkpoint["model"] = sharded.full_state_dict(learner.model)
        else:
            try:
                sharded.load_full_state_dict(learner.model, checkpoint["model"])
            except RuntimeError as error:
                raise UsageError(
                    f"{where}: its weights do not fit this model ({_one_line(error)}); "
                    "resume with the recipe and options that wrote it"
                ) from None
            try:
                sharded.load_full_optimizer_state_dict(
                    learner.model, learner.optimizer, checkpoint["optimizer"]
                )
            except (ValueError, KeyError) as error:
                raise UsageError(
                    f"{where}: its optimizer state does not fit this optimizer ({_one_line(error)})"
                ) from None
        saved_start = (checkpoint.get(CHECKPOINT_KEY) or {}).get("optimizer_start")
        apply_hyperparameters(learner.optimizer, saved_start, self.optimizer_start)
        learner.load_state_dict(checkpoint["learner"])
        self._epoch_rng = checkpoint.get("epoch_rng")
        self._resume_rng = checkpoint["rng"]
        set_rng_state(self._resume_rng, learner.train_data)
        learner.hook.on_load_checkpoint(learner=learner, checkpoint=checkpoint)
        if _same_file(self.resume, self.directory / f"{LAST}.pt"):
            self._last_written = _resume_point(checkpoint["learner"])
        if self.write:  # epochs and batches counted from 1, as the progress bar does
            where = (
                f"after its batch {learner.iteration}" if learner.iteration else "from its start"
            )
            print(
                f"resumed from {self.resume}: epoch {learner.epoch + 1} {where}, "
                f"{learner.step} steps done",
                flush=True,
            )

    @hookimpl(tryfirst=True)
    def iter_train_data(self, learner: Learner) -> Iterator[Any] | None:
        if learner.iteration == 0 or self._epoch_rng is None:
            # The core creates the iterator right after this: these are the states a
            # mid-epoch resume must start the epoch from.
            self._epoch_rng = capture_rng_state(learner.train_data)
            return None
        # Resuming mid-epoch: replay the epoch's start, skip the batches done, then
        # carry on from the RNG states of the moment the checkpoint was taken.
        set_rng_state(self._epoch_rng, learner.train_data)
        batches = iter(learner.train_data)
        for done in range(learner.iteration):
            try:
                next(batches)
            except StopIteration:
                raise UsageError(
                    f"--resume {self.resumed_from}: it stopped after batch {learner.iteration} of an "
                    f"epoch but the training data has only {done} batches; resume with the "
                    "same data and batch size"
                ) from None
        set_rng_state(self._resume_rng or {}, learner.train_data)
        return batches

    # --- writing -----------------------------------------------------------------------

    @hookimpl(wrapper=True)  # writes after every plugin's on_epoch_end (metrics, schedules)
    def on_epoch_end(self, learner: Learner) -> Iterator[None]:
        result = yield
        if self._saves:
            self._write_epoch_end(learner)
        return result

    def _write_epoch_end(self, learner: Learner) -> None:
        state = learner.state_dict()  # the epoch counts as done
        plan = self._rank(learner) if self.write else None
        then = None if plan is None else functools.partial(self._apply_best, *plan, learner.epoch)
        self._save(learner, state, LAST, epoch_rng=False, then=then)

    def on_fit_end(self, learner: Learner) -> None:
        if self._per_batch is not None:
            learner.plugin_manager.unregister(self._per_batch)
            self._per_batch = None
        try:  # a checkpoint taken before an error is still a good one
            self._finish_pending()
        except Exception:
            if learner.exception is None:
                raise
        # A clean early stop (Ctrl-C, should_stop, StopFit) is a resume point; after an
        # error the state may be half-updated, so the last good last.pt stays.
        if self._saves and learner.exception is None:
            state = learner.state_dict()
            if _resume_point(state) != self._last_written:
                self._save(learner, state, LAST)
                self._finish_pending()

    @hookimpl
    def save_checkpoint(self, learner: Learner, name: str) -> Path | None:
        if not self._saves:
            return None
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"save_checkpoint(name={name!r}): give a plain file name stem")
        self._finish_pending()
        state = learner.state_dict()
        last = self._dir(learner) / f"{LAST}.pt"
        # Decided alike by every process of a sharded model: none writes a shard then.
        if name != LAST and _resume_point(state) == self._last_written:
            if not self.write:
                return None
            if self._sharded or last.exists():
                path = self._dir(learner) / f"{name}.pt"
                atomic_copy(last, path)  # the same state: a file copy, not a second write
                return path
        path = self._save(learner, state, name)
        self._finish_pending()  # asked for now: written when this returns
        return path

    def on_exception(self, learner: Learner, exception: BaseException) -> None:
        if isinstance(exception, RunFileError) and "checkpoint" not in str(exception):
            # Another file of the run could not be written: say what is safe to resume from.
            last = self._dir(learner) / f"{LAST}.pt"
            if last.exists():
                exception.args = (f"{exception}; the last good checkpoint is {last}",)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "kept_best": [[value, epoch] for value, epoch in self.kept],
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
            "optimizer_start": self.optimizer_start,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY) or {}
        self.kept = [(float(value), int(epoch)) for value, epoch in state.get("kept_best", [])]
        if self.monitor is not None and state.get("monitor") is not None:
            self.monitor.load_state_dict(state["monitor"])

    def _dir(self, learner: Learner) -> Path:
        if self.directory is None:
            if learner.run_dir is None:
                raise ValueError("Checkpoint needs a directory or a learner with run_dir")
            self.directory = Path(learner.run_dir) / "checkpoints"
        return self.directory

    def _save(
        self,
        learner: Learner,
        state: dict[str, Any],
        name: str,
        epoch_rng: bool = True,
        then: Callable[[], None] | None = None,
    ) -> Path | None:
        """Write checkpoint ``name``; a sharded model's shards first, by every process.

        ``then`` runs once the file is written (the best checkpoints' copies). Returns
        the file's path, or ``None`` on a process that does not write it. With
        ``asynchronous`` shards, the file is written later (:meth:`_finish_pending`).
        """
        self._finish_pending()  # one checkpoint in the air at a time
        shards, written = self._save_shards(learner, state) if self._sharded else (None, None)
        if not self.write:
            if name == LAST:
                self._last_written = _resume_point(state)
            self._pending = None if written is None else (written, None)
            return None
        state["history"] = [_plain(record) for record in state["history"]]
        config = learner.config
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
        checkpoint: dict[str, Any] = {"format": FORMAT, "version": PLAIN_VERSION}
        if shards:
            # The model's and optimizer's state are in the folder the file names; it
            # counts as written once this file is (written last, atomically).
            optimizer_groups = learner.optimizer.state_dict()["param_groups"]
            checkpoint.update(
                version=VERSION,
                model=None,
                optimizer={"param_groups": optimizer_groups},
                shards=shards,
            )
        else:
            checkpoint.update(
                model=learner.model.state_dict(), optimizer=learner.optimizer.state_dict()
            )
        checkpoint.update(
            {
                "learner": state,
                "rng": capture_rng_state(learner.train_data),
                "epoch_rng": self._epoch_rng if epoch_rng and state["iteration"] else None,
                "config": json_safe(config) if config is not None else None,
                "options": self.options,
                "world_size": learner.context.world_size,
                # Per process under torchrun, where the data is split while fit runs.
                "train_batches": _length(learner.train_data)
                if learner.context.world_size == 1
                else None,
            }
        )
        # The NaN guard checks here (tryfirst) and raises before anything is written.
        learner.hook.on_save_checkpoint(learner=learner, checkpoint=checkpoint)
        path = self._dir(learner) / f"{name}.pt"
        commit = functools.partial(self._commit, checkpoint, path, name, then)
        if written is None or written.done():
            commit()
        else:
            self._pending = (written, commit)
        return path

    def _commit(
        self, checkpoint: dict[str, Any], path: Path, name: str, then: Callable[[], None] | None
    ) -> None:
        """Write the checkpoint file (its shards are written): the checkpoint now counts."""
        try:
            atomic_save(checkpoint, path)
        except RunFileError as error:
            last = path.parent / f"{LAST}.pt"
            good = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint yet"
            raise RunFileError(f"{error}; {good}") from None
        if name == LAST:
            self._last_written = _resume_point(checkpoint["learner"])
        if then is not None:
            then()
        if checkpoint.get("shards"):
            remove_unused_shards(path.parent)  # those that no file names any more

    def _finish_pending(self) -> None:
        """Wait for the checkpoint being written in the background, and complete it."""
        if self._pending is None:
            return
        written, commit = self._pending
        self._pending = None
        written.result()  # this process's shard is written (or its error raised here)
        if commit is not None:
            commit()

    def _poll_pending(self) -> None:
        if self._pending is not None and self._pending[0].done():
            self._finish_pending()

    def _save_shards(self, learner: Learner, state: dict[str, Any]) -> tuple[str, Future]:
        """Start writing the sharded model's and optimizer's state into a new folder.

        Returns the folder's name relative to the checkpoint folder and a future that is
        done when this process's shard is written. Every process calls this, in step.
        """
        token, count = self._shard_names
        self._shard_names = token, count + 1
        name = f"{SHARDS_DIR}/step{state['step']}-{token}-{count}"
        written = sharded.save(
            self._dir(learner) / name,
            learner.model,
            learner.optimizer,
            process_group=self._async_group,
            asynchronous=self.asynchronous,
        )
        return name, written

    # --- the best checkpoints ----------------------------------------------------------

    def _rank(self, learner: Learner) -> tuple[list, list] | None:
        """Place this epoch among the best; return ``(before, after)`` lists, or ``None``."""
        if self.monitor is None or not self.keep_best:
            return None
        value = monitored_value(self.monitor, learner)
        if value is None or not math.isfinite(value):
            return None
        improved = self.monitor.update(learner.metrics)
        before = [entry for entry in self.kept if entry[1] != learner.epoch]
        if improved or not before:
            position = 0
        else:  # not a new best (by min_delta): rank it among the others by value
            position = 1
            while position < len(before) and not self._better(value, before[position][0]):
                position += 1
        if position >= self.keep_best:
            return None
        after = (before[:position] + [(value, learner.epoch)] + before[position:])[: self.keep_best]
        self.kept = after
        return before, after

    def _better(self, value: float, other: float) -> bool:
        return value < other if self.monitor.mode == "min" else value > other

    def _apply_best(
        self, before: list[tuple[float, int]], after: list[tuple[float, int]], added: int
    ) -> None:
        """Copy last.pt to this epoch's best file; rename and drop the others to match."""
        directory = self.directory
        old = {epoch: _best_name(index, epoch) for index, (_, epoch) in enumerate(before)}
        new = {epoch: _best_name(index, epoch) for index, (_, epoch) in enumerate(after)}
        temporary = copy_to_temp(directory / f"{LAST}.pt", directory)
        try:
            for epoch, name in old.items():  # the former best moves to best-<epoch>.pt
                if epoch in new and new[epoch] != name:
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(directory / name, directory / new[epoch])
            os.replace(temporary, directory / new[added])
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        for epoch, name in old.items():
            if epoch not in new and name not in new.values():
                (directory / name).unlink(missing_ok=True)
        fsync_directory(directory)


class _EveryBatches:
    """Writes ``last.pt`` every ``every`` training batches for a :class:`Checkpoint`."""

    def __init__(self, owner: Checkpoint) -> None:
        self.owner = owner

    @hookimpl(trylast=True)  # after the other plugins' per-batch updates
    def on_batch_end(self, learner: Learner) -> None:
        if learner.training and (learner.step + 1) % self.owner.every == 0:
            learner.share_train_losses()  # every process: the checkpoint holds the run's
            if self.owner._saves:
                self.owner._save(learner, learner.state_dict(), LAST)  # this batch is done
        else:
            self.owner._poll_pending()


def _best_name(index: int, epoch: int) -> str:
    return f"{BEST}.pt" if index == 0 else f"{BEST}-{epoch}.pt"


def _resume_point(state: dict[str, Any]) -> tuple[int, int, int]:
    return int(state["epoch"]), int(state["iteration"]), int(state["step"])


def _same_file(a: Path | None, b: Path) -> bool:
    try:
        return a is not None and a.resolve() == b.resolve()
    except OSError:
        return False


# --- what changed on a resume ----------------------------------------------------------


def changed_options(
    checkpoint: dict[str, Any], options: dict[str, Any] | None, config: Any
) -> dict[str, list[Any]]:
    """``{name: [old, new]}`` for each option or Config field that differs from the
    checkpoint's (options it did not record are not compared)."""
    now: dict[str, Any] = {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        now.update(json_safe(dataclasses.asdict(config)))
    now.update(options or {})
    saved = dict(checkpoint.get("config") or {})
    saved.update(checkpoint.get("options") or {})
    return {
        name: [saved[name], value]
        for name, value in now.items()
        if name in saved and saved[name] != value and name not in RUN_ONLY_OPTIONS
    }


def _fixed_fields(learner: Learner) -> set[str]:
    config = learner.config
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        return set()
    return {
        field.name
        for field in dataclasses.fields(config)
        if field.metadata.get("resume") == "fixed"
    }


def _saved_shapes(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The shape of each entry of the checkpoint's model state (``None``: not a tensor)."""
    shards = checkpoint.get("shards")
    if shards:
        return dict(sharded.saved_model_shapes(path.parent / shards))
    return {name: getattr(value, "shape", None) for name, value in checkpoint["model"].items()}


def _model_mismatch(model: torch.nn.Module, saved: dict[str, Any]) -> str:
    """What keeps a state of the ``saved`` shapes (by name) from loading into ``model``,
    in a few words ('' when it fits)."""
    state = model.state_dict()
    missing = [name for name in state if name not in saved]
    unexpected = [name for name in saved if name not in state]
    shapes = [
        f"{name}: {_shape(saved[name])} in the checkpoint, {_shape(value.shape)} here"
        for name, value in state.items()
        if name in saved
        and hasattr(value, "shape")
        and saved[name] is not None
        and tuple(saved[name]) != tuple(value.shape)
    ]
    parts = []
    if shapes:
        parts.append(
            "; ".join(shapes[:2]) + (f"; {len(shapes) - 2} more" if len(shapes) > 2 else "")
        )
    if missing:
        parts.append(f"not in the checkpoint: {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"not in this model: {', '.join(unexpected[:3])}")
    return "; ".join(parts)


def _shape(shape: Any) -> str:
    return "x".join(str(size) for size in shape) or "scalar"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (``lr``, ``momentum``, ...), without the parameters."""
    return [
        {key: json_safe(value) for key, value in group.items() if key != "params"}
        for group in optimizer.param_groups
    ]


def apply_hyperparameters(
    optimizer: torch.optim.Optimizer,
    saved_start: list[dict[str, Any]] | None,
    start: list[dict[str, Any]] | None,
) -> None:
    """Give a just-restored optimizer the settings the resumed run asks for.

    ``saved_start`` holds the settings the checkpoint's run started with, ``start`` those
    this run started with. A setting that differs between them was changed on purpose:
    it is set. Learning rates (``lr`` and the ``initial_lr``/``max_lr``/``min_lr`` that
    schedules keep) are scaled by ``new / old``, so a schedule in progress continues
    from the same point at the new scale (with no schedule, the lr is the new value).
    """
    if not saved_start or not start or len(saved_start) != len(start):
        return
    for group, old, new in zip(optimizer.param_groups, saved_start, start):
        for key, value in new.items():
            if key not in group or old.get(key) == value:
                continue
            before = old.get(key)
            if key in LR_KEYS and _positive(before) and _positive(value):
                group[key] = group[key] * (value / before)
            else:
                group[key] = tuple(value) if isinstance(group[key], tuple) else value


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


# --- reading ---------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by this plugin (on the CPU) and check that it is one.

    Raises:
        UsageError: the file is missing, unreadable (truncated, corrupt), or not a
            trainloop checkpoint; the message names it.
    """
    path = Path(path)
    where = f"--resume {path}"
    if not path.is_file():
        raise UsageError(
            f"{where}: no such file; give a checkpoint that trainloop wrote "
            "(RUN_DIR/checkpoints/last.pt)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle and EOF errors all mean the same to the user
        raise UsageError(
            f"{where}: cannot read it ({_one_line(error)}); the file is truncated, "
            "corrupt, or not a trainloop checkpoint"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UsageError(
            f"{where}: not a trainloop checkpoint (it holds a {type(checkpoint).__name__} "
            f"without format {FORMAT!r}); give RUN_DIR/checkpoints/last.pt of a trainloop run"
        )
    if int(checkpoint.get("version", 0)) > VERSION:
        raise UsageError(
            f"{where}: checkpoint format version {checkpoint['version']} is newer than this "
            f"trainloop reads ({VERSION}); upgrade trainloop"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise UsageError(f"{where}: incomplete checkpoint, without {', '.join(missing)}")
    shards = checkpoint.get("shards")
    if shards and not sharded.is_complete(path.parent / shards):
        raise UsageError(
            f"{where}: its shards folder {path.parent / shards} is missing or incomplete; a "
            "sharded checkpoint is the file and the folder it names, side by side: copy both"
        )
    return checkpoint


def remove_unused_shards(directory: Path) -> None:
    """Delete the shard folders in ``directory`` that no checkpoint file there names.

    Left by a file that was replaced or dropped, or by a process killed while it wrote
    them. Nothing is deleted when a checkpoint file cannot be read (what it names is
    then unknown).
    """
    folder = Path(directory) / SHARDS_DIR
    if not folder.is_dir():
        return
    named = set()
    for path in Path(directory).glob("*.pt"):
        try:  # mmap: the file's tensors are not read
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return
        if isinstance(checkpoint, dict) and checkpoint.get("shards"):
            named.add(Path(checkpoint["shards"]).name)
    for entry in folder.iterdir():
        if entry.name not in named:
            shutil.rmtree(entry, ignore_errors=True)


def _agreed_token() -> str:
    """A random word that every process of the run receives from rank 0."""
    import torch.distributed as dist

    token = [secrets.token_hex(3)]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """A history record whose NumPy scalars are Python numbers (weights_only loads them)."""
    return {
        key: value.item() if isinstance(value, np.generic) else value
        for key, value in record.items()
    }
