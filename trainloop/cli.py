"""The ``trainloop`` command: ``run`` a recipe, ``predict``, ``check-resume``, ``lr-find``, list ``plugins``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import random
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trainloop
from trainloop.context import RunContext, current_run
from trainloop.errors import TrainingError, UsageError
from trainloop.manager import PluginManager
from trainloop.recipe import (
    add_config_options,
    config_from_dict,
    load_recipe,
    make_config,
    read_config_file,
)
from trainloop.run import RunConfig
from trainloop.run_folder import (
    CONFIG_NAME,
    RunLock,
    is_environment_error,
    move_aside,
    new_run_dir,
    remove_aside,
    remove_if_unused,
    run_contents,
    write_error,
    write_json_atomic,
)

if TYPE_CHECKING:  # torch loads only when a run needs it: --version and --help stay quick
    from trainloop.learner import Learner

EXIT_USAGE = 2
MODEL_NAME = "model.pt"  # what the model_saver plugin writes: the weights predict uses
DISABLE_AUTOLOAD = "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UsageError: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            message = f"unknown option(s) {message.partition(': ')[2]}"
        raise UsageError(f"{message} (see '{self.prog} --help')")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``trainloop`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return _dispatch(argv)
    except UsageError as error:
        if debug:
            traceback.print_exc()
        print(f"trainloop: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as error:
        if debug:
            traceback.print_exc()
        print(f"trainloop: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        number = getattr(error, "signal", signal.SIGINT)
        if number == signal.SIGINT:
            print("trainloop: interrupted", file=sys.stderr)
        else:
            print(f"trainloop: stopped by {signal.Signals(number).name}", file=sys.stderr)
        return 128 + number  # 130 for Ctrl-C, 143 for SIGTERM: as a shell reports them
    except BrokenPipeError:  # output piped into a reader that quit (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:
        if debug:
            traceback.print_exc()
        if is_environment_error(error):  # a full disk, a read-only folder: the machine's
            print(f"trainloop: error: {write_error(error.filename or '?', error)}", file=sys.stderr)
            return EXIT_USAGE
        notes = "; ".join(getattr(error, "__notes__", ()))
        where = f" ({notes})" if notes else ""
        print(f"trainloop: error: {type(error).__name__}: {error}{where}", file=sys.stderr)
        if not debug:
            print("trainloop: run again with --debug for the traceback", file=sys.stderr)
        return 1


def _dispatch(argv: list[str]) -> int:
    parser = _Parser(
        prog="trainloop",
        description="trainloop: run a recipe, list plugins, find a learning rate, print the version.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"trainloop {trainloop.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "run", help="run a recipe: trainloop run RECIPE.py [options]", add_help=False
    )
    commands.add_parser(
        "predict",
        help="predict again with a finished run's model: trainloop predict RUN_DIR [options]",
        add_help=False,
    )
    commands.add_parser("plugins", help="list the plugins, where they come from, their hooks")
    commands.add_parser(
        "check-resume",
        help="kill a recipe's run, resume it, compare bit for bit: trainloop check-resume RECIPE.py",
        add_help=False,
    )
    commands.add_parser(
        "lr-find",
        help="the learning-rate range test: trainloop lr-find RECIPE.py [options]",
        add_help=False,
    )
    known = ("run", "predict", "plugins", "check-resume", "lr-find")
    if not argv or argv[0] not in known:
        parser.parse_args(argv or ["--help"])
        raise UsageError(
            f"unknown command {argv[0]!r}: use 'run', 'predict', 'plugins', 'check-resume' "
            "or 'lr-find'"
        )
    if argv[0] == "check-resume":
        from trainloop.check_resume import main as check_resume

        return check_resume(argv[1:])
    if argv[0] == "plugins":
        return list_plugins(argv[1:])
    if argv[0] == "predict":
        return predict(argv[1:])
    if argv[0] == "lr-find":
        return find_lr(argv[1:])
    return run(argv[1:])


def _plugin_selection(argv: list[str], prog: str) -> tuple[argparse.Namespace, list[str]]:
    """Parse the options that decide which plugins load, before the plugins add theirs."""
    early = _Parser(prog=prog, add_help=False, allow_abbrev=False)
    _add_selection_options(early)
    return early.parse_known_args(argv)


def _add_selection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plugins")
    group.add_argument(
        "-p",
        dest="plugins",
        action="append",
        default=[],
        metavar="NAME",
        help="enable a plugin by name or module:attr; -p no:NAME disables one",
    )
    group.add_argument(
        "--strict-plugins",
        action="store_true",
        help="stop if an installed plugin fails to load (by default: a warning, and go on)",
    )
    group.add_argument("--debug", action="store_true", help="show tracebacks")


def load_plugins(specs: list[str], strict: bool = False) -> PluginManager:
    """A plugin manager with the built-ins, entry points and ``-p`` plugins loaded.

    An installed plugin that fails to load is left out with a one-line warning (on the
    first process only), or, when ``strict`` (``--strict-plugins``), is a UsageError.
    """
    manager = PluginManager()
    for spec in specs:
        if spec.startswith("no:"):
            manager.load_by_spec(spec)
    manager.load_builtins()
    if not os.environ.get(DISABLE_AUTOLOAD):
        manager.load_entry_points()
    for spec in specs:
        if not spec.startswith("no:"):
            manager.load_by_spec(spec)
    for failure in manager.failed.values():
        remedy = f"switch it off with -p no:{failure.name} or {DISABLE_AUTOLOAD}=1"
        if strict:
            raise UsageError(
                f"{failure.describe()}; --strict-plugins stops here: fix or uninstall"
                f" {failure.distribution}, or {remedy}"
            )
        if os.environ.get("RANK", "0") == "0":  # torchrun's other processes stay quiet
            print(
                f"trainloop: warning: {failure.describe()}; going on without it ({remedy})",
                file=sys.stderr,
                flush=True,
            )
    return manager


def list_plugins(argv: list[str]) -> int:
    """``trainloop plugins``: a table of name, origin and implemented hooks."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    parser = _Parser(
        prog="trainloop plugins",
        description="List the plugins a run with these options loads: each one's name,"
        " where it comes from, and the hooks it implements.",
        allow_abbrev=False,
    )
    _add_selection_options(parser)
    parser.add_argument(
        "--order",
        action="store_true",
        help="for each hook, its implementations in the order they are called, with the "
        "marker that placed each",
    )
    selection = parser.parse_args(argv)
    manager = load_plugins(selection.plugins, strict=selection.strict_plugins)
    if selection.order:
        return _print_order(manager)
    table = Table("plugin", "origin", "hooks", title="trainloop plugins")
    for name, plugin in manager.list_name_plugin():
        if plugin is None:
            continue
        hooks = ", ".join(manager.implemented_hooks(plugin))
        table.add_row(name, manager.origins.get(name, "?"), hooks)
    for failure in manager.failed.values():
        reason = Text(f"failed to load: {failure.error}", style="red")
        origin = f"entry point ({failure.distribution} {failure.version})"
        table.add_row(failure.name, origin, reason)
    Console(width=max(120, Console().width)).print(table)
    return 0


