"""tensorboard: scalars, sample images and hyperparameters for TensorBoard.

See docs/plugins/tensorboard.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
from pathlib import Path
from typing import Any

import torch

from trainloop import Learner, RunConfig, UsageError, batch_size, hookimpl

IMAGE_PREFIX = "valid_images/"
STEP_PREFIX = "batch/"


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tensorboard")
    group.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write TensorBoard event files into the run folder (default: on)",
    )
    group.add_argument(
        "--tensorboard-every",
        type=int,
        default=0,
        metavar="N",
        help="also log the training loss every N batches; each costs a device sync "
        "(default: 0, off)",
    )
    group.add_argument(
        "--tensorboard-images",
        type=int,
        default=4,
        metavar="K",
        help="show the first K validation samples each epoch, for tasks that "
        "implement render_batch (default: 4; 0 is off)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    for option, value in (
        ("--tensorboard-every", options.tensorboard_every),
        ("--tensorboard-images", options.tensorboard_images),
    ):
        if value < 0:
            raise UsageError(f"{option} {value}: give a number, 0 or more (0 is off)")
    if options.tensorboard and config.is_main_process:
        logger = TensorBoardLogger(
            config.run_dir, every=options.tensorboard_every, images=options.tensorboard_images
        )
        config.plugin_manager.register(logger, "tensorboard.logger")


class TensorBoardLogger:
    """Writes the metrics, sample images and hyperparameters of ``fit`` for TensorBoard.

    Args:
        log_dir: the folder for the event files (default: ``learner.run_dir``).
        every: also log ``batch/train_loss`` and ``batch/lr`` every ``every`` training
            batches (0: off; each logged batch costs a device sync).
        images: how many validation samples to render each epoch with the
            ``render_batch`` hook (0: off).
        hparams: the hyperparameters to record at the end of fit (default: the
            recipe's Config, ``learner.config``, as a flat dict).

    Attributes:
        writer: the ``tensorboardX.SummaryWriter`` while ``fit`` runs, else ``None``.
        log_dir: where the event files go (known once ``fit`` has begun).
    """

    def __init__(
        self,
        log_dir: str | Path | None = None,
        every: int = 0,
        images: int = 4,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        if every < 0 or images < 0:
            raise ValueError(f"TensorBoardLogger(every={every}, images={images}): use 0 or more")
        if hparams is not None:
            flat_hparams(hparams)  # a TypeError now rather than at the end of fit
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.every = every
        self.images = images
        self.hparams = hparams
        self.writer: Any = None
        self._samples: _ValidationSamples | None = None
        self._batches: _BatchScalars | None = None
        self._renders = False

    # --- fit ---------------------------------------------------------------------------

    @hookimpl(trylast=True)  # after a resuming plugin has set learner.epoch
    def on_fit_begin(self, learner: Learner) -> None:
        if not learner.context.is_main_process:
            return
        if self.log_dir is None:
            if learner.run_dir is None:
                raise ValueError("TensorBoardLogger needs a log_dir or a learner with run_dir")
            self.log_dir = learner.run_dir
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(self.log_dir))
        self._renders = self.images > 0 and bool(learner.hook.render_batch.get_hookimpls())
        if self.every:  # a per-batch hook only when asked for: none by default
            self._batches = _BatchScalars(self.writer, self.every)
            learner.add_plugin(self._batches, "tensorboard.batches")

    def on_fit_end(self, learner: Learner) -> None:
        self._stop_watching(learner)
        if self._batches is not None:
            learner.plugin_manager.unregister(self._batches)
            self._batches = None
        if self.writer is None:
            return
        try:
            self._write_hparams(learner)
        finally:
            self.writer.close()
            self.writer = None

    @hookimpl(trylast=True)  # after every plugin has added its metrics
    def on_epoch_end(self, learner: Learner) -> None:
        if self.writer is None:
            return
        for key, value in learner.metrics.items():
            number = _number(value)
            if number is not None:
                self.writer.add_scalar(key, number, learner.epoch)
        self.writer.flush()

    # --- sample images -----------------------------------------------------------------

    def on_valid_begin(self, learner: Learner) -> None:
        if self.writer is None or not self._renders:
            return
        # Watch the validation batches with a plugin of its own, registered only until
        # it has the samples: training batches never pay for it.
        self._samples = _ValidationSamples(self.images)
        learner.add_plugin(self._samples)

    def on_valid_end(self, learner: Learner) -> None:
        samples = self._samples
        if samples is None:
            return
        self._stop_watching(learner)
        if not samples.batches:
            return
        with torch.no_grad():
            pictures = learner.hook.render_batch(
                learner=learner, batch=_concat(samples.batches), pred=_concat(samples.preds)
            )
        if pictures is None:
            return
        if not isinstance(pictures, dict):
            raise TypeError(
                f"render_batch returned {type(pictures).__name__}: return a dict "
                "{name: 3 x H x W image tensor} or None"
            )
        for name, picture in pictures.items():
            self._add_picture(name, picture, learner.epoch)

    def _add_picture(self, name: str, picture: Any, epoch: int) -> None:
        image = torch.as_tensor(picture).detach().float().clamp(0, 1).cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3):
            self.writer.add_image(IMAGE_PREFIX + name, image, epoch, dataformats="CHW")
        elif image.dim() == 4 and image.shape[1] in (1, 3):
            self.writer.add_images(IMAGE_PREFIX + name, image, epoch, dataformats="NCHW")
        else:
            raise ValueError(
                f"render_batch returned image {name!r} of shape {tuple(image.shape)}: "
                "expected 3 x H x W (or N x 3 x H x W), values in [0, 1]"
            )

    def _stop_watching(self, learner: Learner) -> None:
        if self._samples is not None:
            if learner.plugin_manager.is_registered(self._samples):
                learner.plugin_manager.unregister(self._samples)
            self._samples = None

    # --- hyperparameters ---------------------------------------------------------------

    def _write_hparams(self, learner: Learner) -> None:
        config = self.hparams if self.hparams is not None else learner.config
        if not learner.history or not _is_config(config):
            return
        hparams = flat_hparams(config)
        hparams.setdefault("epochs", learner.epochs)
        final = {
            key: number
            for key, value in learner.history[-1].items()
            if key != "epoch" and (number := _number(value)) is not None
        }
        from tensorboardX.summary import hparams as hparams_summaries

        # Into this run's own file, not tensorboardX's add_hparams sub-folder: the
        # HParams dashboard then shows this run, its metrics being its scalars above.
        experiment, session_start, session_end = hparams_summaries(hparams, final)
        file_writer = self.writer.file_writer
        file_writer.add_summary(experiment)
        file_writer.add_summary(session_start)
        if learner.exception is None:
            file_writer.add_summary(session_end)


class _BatchScalars:
    """Logs ``batch/train_loss`` and ``batch/lr`` every ``every`` training batches."""

    def __init__(self, writer: Any, every: int) -> None:
        self.writer = writer
        self.every = every

    def on_batch_end(self, learner: Learner) -> None:
        if not learner.training or learner.step % self.every:
            return
        if learner.loss is not None:
            self.writer.add_scalar(STEP_PREFIX + "train_loss", learner.loss.item(), learner.step)
        lr = learner.optimizer.param_groups[0]["lr"]
        self.writer.add_scalar(STEP_PREFIX + "lr", float(lr), learner.step)


class _ValidationSamples:
    """Keeps copies of the first ``limit`` validation samples and their predictions."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.batches: list[Any] = []
        self.preds: list[Any] = []

    def on_batch_end(self, learner: Learner) -> None:
        if learner.training or self.count >= self.limit:
            return
        need = self.limit - self.count
        self.batches.append(_first(learner.batch, need))
        self.preds.append(_first(learner.pred, need))
        self.count += min(need, batch_size(learner.batch))
        if self.count >= self.limit:  # done: stop costing a hook call per batch
            learner.plugin_manager.unregister(self)


def flat_hparams(config: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """``config`` (a dataclass or a dict) as a flat dict of TensorBoard-friendly values.

    Nested dataclasses and dicts become ``outer.inner`` keys; values other than bools,
    numbers and strings (paths, tuples, ``None``) become strings.
    """
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    if not isinstance(config, dict):
        raise TypeError(f"hparams must be a dataclass or a dict, not {type(config).__name__}")
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if _is_config(value):
            flat.update(flat_hparams(value, prefix=f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _is_config(value: Any) -> bool:
    """Whether :func:`flat_hparams` can flatten ``value``: a dict or a dataclass instance."""
    return isinstance(value, dict) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return None


def _first(value: Any, count: int) -> Any:
    """The first ``count`` samples of a batch (or prediction), copied."""
    if isinstance(value, torch.Tensor):
        # A copy: a view would keep the whole batch alive.
        return value[:count].detach().clone() if value.dim() else value
    if isinstance(value, (tuple, list)) and _plain(value):
        if _per_sample(value):  # such as the ids of the samples: one entry per sample
            return value[:count]
        return type(value)(_first(item, count) for item in value)
    if isinstance(value, dict):
        return {key: _first(item, count) for key, item in value.items()}
    return value


def _concat(pieces: list[Any]) -> Any:
    """Join the pieces :func:`_first` kept from several batches into one batch."""
    first = pieces[0]
    if len(pieces) == 1:
        return first
    if isinstance(first, torch.Tensor) and first.dim():
        try:
            return torch.cat(pieces)
        except RuntimeError:  # samples of different sizes: show the first batch's
            return first
    if isinstance(first, (tuple, list)) and _plain(first):
        if _per_sample(first):
            return type(first)(item for piece in pieces for item in piece)
        return type(first)(_concat([piece[i] for piece in pieces]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: _concat([piece[key] for piece in pieces]) for key in first}
    return first


def _plain(sequence: tuple | list) -> bool:
    """Whether ``type(sequence)(iterable)`` rebuilds it (not a namedtuple)."""
    return type(sequence) in (tuple, list)


def _per_sample(sequence: tuple | list) -> bool:
    """Whether a sequence in a batch holds one plain value per sample (ids, names),
    rather than the batch's fields (``(inputs, target)``)."""
    return bool(sequence) and all(
        isinstance(item, (str, bytes, numbers.Number)) for item in sequence
    )
