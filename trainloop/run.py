"""What the command line hands to plugins: the run's options, folder and recipe."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainloop.context import RunContext
from trainloop.manager import PluginManager


@dataclass
class RunConfig:
    """Everything :func:`~trainloop.hookspecs.configure` needs to know about a run.

    Attributes:
        options: every command-line option, parsed (``options.epochs``, plugin options).
        run_dir: the run folder (``config.json``, ``metrics.jsonl``, checkpoints, ...).
        recipe_path: the recipe file.
        recipe_config: the recipe's ``Config`` instance built from the options.
        plugin_manager: the run's one plugin manager: register per-run plugin objects
            here (a Learner the recipe builds under the CLI uses it too).
        context: the run context (device, rank, world size), shared with the learner.
        resumed_from: the checkpoint a ``--resume`` continues from, or ``None``.
        changed_options: ``{option: [old, new]}``: what a resume changes from the
            checkpoint's run (set in ``check_run``; recorded in ``config.json``).
    """

    options: argparse.Namespace
    run_dir: Path
    recipe_path: Path
    recipe_config: Any
    plugin_manager: PluginManager
    context: RunContext = field(default_factory=RunContext)
    resumed_from: Path | None = None
    changed_options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes files and prints: rank 0 of the run context."""
        return self.context.is_main_process

    @property
    def recipe_name(self) -> str:
        """The recipe's file name without ``.py``."""
        return self.recipe_path.stem