def _print_order(manager: PluginManager) -> int:
    """``trainloop plugins --order``: each hook's implementations in call order."""
    from trainloop.learner import _CoreSteps  # the core's default steps run last

    manager.register(_CoreSteps(), "core", origin="core")
    for hook in manager.hook_names():
        order = manager.call_order(hook)
        if not order:
            continue
        print(f"{hook}:")
        for position, (name, marker) in enumerate(order, start=1):
            print(f"  {position}. {name}" + (f"  [{marker}]" if marker else ""))
    return 0


def run(argv: list[str]) -> int:
    """``trainloop run RECIPE [options]``: build the recipe's Learner, fit, predict."""
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print(
                "usage: trainloop run RECIPE.py [options]  (options: trainloop run RECIPE --help)"
            )
            return 0
        raise UsageError("give a recipe: trainloop run RECIPE.py [options]")
    recipe_path = Path(argv[0])
    prog = f"trainloop run {recipe_path}"
    selection, _ = _plugin_selection(argv[1:], prog)
    replay = _config_file_values(argv[1:], prog)
    if not selection.plugins and replay.get("plugins"):  # the -p of the run replayed
        selection.plugins = list(replay["plugins"])
    recipe = load_recipe(recipe_path)
    manager = load_plugins(selection.plugins, strict=selection.strict_plugins)

    parser = _Parser(prog=prog, allow_abbrev=False, description=recipe.__doc__)
    field_names = add_config_options(parser, recipe.Config)
    _add_common_options(parser, field_names)
    _add_selection_options(parser)
    manager.hook.add_options(parser=parser, plugin_manager=manager)
    if replay:
        _set_config_defaults(parser, replay, field_names)
    options = parser.parse_args(argv[1:])
    cfg = make_config(recipe.Config, options, field_names)
    if options.epochs < 0:
        raise UsageError(f"--epochs {options.epochs}: give a number of epochs, 0 or more")

    resuming = getattr(options, "resume", None) is not None
    if options.overwrite and resuming:
        raise UsageError(
            "--overwrite starts the run afresh and --resume continues it: give one of them"
        )
    if options.out is not None:
        _check_out(options.out)

    seed_everything(options.seed)
    if options.deterministic:
        make_deterministic()
    context = RunContext.from_environment()
    manager.hook.configure_context(context=context, options=options)
    run_dir = options.out or manager.hook.make_run_dir(
        options=options, recipe_path=recipe_path, context=context
    )
    # A new default folder, and the parents made for it, go again if the run never starts.
    made_here = [] if run_dir else _parents_of_default(recipe_path)
    run_dir = Path(run_dir or new_run_dir(recipe_path))
    config = RunConfig(options, run_dir, recipe_path, cfg, manager, context)
    lock = RunLock(run_dir)
    aside: Path | None = None
    with _configured(config, lock, made_here):
        try:
            if config.is_main_process and (not resuming or options.resume == "auto"):
                _check_fresh(run_dir, options)  # fail early, before the recipe loads its data
            learner = _build(recipe, config, selection.plugins)
            # Every check that can fail on input is done by now: the run folder is untouched.
            manager.hook.check_run(config=config, learner=learner)
            if config.is_main_process:
                aside = _take_run_dir(run_dir, lock, options, resuming)
                print(f"run folder: {run_dir}", flush=True)
                _record_run(config, cfg, ["trainloop", "run", *argv])
                if aside is not None:
                    print(
                        f"--overwrite: the run it replaces is in {aside} until its first checkpoint"
                    )
                    learner.add_plugin(_ReplacedRun(aside), "cli.replaced-run", origin="cli")
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
            learner.fit(options.epochs)
            if callable(getattr(recipe, "predict", None)):
                recipe.predict(learner, cfg)
        except BaseException:
            if aside is not None and aside.exists():
                print(
                    f"trainloop: the run that --overwrite replaced is kept in {aside}",
                    file=sys.stderr,
                )
            raise
    if config.is_main_process:
        print(f"run folder: {run_dir}", flush=True)
    return 0


