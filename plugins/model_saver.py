"""model_saver: the model's weights as ``model.pt`` (best or last epoch), and rebuilding a model from it.

See docs/plugins/model_saver.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from trainloop import Learner, RunConfig, hookimpl
from trainloop.monitor import Monitor, add_monitor_options, monitored_value
from trainloop.recipe import config_from_dict
from trainloop.run_folder import atomic_save
from trainloop.sharded import full_state_dict, is_sharded, load_full_state_dict
from trainloop.state import json_safe

FORMAT = "trainloop-model"
VERSION = 1
FILE_NAME = "model.pt"
CHECKPOINT_KEY = "model_saver"


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model_saver")
    group.add_argument(
        "--save-model",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write model.pt (the best epoch's weights by --monitor) at the end (default: on)",
    )
    group.add_argument(
        "--predict-with",
        choices=("best", "last"),
        default="best",
        help="the weights the recipe's predictions use after training: the best epoch's by "
        "--monitor, or the last epoch's (default: best)",
    )
    add_monitor_options(parser)


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    if options.save_model:
        plugin = ModelSaver(
            config.run_dir / FILE_NAME,
            monitor=Monitor(options.monitor, options.mode),
            recipe=str(config.recipe_path),
            write=config.is_main_process,
            predict_with=options.predict_with,
        )
        config.plugin_manager.register(plugin, "model_saver.writer")


class ModelSaver:
    """Writes the trained (best) weights and the config that rebuilds them at ``fit`` end.

    Args:
        path: the file (default: ``learner.run_dir / "model.pt"``).
        monitor: which epoch is best (a :class:`~trainloop.monitor.Monitor`, of which
            the plugin keeps its own copy, or a metric name); ``None`` saves the final
            weights.
        recipe: the recipe path or name to record, for :func:`rebuild`.
        write: whether this process writes (``False`` on all but the main process).
        predict_with: ``"best"``: a ``predict`` after ``fit`` first loads the best epoch's
            weights into the model (and says which epoch); ``"last"``: it leaves the
            model as ``fit`` left it.

    Attributes:
        best_metrics: the metrics of the best epoch so far (with ``epoch``), or ``None``.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        monitor: Monitor | str | None = None,
        recipe: str | None = None,
        write: bool = True,
        predict_with: str = "best",
    ) -> None:
        if predict_with not in ("best", "last"):
            raise ValueError(f"ModelSaver(predict_with={predict_with!r}): use 'best' or 'last'")
        self.path = Path(path) if path is not None else None
        self.predict_with = predict_with
        # A copy: a Monitor shared with another plugin would see each value twice.
        self.monitor = Monitor(monitor) if isinstance(monitor, str) else copy.copy(monitor)
        self.recipe = recipe
        self.write = write
        self.best_metrics: dict[str, Any] | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._best_step: int | None = None
        self._said = False

    @hookimpl(tryfirst=True)  # reset before the checkpoint plugin restores the state
    def on_fit_begin(self, learner: Learner) -> None:
        if self.path is None:
            if learner.run_dir is None:
                raise ValueError("ModelSaver needs a path or a learner with run_dir")
            self.path = Path(learner.run_dir) / FILE_NAME
        self.best_metrics = self._best_weights = self._best_step = None
        self._said = False  # which epoch's weights predict uses: said once a fit
        if self.monitor is not None:
            self.monitor.best = None

    @hookimpl(trylast=True)  # after every plugin has added its metrics
    def on_epoch_end(self, learner: Learner) -> None:
        if self.monitor is None or monitored_value(self.monitor, learner) is None:
            return
        if self.monitor.update(learner.metrics):
            self._best_weights = full_state_dict(learner.model)  # every process: it gathers
            self.best_metrics = {"epoch": learner.epoch, **learner.metrics}
            self._best_step = learner.step

    def on_predict_begin(self, learner: Learner) -> None:
        if self.predict_with != "best" or self._best_weights is None:
            return
        last = self._best_step == learner.step  # the model holds the best weights already
        if not last:
            load_full_state_dict(learner.model, self._best_weights)
            self._best_step = learner.step  # loaded once: a second predict keeps them
        if self.write and not self._said:
            self._said = True
            metric = self.monitor.metric
            value = (self.best_metrics or {}).get(metric)
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            epoch = self.best_metrics["epoch"] + 1
            if last:
                print(
                    f"predicting with the weights of epoch {epoch}, the last and the best by "
                    f"{metric} ({shown})",
                    flush=True,
                )
            else:
                print(
                    f"predicting with the weights of epoch {epoch}, the best by {metric} "
                    f"({shown}); --predict-with last keeps the last epoch's",
                    flush=True,
                )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        step = checkpoint.get("learner", {}).get("step")
        # The checkpoint's "model" is the weights to resume training from, which need not
        # be those the epoch was judged by (a weight average validates its own): compare.
        same_as_model = (
            self._best_step is not None
            and step == self._best_step
            and _same_weights(checkpoint.get("model"), self._best_weights)
        )
        checkpoint[CHECKPOINT_KEY] = {
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
            "metrics": json_safe(self.best_metrics),
            "step": self._best_step,
            # None: the checkpoint's own "model" is the best (saves writing it twice)
            "model": None if same_as_model else self._best_weights,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        if self.monitor is not None and state["monitor"] is not None:
            self.monitor.load_state_dict(state["monitor"])
        self.best_metrics = state["metrics"]
        self._best_step = state["step"]
        weights = state["model"]
        if weights is None and self.best_metrics is not None:
            weights = checkpoint["model"]
        self._best_weights = weights

    def on_fit_end(self, learner: Learner) -> None:
        error = learner.exception
        if not (error is None or isinstance(error, KeyboardInterrupt)):
            return
        # A sharded model's weights are gathered by every process; others are read by
        # the one that writes.
        if not self.write and not is_sharded(learner.model):
            return
        if self._best_weights is not None:
            weights, metrics = self._best_weights, self.best_metrics or {}
        elif error is not None:
            return  # stopped mid-batch: the live weights may be half-way through a step
        else:
            weights = full_state_dict(learner.model)
            metrics = learner.history[-1] if learner.history else {}
        if not self.write:
            return
        config = learner.config
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
        saved = {
            "format": FORMAT,
            "version": VERSION,
            "model": weights,
            "config": json_safe(config) if config is not None else None,
            "recipe": self.recipe,
            "metrics": json_safe(metrics),
        }
        atomic_save(saved, self.path)


def _same_weights(state: dict[str, Any] | None, weights: dict[str, torch.Tensor] | None) -> bool:
    if state is None or weights is None or state.keys() != weights.keys():
        return False
    return all(torch.equal(state[name].detach().cpu(), weights[name]) for name in weights)


def rebuild(path: str | Path, recipe: str | Path | None = None) -> Learner:
    """The recipe's Learner with the weights of ``model.pt`` at ``path`` loaded.

    Imports ``recipe`` (default: the one recorded in the file), rebuilds its
    ``Config`` from the saved values and calls ``build(cfg)`` (which loads the recipe's
    data), then loads the weights into ``learner.model``.
    """
    from trainloop.recipe import load_recipe

    saved = torch.load(path, map_location="cpu", weights_only=True)
    recipe = recipe if recipe is not None else saved.get("recipe")
    if recipe is None:
        raise ValueError(f"{path} records no recipe: pass rebuild(path, recipe=...)")
    module = load_recipe(recipe)
    learner = module.build(config_from_dict(module.Config, saved.get("config") or {}))
    learner.model.load_state_dict(saved["model"])
    return learner
