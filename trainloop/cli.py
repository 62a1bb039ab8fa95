"""The ``trainloop`` command: ``run`` a recipe, list ``plugins``, print ``--version``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

import trainloop
from trainloop.errors import TrainingError, UsageError
from trainloop.learner import Learner
from trainloop.manager import PluginManager
from trainloop.recipe import add_config_options, load_recipe, make_config
from trainloop.run import RunConfig

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
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
    except KeyboardInterrupt:
        print("trainloop: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into a reader that quit (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:
        if debug:
            traceback.print_exc()
        notes = "; ".join(getattr(error, "__notes__", ()))
        where = f" ({notes})" if notes else ""
        print(f"trainloop: error: {type(error).__name__}: {error}{where}", file=sys.stderr)
        if not debug:
            print("trainloop: run again with --debug for the traceback", file=sys.stderr)
        return 1


def _dispatch(argv: list[str]) -> int:
    parser = _Parser(
        prog="trainloop",
        description="trainloop: run a recipe, list plugins, print the version.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"trainloop {trainloop.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "run", help="run a recipe: trainloop run RECIPE.py [options]", add_help=False
    )
    commands.add_parser("plugins", help="list the plugins, where they come from, their hooks")
    if not argv or argv[0] not in ("run", "plugins"):
        parser.parse_args(argv or ["--help"])
        raise UsageError(f"unknown command {argv[0]!r}: use 'run' or 'plugins'")
    if argv[0] == "plugins":
        return list_plugins(argv[1:])
    return run(argv[1:])


class _PluginSpecs(list):
    """The ``-p`` values in order, carrying ``--strict-plugins`` along to ``load_plugins``."""

    strict = False


def _plugin_selection(argv: list[str], prog: str) -> tuple[argparse.Namespace, list[str]]:
    """Parse the options that decide which plugins load, before the plugins add theirs."""
    early = _Parser(prog=prog, add_help=False, allow_abbrev=False)
    _add_selection_options(early)
    selection, rest = early.parse_known_args(argv)
    selection.plugins = _PluginSpecs(selection.plugins)
    selection.plugins.strict = selection.strict_plugins
    return selection, rest


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


def load_plugins(specs: list[str], strict: bool | None = None) -> PluginManager:
    """A plugin manager with the built-ins, entry points and ``-p`` plugins loaded.

    An installed plugin that fails to load is left out with a one-line warning (on the
    first process only), or, when ``strict`` (``--strict-plugins``), is a UsageError.
    ``strict`` defaults to what ``_plugin_selection`` parsed along with ``specs``.
    """
    if strict is None:
        strict = getattr(specs, "strict", False)
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
                f" {failure.distribution.rpartition(' ')[0]}, or {remedy}"
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
    selection = parser.parse_args(argv)
    manager = load_plugins(selection.plugins, strict=selection.strict_plugins)
    table = Table("plugin", "origin", "hooks", title="trainloop plugins")
    for name, plugin in manager.list_name_plugin():
        if plugin is None:
            continue
        hooks = ", ".join(manager.implemented_hooks(plugin))
        table.add_row(name, manager.origins.get(name, "?"), hooks)
    for failure in manager.failed.values():
        reason = Text(f"failed to load: {failure.error}", style="red")
        table.add_row(failure.name, f"entry point ({failure.distribution})", reason)
    Console(width=max(120, Console().width)).print(table)
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
    recipe = load_recipe(recipe_path)
    manager = load_plugins(selection.plugins)

    parser = _Parser(prog=prog, allow_abbrev=False, description=recipe.__doc__)
    field_names = add_config_options(parser, recipe.Config)
    _add_common_options(parser, field_names)
    _add_selection_options(parser)
    manager.hook.add_options(parser=parser, plugin_manager=manager)
    options = parser.parse_args(argv[1:])
    cfg = make_config(recipe.Config, options, field_names)
    if options.epochs < 0:
        raise UsageError(f"--epochs {options.epochs}: give a number of epochs, 0 or more")

    seed_everything(options.seed)
    run_dir = options.out or manager.hook.make_run_dir(options=options, recipe_path=recipe_path)
    run_dir = Path(run_dir or _new_run_dir(recipe_path))
    existing = next(path for path in (run_dir, *run_dir.parents) if path.exists())
    if not existing.is_dir():
        raise UsageError(f"--out {run_dir}: {existing} is a file, not a folder; give a folder")
    config = RunConfig(options, run_dir, recipe_path, cfg, manager)
    manager.hook.configure(config=config)
    try:
        learner = recipe.build(cfg)
        if not isinstance(learner, Learner):
            raise UsageError(
                f"recipe {recipe_path}: build(cfg) returned {type(learner).__name__}, not a Learner"
            )
        _attach(learner, manager, selection.plugins, run_dir, cfg)
        # made only now, so that a recipe that fails on bad input leaves no folder behind
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.is_main_process:
            print(f"run folder: {run_dir}", flush=True)
            _write_config(run_dir / "config.json", recipe_path, cfg, options)
        learner.fit(options.epochs)
        if callable(getattr(recipe, "predict", None)):
            recipe.predict(learner, cfg)
    finally:
        manager.hook.unconfigure(config=config)
    if config.is_main_process:
        print(f"run folder: {run_dir}", flush=True)
    return 0


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
        help="run folder (default: runs/<recipe>/<timestamp>)",
    )


def _attach(
    learner: Learner, manager: PluginManager, specs: list[str], run_dir: Path, cfg: Any
) -> None:
    """Give the recipe's Learner the run's plugins, folder and config."""
    for name, plugin in manager.list_name_plugin():
        if plugin is None or learner.plugin_manager.is_registered(plugin):
            continue
        free_name = None if learner.plugin_manager.has_plugin(name) else name
        learner.add_plugin(plugin, free_name, origin=manager.origins.get(name, "api"))
    for spec in specs:  # -p no:NAME also switches off a plugin the recipe passed
        if spec.startswith("no:") and learner.plugin_manager.has_plugin(spec[3:]):
            learner.plugin_manager.unregister(name=spec[3:])
        elif spec.startswith("no:") and spec[3:] not in _known_plugin_names():
            raise UsageError(
                f"-p {spec}: there is no plugin named {spec[3:]!r} to switch off"
                " (see 'trainloop plugins')"
            )
    if learner.run_dir is None:
        learner.run_dir = run_dir
    learner.config = cfg


def _known_plugin_names() -> set[str]:
    """The built-in plugins' names and those of the installed entry points."""
    from importlib.metadata import entry_points

    from trainloop.manager import ENTRY_POINT_GROUP, builtin_plugin_names

    installed = {entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)}
    return set(builtin_plugin_names()) | installed


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random number generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _new_run_dir(recipe_path: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / recipe_path.stem / stamp
    candidate, number = base, 2
    while candidate.exists():
        candidate, number = base.with_name(f"{stamp}-{number}"), number + 1
    return candidate


def _write_config(path: Path, recipe_path: Path, cfg: Any, options: argparse.Namespace) -> None:
    document = {
        "recipe": str(recipe_path),
        "config": dataclasses.asdict(cfg),
        "options": vars(options),
        "trainloop_version": trainloop.__version__,
        "command": sys.argv,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