def _parents_of_default(recipe_path: Path) -> list[Path]:
    """The folders of ``runs/<recipe>/`` that do not exist yet, deepest first."""
    parent = Path("runs") / recipe_path.stem
    return [path for path in (parent, parent.parent) if not path.exists()]


def _config_file_values(argv: list[str], prog: str) -> dict[str, Any]:
    """The values of ``--config FILE``, if the command line has one."""
    early = _Parser(prog=prog, add_help=False, allow_abbrev=False)
    early.add_argument("--config", type=Path, default=None)
    known, _ = early.parse_known_args(argv)
    return read_config_file(known.config) if known.config is not None else {}


def _set_config_defaults(
    parser: argparse.ArgumentParser, values: dict[str, Any], fields: list[str]
) -> None:
    """Make a config file's values the defaults: the command line still wins.

    A key that is no option here is an error, except a plugin option of the replayed run
    left at nothing (``None`` or off), as those of a tracker plugin not installed here.
    """
    actions = {action.dest: action for action in parser._actions}
    stray = [
        key
        for key, value in values.items()
        if key not in actions and key != "plugins" and (key in fields or value not in (None, False))
    ]
    if stray:
        raise UsageError(
            f"--config: {', '.join(_flag(key) for key in stray)}: not an option of this recipe "
            "or its plugins; remove it from the file, or load the plugin that has it (-p NAME)"
        )
    defaults = {}
    for key, value in values.items():
        action = actions.get(key)
        if action is None or key == "plugins":
            continue
        if isinstance(value, str) and action.type is not None and action.nargs is None:
            try:
                value = action.type(value)
            except (TypeError, ValueError) as error:
                raise UsageError(f"--config: {_flag(key)} {value!r}: {error}") from None
        if action.choices is not None and value is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise UsageError(f"--config: {_flag(key)} {value!r}: use one of {choices}")
        defaults[key] = value
    parser.set_defaults(**defaults)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def make_deterministic() -> None:
    """Ask torch for deterministic algorithms (``--deterministic``).

    ``torch.use_deterministic_algorithms(True)`` (an operation without a deterministic
    implementation then raises), cuDNN's deterministic kernels without autotuning, and
    the cuBLAS workspace setting CUDA needs for it.
    """
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _check_out(out: Path) -> None:
    """``--out`` must be a folder, or a path where one can be made."""
    existing = next((path for path in (out, *out.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a folder; give a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out {out}: {existing} is not writable (permission denied); give a folder you "
            "can write to"
        )


def _check_fresh(run_dir: Path, options: argparse.Namespace) -> None:
    """A run that does not resume needs an empty folder, or ``--overwrite``.

    ``--resume auto`` may also start in a folder that holds a run (one relaunched before
    it wrote a checkpoint), never in one with other files.
    """
    contents = run_contents(run_dir)
    if not contents or options.overwrite:
        return
    holds_run = CONFIG_NAME in contents
    if holds_run and getattr(options, "resume", None) == "auto":
        return
    shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
    what = "a run" if holds_run or {"checkpoints", "metrics.jsonl"} & set(contents) else "files"
    raise UsageError(
        f"--out {run_dir} already holds {what} ({shown}): continue it with --resume, give "
        "another --out, or replace it with --overwrite"
    )


def _take_run_dir(
    run_dir: Path, lock: RunLock, options: argparse.Namespace, resuming: bool
) -> Path | None:
    """Create and lock the run folder; for ``--overwrite``, move the old run aside."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(run_dir, error) from None
    lock.acquire()
    if resuming and options.resume != "auto":
        return None
    _check_fresh(run_dir, options)  # again, under the lock: a run may have finished there
    if options.overwrite and run_contents(run_dir):
        return move_aside(run_dir)
    return None


class _ReplacedRun:
    """Deletes the run that ``--overwrite`` moved aside once the new run has a checkpoint."""

    def __init__(self, aside: Path) -> None:
        self.aside = aside

    def on_epoch_end(self, learner: Learner) -> None:
        if learner.run_dir is not None and (learner.run_dir / "checkpoints").is_dir():
            if any((learner.run_dir / "checkpoints").glob("*.pt")):
                remove_aside(self.aside)

    def on_fit_end(self, learner: Learner) -> None:
        if learner.exception is None:
            remove_aside(self.aside)


def predict(argv: list[str]) -> int:
    """``trainloop predict RUN_DIR [options]``: the recipe's predictions with ``model.pt``.

    Rebuilds the recipe's Learner from the run's ``config.json`` (options given here win,
    such as another ``--input-dir``), loads the weights of ``RUN_DIR/model.pt`` and calls
    the recipe's ``predict`` without training, into ``--out`` (default: a new
    ``RUN_DIR/predict/<timestamp>``).
    """
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print(
                "usage: trainloop predict RUN_DIR [options]  (options: trainloop predict RUN_DIR --help)"
            )
            return 0
        raise UsageError("give a run folder: trainloop predict RUN_DIR [options]")
    run_dir = Path(argv[0])
    saved = _read_finished_run(run_dir)
    recipe_path = Path(saved["recipe"])
    prog = f"trainloop predict {run_dir}"
    selection, _ = _plugin_selection(argv[1:], prog)
    recipe = load_recipe(recipe_path)
    if not callable(getattr(recipe, "predict", None)):
        raise UsageError(f"recipe {recipe_path} has no predict(learner, cfg) step to run")
    manager = load_plugins(selection.plugins, strict=selection.strict_plugins)

    parser = _Parser(prog=prog, allow_abbrev=False, description=recipe.__doc__)
    field_names = add_config_options(parser, recipe.Config)
    try:  # the run's values are the defaults: an option given here wins
        parser.set_defaults(**vars(config_from_dict(recipe.Config, saved.get("config") or {})))
    except (TypeError, ValueError) as error:
        raise UsageError(
            f"{run_dir / CONFIG_NAME}: its config does not fit {recipe_path} ({error})"
        ) from None
    _add_common_options(parser, field_names)
    _add_selection_options(parser)
    manager.hook.add_options(parser=parser, plugin_manager=manager)
    run_options = saved.get("options") or {}
    known = {action.dest for action in parser._actions}
    parser.set_defaults(
        **{key: run_options[key] for key in ("seed",) if key in run_options and key in known}
    )
    options = parser.parse_args(argv[1:])
    if options.overwrite:
        raise UsageError(
            "--overwrite: trainloop predict writes into a new folder; give another --out"
        )
    cfg = make_config(recipe.Config, options, field_names)
    if options.out is not None:
        _check_out(options.out)
    seed_everything(options.seed)
    made = [] if options.out or (run_dir / "predict").exists() else [run_dir / "predict"]
    out = options.out or new_run_dir("predict", root=run_dir)
    context = RunContext.from_environment()
    manager.hook.configure_context(context=context, options=options)
    config = RunConfig(options, Path(out), recipe_path, cfg, manager, context)
    lock = RunLock(config.run_dir)
    with _configured(config, lock, made):
        if config.is_main_process:
            _check_fresh(config.run_dir, options)
        learner = _build(recipe, config, selection.plugins)
        _load_weights(learner, run_dir / MODEL_NAME)
        if config.is_main_process:
            _take_run_dir(config.run_dir, lock, options, resuming=False)
            print(f"predictions of {run_dir / MODEL_NAME}: {config.run_dir}", flush=True)
            _record_run(config, cfg, ["trainloop", "predict", *argv])
        recipe.predict(learner, cfg)
    return 0


def find_lr(argv: list[str]) -> int:
    """``trainloop lr-find RECIPE [options]``: the learning-rate range test on the recipe.

    Builds the recipe's Learner as ``run`` does (the recipe's and the plugins' options,
    ``--config``, ``-p``), runs :func:`trainloop.lr_find.lr_find` on it, prints the
    suggested learning rate and writes ``lr_find.png``, ``lr_find.json`` and TensorBoard
    events into ``--out`` (default: a new ``runs/<recipe>/lr-find/<timestamp>``), which
    must be new or empty. The recipe's ``predict`` does not run.
    """
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print(
                "usage: trainloop lr-find RECIPE.py [options]  "
                "(options: trainloop lr-find RECIPE --help)"
            )
            return 0
        raise UsageError("give a recipe: trainloop lr-find RECIPE.py [options]")
    recipe_path = Path(argv[0])
    prog = f"trainloop lr-find {recipe_path}"
    selection, _ = _plugin_selection(argv[1:], prog)
    replay = _config_file_values(argv[1:], prog)
    if not selection.plugins and replay.get("plugins"):
        selection.plugins = list(replay["plugins"])
    recipe = load_recipe(recipe_path)
    manager = load_plugins(selection.plugins, strict=selection.strict_plugins)

    parser = _Parser(prog=prog, allow_abbrev=False, description=recipe.__doc__)
    field_names = add_config_options(parser, recipe.Config)
    group = parser.add_argument_group("lr-find")
    group.add_argument(
        "--start-lr",
        type=float,
        default=1e-7,
        metavar="LR",
        help="the first learning rate of the sweep (default: 1e-07)",
    )
    group.add_argument(
        "--end-lr",
        type=float,
        default=10.0,
        metavar="LR",
        help="the last learning rate of the sweep (default: 10)",
    )
    group.add_argument(
        "--steps",
        type=int,
        default=100,
        metavar="N",
        help="optimizer steps, each at the next learning rate (default: 100)",
    )
    _add_common_options(parser, field_names)
    _add_selection_options(parser)
    manager.hook.add_options(parser=parser, plugin_manager=manager)
    if replay:
        _set_config_defaults(parser, replay, field_names)
    options = parser.parse_args(argv[1:])
    cfg = make_config(recipe.Config, options, field_names)
    if not (options.start_lr > 0 and options.start_lr < float("inf")):
        raise UsageError(f"--start-lr {options.start_lr}: give a positive learning rate")
    if not (options.end_lr > options.start_lr and options.end_lr < float("inf")):
        raise UsageError(
            f"--end-lr {options.end_lr}: give a learning rate above --start-lr {options.start_lr}"
        )
    if options.steps < 2:
        raise UsageError(f"--steps {options.steps}: give at least 2 steps")
    if "epochs" not in field_names and any(arg.split("=")[0] == "--epochs" for arg in argv):
        raise UsageError("--epochs: the sweep's length is --steps (optimizer steps); leave it out")
    for flag, given in (
        ("--overwrite", options.overwrite),
        ("--resume", getattr(options, "resume", None)),
    ):
        if given:
            raise UsageError(
                f"{flag}: trainloop lr-find sweeps the recipe's new model into a new folder; "
                f"leave {flag} out (give another --out)"
            )
    if options.out is not None:
        _check_out(options.out)

    seed_everything(options.seed)
    if options.deterministic:
        make_deterministic()
    context = RunContext.from_environment()
    manager.hook.configure_context(context=context, options=options)
    run_dir = options.out or Path("runs") / recipe_path.stem / "lr-find"
    made: list[Path] = []
    if options.out is None and context.is_main_process:  # the others write nothing
        made = [path for path in (run_dir, *_parents_of_default(recipe_path)) if not path.exists()]
        run_dir = new_run_dir("lr-find", root=run_dir.parent)
    config = RunConfig(options, Path(run_dir), recipe_path, cfg, manager, context)
    lock = RunLock(config.run_dir)

    def check_empty() -> None:
        contents = run_contents(config.run_dir)
        if contents:
            shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
            raise UsageError(
                f"--out {config.run_dir} already holds files ({shown}): lr-find writes into a "
                "new or empty folder; give another --out"
            )

    from trainloop.lr_find import lr_find, write_files

    with _configured(config, lock, made):
        if config.is_main_process:
            check_empty()
        learner = _build(recipe, config, selection.plugins)
        manager.hook.check_run(config=config, learner=learner)
        if config.is_main_process:
            try:
                config.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise write_error(config.run_dir, error) from None
            lock.acquire()
            check_empty()  # again, under the lock
            print(f"lr-find folder: {config.run_dir}", flush=True)
        result = lr_find(
            learner, start_lr=options.start_lr, end_lr=options.end_lr, steps=options.steps
        )
        if result.suggestion is None:
            flags = (
                "--start-lr"
                if result.stopped in ("diverged", "not finite")
                else "--end-lr, --steps"
            )
            raise UsageError(f"lr-find: {result.problem} ({flags})")
        if config.is_main_process:
            about = {
                "recipe": str(recipe_path),
                "command": ["trainloop", "lr-find", *argv],
                "config": dataclasses.asdict(cfg),
                "options": vars(options),
                "trainloop_version": trainloop.__version__,
            }
            written = write_files(result, config.run_dir, f"lr-find: {recipe_path.stem}", about)
            print(result.summary(), flush=True)
            for path in written:
                print(path)
    return 0


@contextlib.contextmanager
def _configured(config: RunConfig, lock: RunLock, made: list[Path]) -> Iterator[None]:
    """A command's run from ``configure`` to ``unconfigure``, whatever happens in between.

    The run's context and plugin manager are current (for the recipe and the plugins);
    ``unconfigure`` runs and the run folder's lock is released at the end; on an error,
    a default folder (and the parents in ``made``) that the command created and left
    unused is removed.
    """
    manager = config.plugin_manager
    with current_run(config.context, manager):
        try:
            manager.hook.configure(config=config)
            yield
        except BaseException:
            if config.options.out is None and config.is_main_process:
                remove_if_unused(config.run_dir, made)
            raise
        finally:
            try:
                manager.hook.unconfigure(config=config)
            finally:
                lock.release()


def _read_finished_run(run_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a run folder that has a ``model.pt``, or a UsageError."""
    if not run_dir.is_dir():
        raise UsageError(
            f"{run_dir} is not a folder: give a run folder (runs/<recipe>/<timestamp>)"
        )
    if not (run_dir / CONFIG_NAME).is_file():
        raise UsageError(f"{run_dir} is not a run folder: it has no {CONFIG_NAME}")
    if not (run_dir / MODEL_NAME).is_file():
        raise UsageError(
            f"{run_dir} has no {MODEL_NAME}: the run did not finish an epoch, or ran with "
            "--no-save-model; train it to the end first (trainloop run ... --resume --out RUN_DIR)"
        )
    try:
        saved = json.loads((run_dir / CONFIG_NAME).read_text())
        saved["recipe"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"{run_dir / CONFIG_NAME}: not a trainloop run's config ({error})"
        ) from None
    return saved


def _load_weights(learner: Learner, path: Path) -> None:
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        weights = saved["model"]
    except Exception as error:
        raise UsageError(f"{path}: cannot read it ({type(error).__name__}: {error})") from None
    try:
        learner.model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UsageError(f"{path}: its weights do not fit the recipe's model ({first})") from None


def _add_common_options(parser: argparse.ArgumentParser, field_names: list[str]) -> None:
    group = parser.add_argument_group("run")
    if "epochs" not in field_names:
        group.add_argument("--epochs", type=int, default=1, metavar="N", help="epochs (default: 1)")
    if "seed" not in field_names:
        group.add_argument(
            "--seed", type=int, default=0, metavar="N", help="random seed (default: 0)"
        )
    group.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="run folder (default: a new runs/<recipe>/<timestamp>); a fresh run needs it empty",
    )
    group.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="take the options of FILE (a run's config.json, or a .toml file of option = "
        "value lines) as defaults; options given here win",
    )
    group.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN without "
        "autotuning): slower on a GPU, the same on the CPU",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (its files are moved aside, and deleted once the new "
        "run has written its first checkpoint)",
    )


def _build(recipe: Any, config: RunConfig, specs: list[str]) -> Learner:
    """The recipe's Learner, made as part of the run: with its plugin manager and context.

    Plugins the recipe passes register with the run's one plugin manager; ``-p no:NAME``
    also switches off one of them. The learner gets the run folder and the Config.
    """
    from trainloop.learner import Learner

    learner = recipe.build(config.recipe_config)  # within current_run: it joins the run
    if not isinstance(learner, Learner):
        raise UsageError(
            f"recipe {config.recipe_path}: build(cfg) returned {type(learner).__name__}, "
            "not a Learner"
        )
    if learner.plugin_manager is not config.plugin_manager:
        raise UsageError(
            f"recipe {config.recipe_path}: build(cfg) gave its Learner a plugin_manager of its "
            "own; leave it out, so that the run's plugins reach the learner"
        )
    for spec in specs:  # -p no:NAME also switches off a plugin the recipe passed
        if spec.startswith("no:") and learner.plugin_manager.has_plugin(spec[3:]):
            learner.plugin_manager.unregister(name=spec[3:])
        elif spec.startswith("no:") and spec[3:] not in _known_plugin_names():
            raise UsageError(
                f"-p {spec}: there is no plugin named {spec[3:]!r} to switch off"
                " (see 'trainloop plugins')"
            )
    if learner.run_dir is None:
        learner.run_dir = config.run_dir
    learner.config = config.recipe_config
    return learner


def _known_plugin_names() -> set[str]:
    """The built-in plugins' names and those of the installed entry points."""
    from importlib.metadata import entry_points

    from trainloop.manager import ENTRY_POINT_GROUP, builtin_plugin_names

    installed = {entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)}
    return set(builtin_plugin_names()) | installed


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random number generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _record_run(config: RunConfig, cfg: Any, command: list[str]) -> None:
    """Write ``config.json``; a resume adds itself to the ``resumes`` list of the one there.

    ``config.json`` says how the run was started and is never rewritten otherwise: each
    resume appends its time, command line, checkpoint and changed options.
    """
    path = config.run_dir / CONFIG_NAME
    resume = None
    relaunched = getattr(config.options, "resume", None) == "auto"
    if config.resumed_from is not None or relaunched:
        resume = {
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command,
            "checkpoint": str(config.resumed_from) if config.resumed_from else None,
            "changed": config.changed_options,
        }
    if resume is not None and path.exists():
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            print(f"trainloop: warning: {path} is not readable JSON ({error}); resume not recorded")
            return
        document.setdefault("resumes", []).append(resume)
        write_json_atomic(path, document)
        return
    document = {
        "recipe": str(config.recipe_path),
        "config": dataclasses.asdict(cfg),
        "options": vars(config.options),
        "trainloop_version": trainloop.__version__,
        "command": command,
        "resumes": [resume] if config.resumed_from is not None else [],
    }
    write_json_atomic(path, document)


if __name__ == "__main__":
    sys.exit(main())
