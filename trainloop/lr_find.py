"""The learning-rate range test: sweep the lr up, watch the loss, put everything back.

See docs/lr-find.md. :func:`lr_find` runs the learner's own training steps (so device,
AMP, accumulation and DDP plugins take part) and restores the model, the optimizer,
the random number generators, the loop's counters and the plugins' state exactly from
copies kept in memory; :meth:`LRFindResult.plot` draws the curve with PIL and
:func:`write_tensorboard` logs it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainloop.errors import StopFit
from trainloop.hookspecs import hookimpl
from trainloop.run_folder import write_json_atomic
from trainloop.state import capture_rng_state, json_safe, set_rng_state

if TYPE_CHECKING:
    from trainloop.learner import Learner
    from trainloop.manager import PluginManager

TRAINING_HOOKS = frozenset(
    {
        "place_model",
        "compile_model",
        "wrap_model",
        "setup_data",
        "transfer_batch",
        "forward",
        "get_target",
        "compute_loss",
        "backward",
        "should_step",
        "optimizer_step",
        "zero_grad",
        "reduce_tensor",
        "on_step_begin",
    }
)
"""A plugin that implements one of these hooks takes part in the sweep (see
:func:`sweep_plugins`): it sets up the model or the data, owns or wraps a step of
training, or rescales the gradients before the optimizer steps."""

COMMAND_LINE_HOOKS = frozenset(
    {"add_options", "configure", "configure_context", "make_run_dir", "check_run", "unconfigure"}
)
"""Hooks the command line calls, never the learner: a plugin with only these (a built-in
plugin's module, which registers its per-run objects in ``configure``) stays as it is."""

METHOD = "steepest descent of the smoothed loss"
"""How :func:`lr_find` picks its suggestion."""

STOP_REASONS = {
    "steps": "it took every step",
    "diverged": "the smoothed loss diverged",
    "not finite": "the loss was not finite",
    "data": "the training data ran out",
}
"""The values of :attr:`LRFindResult.stopped`, and what each means."""

PLOT_SIZE = (800, 500)
"""The size of the picture :meth:`LRFindResult.plot` draws, in pixels (width, height)."""

_RECORDER_NAME = "lr_find.range-test"
_COLOURS = {
    "text": (40, 40, 40),
    "grid": (228, 228, 228),
    "axis": (90, 90, 90),
    "loss": (185, 185, 185),
    "smoothed": (31, 119, 180),
    "suggestion": (214, 39, 40),
}


@dataclass
class LRFindResult:
    """What a learning-rate range test found.

    Attributes:
        lrs: the learning rate of each optimizer step taken (of the first parameter
            group; the others kept their ratio to it).
        losses: the training loss of each step (the mean over the batches of the step,
            and over the processes under DDP), before the optimizer stepped.
        smoothed: ``losses`` smoothed by an exponential moving average (bias-corrected).
        suggestion: the suggested learning rate, where the smoothed loss falls fastest
            against ``log(lr)``; ``None`` when there is none (see :attr:`problem`).
        suggestion_index: the step of the suggestion in ``lrs``, or ``None``.
        stopped: why the sweep ended, one of :data:`STOP_REASONS`: ``"steps"``,
            ``"diverged"`` (the smoothed loss went above ``diverge`` times its best),
            ``"not finite"`` or ``"data"``.
        start_lr: the first learning rate of the sweep asked for.
        end_lr: the last learning rate of the sweep asked for.
        steps: the number of steps asked for.
        seconds: how long the sweep took, restoring included.
        set_aside: the plugins that did not take part (see :func:`sweep_plugins`).
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    suggestion_index: int | None
    stopped: str
    start_lr: float
    end_lr: float
    steps: int
    seconds: float = 0.0
    set_aside: list[str] = field(default_factory=list)

    @property
    def problem(self) -> str | None:
        """Why there is no suggestion, in one sentence; ``None`` when there is one."""
        if self.suggestion is not None:
            return None
        if self.stopped in ("diverged", "not finite"):
            return (
                f"the loss diverged within the first {len(self.lrs)} steps (at lr "
                f"{self.lrs[-1]:.3g}), before it went down: start the sweep at a lower lr"
            )
        return (
            f"the smoothed loss did not go down between lr {self.start_lr:.3g} and "
            f"{self.lrs[-1] if self.lrs else self.end_lr:.3g}: sweep up to a higher lr, or "
            "over more steps"
        )

    def summary(self) -> str:
        """One line: the suggestion, how it was chosen and how the sweep went."""
        last = self.lrs[-1] if self.lrs else self.start_lr
        if self.stopped == "steps":
            how = f"{len(self.lrs)} steps from {self.start_lr:.3g} to {last:.3g}"
        else:
            how = (
                f"{len(self.lrs)} of {self.steps} steps from {self.start_lr:.3g}, stopped at lr "
                f"{last:.3g}: {STOP_REASONS[self.stopped]}"
            )
        if self.suggestion is None:
            return f"no suggested lr: {self.problem} ({how})"
        return f"suggested lr: {self.suggestion:.3g} ({METHOD}; {how}; {self.seconds:.1f}s)"

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON types (a non-finite loss becomes ``None``)."""
        return {
            "suggestion": self.suggestion,
            "suggestion_index": self.suggestion_index,
            "method": METHOD,
            "stopped": self.stopped,
            "start_lr": self.start_lr,
            "end_lr": self.end_lr,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "set_aside": list(self.set_aside),
            "lrs": list(self.lrs),
            "losses": [_finite_or_none(value) for value in self.losses],
            "smoothed": [_finite_or_none(value) for value in self.smoothed],
        }

    def plot(self, path: str | Path, title: str = "learning-rate range test") -> Path:
        """Draw the loss against the learning rate (log scale) into a PNG at ``path``.

        The raw loss is grey, the smoothed loss blue, the suggestion a red dashed line
        with its value; the picture is :data:`PLOT_SIZE`. Returns ``path``.
        """
        path = Path(path)
        _draw(self, title).save(path, format="PNG")
        return path


def lr_find(
    learner: Learner,
    start_lr: float = 1e-7,
    end_lr: float = 10,
    steps: int = 100,
    smooth: float = 0.98,
    diverge: float = 4.0,
    keep: Iterable[str] = (),
) -> LRFindResult:
    """Run the learning-rate range test on ``learner`` and put everything back.

    The learning rate grows exponentially from ``start_lr`` to ``end_lr`` over
    ``steps`` optimizer steps of the learner's own ``fit`` (over as many epochs as that
    takes, without validation), recording the loss of each step, and stops early when
    the smoothed loss goes above ``diverge`` times the best so far or is not finite.
    Afterwards the model's parameters, buffers and gradients, the optimizer's state and
    hyperparameters, every random number generator, the learner's counters and history,
    and the state the sweeping plugins keep in checkpoints are what they were, from
    copies in memory: a ``fit`` after ``lr_find`` is the ``fit`` it would have been.

    Only the plugins that take part in a training step run during the sweep; the others
    (checkpoints, metrics files, TensorBoard, progress, schedules, early stopping, ...)
    are set aside and registered again afterwards, in their order: see
    :func:`sweep_plugins`.

    Example::

        result = lr_find(learn)
        print(result.summary())        # suggested lr: 0.0316 (...)
        result.plot("lr_find.png")

    Args:
        learner: the learner to sweep.
        start_lr: the first learning rate (of the first parameter group; the other
            groups keep their ratio to it).
        end_lr: the last learning rate.
        steps: how many optimizer steps (learning rates), at least 2.
        smooth: the factor of the exponential moving average of the loss, in [0, 1).
        diverge: stop once the smoothed loss is above this many times its lowest value.
        keep: names of plugins to keep in the sweep besides those
            :func:`sweep_plugins` keeps.

    Returns:
        An :class:`LRFindResult`. Its ``suggestion`` is the steepest descent of the
        smoothed loss against ``log(lr)``, or ``None`` (``problem`` says why).
    """
    _check_range(start_lr, end_lr, steps, smooth, diverge)
    began = time.perf_counter()
    learner.setup()  # before the copies: a wrapper may replace parameters (FSDP)
    lrs = np.geomspace(start_lr, end_lr, steps).tolist()
    _, set_aside = sweep_plugins(learner.plugin_manager, keep)
    recorder = _RangeTest(lrs, smooth, diverge, learner.optimizer)
    with _PutBack(learner, set_aside):
        learner.add_plugin(recorder, _RECORDER_NAME, origin="lr_find")
        try:
            learner.fit(steps)  # each epoch takes at least one step; StopFit ends it
        finally:
            learner.plugin_manager.unregister(recorder)
            recorder.restore_plugins(learner)
    index = suggest(recorder.lrs_done, recorder.smoothed, skip=steps // 10)
    return LRFindResult(
        lrs=recorder.lrs_done,
        losses=recorder.losses,
        smoothed=recorder.smoothed,
        suggestion=recorder.lrs_done[index] if index is not None else None,
        suggestion_index=index,
        stopped=recorder.stopped,
        start_lr=float(start_lr),
        end_lr=float(end_lr),
        steps=steps,
        seconds=time.perf_counter() - began,
        set_aside=set_aside,
    )


def sweep_plugins(manager: PluginManager, keep: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Split the registered plugins into those that take part in the sweep and the others.

    A plugin takes part when it implements one of :data:`TRAINING_HOOKS` (the device,
    compile, distributed, precision, gradient accumulation and clipping plugins, and
    the core's steps), or when its name is in ``keep``. The others that implement a
    hook of the learner only watch the loop (they write checkpoints, metrics,
    TensorBoard events and predictions, show progress, schedule the lr, stop early,
    check for NaN) and are set aside during the sweep, so that it writes nothing and
    disturbs no schedule. ``iter_train_data`` does not count: the checkpoint plugin
    implements it to resume in the middle of an epoch, and the sweep starts from the
    beginning of the data. Plugins with only :data:`COMMAND_LINE_HOOKS` are in neither
    list: the learner never calls them.

    Returns:
        ``(kept, set_aside)``: plugin names, each in registration order.
    """
    keep = set(keep)
    unknown = sorted(keep - {name for name, plugin in manager.list_name_plugin() if plugin})
    if unknown:
        raise ValueError(f"lr_find(keep={unknown}): no plugin of that name is registered")
    kept, set_aside = [], []
    for name, plugin in manager.list_name_plugin():
        if plugin is None:  # a blocked name
            continue
        hooks = {caller.name for caller in manager.get_hookcallers(plugin) or ()}
        if hooks <= COMMAND_LINE_HOOKS and name not in keep:
            continue
        (kept if name in keep or hooks & TRAINING_HOOKS else set_aside).append(name)
    return kept, set_aside


def suggest(lrs: list[float], smoothed: list[float], skip: int = 0) -> int | None:
    """The index of the steepest descent of ``smoothed`` against ``log10(lrs)``, or ``None``.

    Looks at the points from ``skip`` (the first ones are noisy: the average has seen
    few losses) up to the lowest smoothed loss (after it the loss only rises), and
    returns ``None`` when they are fewer than three or the loss does not fall there.
    """
    values = np.asarray(smoothed, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return None
    lowest = int(np.argmin(np.where(finite, values, np.inf)))
    if lowest - skip < 2 or not finite[skip : lowest + 1].all():
        return None
    logs = np.log10(np.asarray(lrs[skip : lowest + 1], dtype=np.float64))
    slopes = np.gradient(values[skip : lowest + 1], logs)
    steepest = int(np.argmin(slopes))
    return skip + steepest if slopes[steepest] < 0 else None


def write_tensorboard(
    result: LRFindResult, log_dir: str | Path, picture: Path | None = None
) -> Path:
    """Log the curve for TensorBoard in ``log_dir``; return the event file's path.

    Scalars per step: ``lr_find/loss``, ``lr_find/smoothed_loss`` and ``lr_find/lr``;
    ``lr_find/suggested_lr`` at step 0 when there is a suggestion; and the PNG of
    :meth:`LRFindResult.plot` as the image ``lr_find/plot`` when ``picture`` is given.
    """
    from tensorboardX import SummaryWriter

    log_dir = Path(log_dir)
    before = set(log_dir.glob("events.out.tfevents.*"))
    writer = SummaryWriter(logdir=str(log_dir))
    try:
        for step, (lr, loss, smoothed) in enumerate(
            zip(result.lrs, result.losses, result.smoothed)
        ):
            writer.add_scalar("lr_find/lr", lr, step)
            if math.isfinite(loss):
                writer.add_scalar("lr_find/loss", loss, step)
            if math.isfinite(smoothed):
                writer.add_scalar("lr_find/smoothed_loss", smoothed, step)
        if result.suggestion is not None:
            writer.add_scalar("lr_find/suggested_lr", result.suggestion, 0)
        if picture is not None:
            from PIL import Image

            with Image.open(picture) as image:
                pixels = np.asarray(image.convert("RGB"))
            writer.add_image("lr_find/plot", pixels, 0, dataformats="HWC")
    finally:
        writer.close()
    return max(set(log_dir.glob("events.out.tfevents.*")) - before)


def write_files(
    result: LRFindResult,
    folder: str | Path,
    title: str = "learning-rate range test",
    about: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``lr_find.png``, ``lr_find.json`` and TensorBoard events into ``folder``.

    ``lr_find.json`` holds :meth:`LRFindResult.to_dict` after the entries of ``about``
    (the command line writes the recipe, the command, the Config and the options there).
    Returns the paths written.
    """
    folder = Path(folder)
    picture = result.plot(folder / "lr_find.png", title)
    document = {**json_safe(about or {}), **result.to_dict()}
    record = folder / "lr_find.json"
    write_json_atomic(record, document)
    events = write_tensorboard(result, folder, picture)
    return [picture, record, events]


# --- the sweep ------------------------------------------------------------------------


class _RangeTest:
    """Sets each optimizer step's learning rate and records the loss it had."""

    def __init__(
        self, lrs: list[float], smooth: float, diverge: float, optimizer: torch.optim.Optimizer
    ) -> None:
        self.lrs = lrs
        self.smooth = smooth
        self.diverge = diverge
        first = optimizer.param_groups[0]["lr"]
        # Other parameter groups keep their ratio to the first (discriminative lrs).
        self.ratios = [
            float(group["lr"]) / float(first) if first else 1.0 for group in optimizer.param_groups
        ]
        self.lrs_done: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.stopped = "data"
        self._batch_losses: list[torch.Tensor] = []
        self._average = 0.0
        self._best = math.inf
        self._plugin_state: dict[str, Any] = {}

    @hookimpl(wrapper=True)  # registered last: its code after yield runs after every other
    def on_fit_begin(self, learner: Learner) -> Iterator[None]:
        result = yield
        # The state a resumed fit would restore: put back into the plugins afterwards.
        state: dict[str, Any] = {}
        learner.hook.on_save_checkpoint(learner=learner, checkpoint=state)
        self._plugin_state = _copy_state(state)
        return result

    def on_backward_end(self, learner: Learner) -> None:
        self._batch_losses.append(learner.loss.detach().float().reshape(()))

    def on_step_begin(self, learner: Learner) -> None:
        lr = self.lrs[len(self.losses)]
        for group, ratio in zip(learner.optimizer.param_groups, self.ratios):
            group["lr"] = lr * ratio

    def on_step_end(self, learner: Learner) -> None:
        loss = torch.stack(self._batch_losses).mean()
        self._batch_losses = []
        # Every process sees the same mean loss, so all of them stop at the same step.
        world_size = learner.context.world_size
        if world_size > 1:
            loss = learner.hook.reduce_tensor(learner=learner, tensor=loss) / world_size
        value = float(loss.item())
        step = len(self.losses)
        self.lrs_done.append(self.lrs[step])
        self.losses.append(value)
        self._average = self.smooth * self._average + (1 - self.smooth) * value
        smoothed = self._average / (1 - self.smooth ** (step + 1))
        self.smoothed.append(smoothed)
        if not math.isfinite(value) or not math.isfinite(smoothed):
            self.stopped = "not finite"
        elif smoothed > self.diverge * self._best:
            self.stopped = "diverged"
        elif step + 1 == len(self.lrs):
            self.stopped = "steps"
        else:
            self._best = min(self._best, smoothed)
            return
        raise StopFit

    def restore_plugins(self, learner: Learner) -> None:
        """Give the sweeping plugins back the state they had when the sweep's fit began."""
        if self._plugin_state:
            learner.hook.on_load_checkpoint(
                learner=learner, checkpoint=_copy_state(self._plugin_state)
            )


class _PutBack:
    """Copies everything the sweep changes, sets plugins aside, and puts it all back."""

    def __init__(self, learner: Learner, set_aside: list[str]) -> None:
        self.learner = learner
        self.set_aside = set_aside

    def __enter__(self) -> None:
        learner = self.learner
        manager = learner.plugin_manager
        self.registered = [
            (name, plugin, manager.origins.get(name, "api"))
            for name, plugin in manager.list_name_plugin()
            if plugin is not None
        ]
        self.model = learner.model
        self.weights = {name: _stash(value) for name, value in self.model.state_dict().items()}
        self.grads = [
            (param, None if param.grad is None else _stash(param.grad))
            for param in self.model.parameters()
        ]
        self.modes = [(module, module.training) for module in self.model.modules()]
        self.optimizer = learner.optimizer
        self.optimizer_state = {
            param: {key: _stash(value) for key, value in state.items()}
            for param, state in self.optimizer.state.items()
        }
        self.groups = [
            {key: copy.deepcopy(value) for key, value in group.items() if key != "params"}
            for group in self.optimizer.param_groups
        ]
        loop = learner.state_dict()  # the partial train loss, as the learner keeps it
        self.loop = {
            **loop,
            "epoch": learner.epoch,
            "iteration": learner.iteration,
            "step": learner.step,
            "history": copy.deepcopy(learner.history),
        }
        self.attributes = {
            name: getattr(learner, name)
            for name in (
                "epochs",
                "metrics",
                "exception",
                "should_stop",
                "training",
                "batch",
                "pred",
                "loss",
                "valid_data",
            )
        }
        self.rng = capture_rng_state(learner.train_data)
        for name in self.set_aside:
            manager.unregister(name=name)
        learner.valid_data = None  # the sweep trains only

    def __exit__(self, *exc_info: object) -> None:
        learner = self.learner
        with torch.no_grad():
            self.model.load_state_dict(
                {name: _unstash(value) for name, value in self.weights.items()}
            )
            for param, grad in self.grads:
                param.grad = None if grad is None else _unstash(grad)
        for module, training in self.modes:
            module.training = training
        self.optimizer.state.clear()
        for param, state in self.optimizer_state.items():
            self.optimizer.state[param] = {key: _unstash(value) for key, value in state.items()}
        for group, saved in zip(self.optimizer.param_groups, self.groups):
            for key in [key for key in group if key != "params" and key not in saved]:
                del group[key]
            group.update(copy.deepcopy(saved))
        learner.load_state_dict(self.loop)
        for name, value in self.attributes.items():
            setattr(learner, name, value)
        set_rng_state(self.rng, learner.train_data)
        self._register_again(learner.plugin_manager)

    def _register_again(self, manager: PluginManager) -> None:
        """Register the set-aside plugins again, each hook's implementations in their order.

        pluggy calls implementations with the same marker in reverse order of
        registration, so every plugin from the first one set aside on is registered
        again, in the order it was.
        """
        names = [name for name, _, _ in self.registered]
        first = min((names.index(name) for name in self.set_aside), default=len(names))
        for _, plugin, _ in self.registered[first:]:
            if manager.is_registered(plugin):
                manager.unregister(plugin)
        for name, plugin, origin in self.registered[first:]:
            manager.register(plugin, name, origin=origin)


def _check_range(start_lr: float, end_lr: float, steps: int, smooth: float, diverge: float) -> None:
    if not (start_lr > 0 and math.isfinite(start_lr)):
        raise ValueError(f"lr_find(start_lr={start_lr}): give a positive learning rate")
    if not (end_lr > start_lr and math.isfinite(end_lr)):
        raise ValueError(f"lr_find(end_lr={end_lr}): give a learning rate above start_lr")
    if steps < 2:
        raise ValueError(f"lr_find(steps={steps}): give at least 2 steps")
    if not 0 <= smooth < 1:
        raise ValueError(f"lr_find(smooth={smooth}): give a factor in [0, 1)")
    if not diverge > 1:
        raise ValueError(f"lr_find(diverge={diverge}): give a factor above 1")


def _stash(value: Any) -> Any:
    """A copy of ``value`` that the sweep cannot change: plain tensors go to the CPU (no
    device memory held), tensor subclasses (FSDP's DTensor) are cloned where they are."""
    if isinstance(value, torch.Tensor):
        if type(value) in (torch.Tensor, torch.nn.Parameter) and value.device.type != "cpu":
            return _OnDevice(value.detach().to("cpu", copy=True), value.device)
        return value.detach().clone()
    return copy.deepcopy(value)


def _unstash(value: Any) -> Any:
    if isinstance(value, _OnDevice):
        return value.tensor.to(value.device)
    if isinstance(value, torch.Tensor):
        return value.clone()  # the copy stays untouched, for a second restore
    return copy.deepcopy(value)


@dataclass
class _OnDevice:
    tensor: torch.Tensor
    device: torch.device


def _copy_state(state: Any) -> Any:
    """A copy of a checkpoint-style dict whose tensors do not share memory with ``state``."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: _copy_state(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_copy_state(value) for value in state)
    return copy.deepcopy(state)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --- the picture ----------------------------------------------------------------------


def _draw(result: LRFindResult, title: str) -> Any:
    from PIL import Image, ImageDraw

    width, height = PLOT_SIZE
    left, top, right, bottom = 72, 56, width - 24, height - 58
    image = Image.new("RGB", (width, height), "white")
    canvas = ImageDraw.Draw(image)
    font = _font(13)
    low_x, high_x = math.log10(result.start_lr), math.log10(result.end_lr)
    low_y, high_y = _loss_window(result)

    def x_of(lr: float) -> float:
        return left + (math.log10(lr) - low_x) / (high_x - low_x) * (right - left)

    def y_of(loss: float) -> float:
        return bottom - (loss - low_y) / (high_y - low_y) * (bottom - top)

    for decade in range(math.ceil(low_x), math.floor(high_x) + 1):
        column = x_of(10.0**decade)
        canvas.line([(column, top), (column, bottom)], fill=_COLOURS["grid"])
        canvas.line([(column, bottom), (column, bottom + 5)], fill=_COLOURS["axis"])
        label = f"{10.0**decade:g}"
        canvas.text((column, bottom + 8), label, fill=_COLOURS["text"], font=font, anchor="mt")
    for tick in _nice_ticks(low_y, high_y):
        row = y_of(tick)
        canvas.line([(left, row), (right, row)], fill=_COLOURS["grid"])
        canvas.line([(left - 5, row), (left, row)], fill=_COLOURS["axis"])
        canvas.text((left - 8, row), f"{tick:g}", fill=_COLOURS["text"], font=font, anchor="rm")
    canvas.rectangle([(left, top), (right, bottom)], outline=_COLOURS["axis"])
    canvas.text(
        ((left + right) / 2, height - 8),
        "learning rate (log scale)",
        fill=_COLOURS["text"],
        font=font,
        anchor="mb",
    )
    canvas.text((left - 8, top - 12), "loss", fill=_COLOURS["text"], font=font, anchor="rb")
    canvas.text((width / 2, 8), title, fill=_COLOURS["text"], font=_font(15), anchor="mt")

    # Curves are drawn on a layer the size of the plot, which clips them to it.
    layer = Image.new("RGBA", (right - left - 1, bottom - top - 1), (0, 0, 0, 0))
    curves = ImageDraw.Draw(layer)
    offset = (left + 1, top + 1)
    for values, colour, line_width in (
        (result.losses, _COLOURS["loss"], 1),
        (result.smoothed, _COLOURS["smoothed"], 2),
    ):
        for points in _finite_runs(result.lrs, values):
            pixels = [(x_of(lr) - offset[0], y_of(loss) - offset[1]) for lr, loss in points]
            if len(pixels) > 1:
                curves.line(pixels, fill=colour, width=line_width, joint="curve")
    image.paste(layer, offset, layer)

    legend = [("loss", _COLOURS["loss"]), ("smoothed loss", _COLOURS["smoothed"])]
    if result.suggestion is not None:
        column = x_of(result.suggestion)
        for start in range(top, bottom, 8):  # dashed
            canvas.line(
                [(column, start), (column, min(start + 4, bottom))],
                fill=_COLOURS["suggestion"],
                width=2,
            )
        row = y_of(result.smoothed[result.suggestion_index])
        canvas.ellipse(
            [(column - 5, row - 5), (column + 5, row + 5)], outline=_COLOURS["suggestion"], width=2
        )
        legend.append((f"suggested lr {result.suggestion:.3g}", _COLOURS["suggestion"]))
    position = right
    for label, colour in reversed(legend):
        text_width = canvas.textlength(label, font=font)
        canvas.text((position, top - 16), label, fill=_COLOURS["text"], font=font, anchor="rm")
        canvas.line(
            [(position - text_width - 24, top - 16), (position - text_width - 6, top - 16)],
            fill=colour,
            width=2,
        )
        position -= text_width + 40
    return image


def _loss_window(result: LRFindResult) -> tuple[float, float]:
    """The loss range shown: from the lowest loss to a little above where the curve
    started falling, so that the diverging tail does not flatten the descent."""
    smoothed = [value for value in result.smoothed if math.isfinite(value)]
    raw = [value for value in result.losses if math.isfinite(value)]
    if not smoothed:
        return 0.0, 1.0
    lowest = min(smoothed + raw)
    before_minimum = result.smoothed[: int(np.nanargmin(_as_nan(result.smoothed))) + 1]
    highest = max(max(value for value in before_minimum if math.isfinite(value)), smoothed[0])
    spread = highest - lowest or abs(highest) or 1.0
    return lowest - 0.05 * spread, highest + 0.35 * spread


def _as_nan(values: list[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    array[~np.isfinite(array)] = np.nan
    return array


def _finite_runs(lrs: list[float], values: list[float]) -> Iterator[list[tuple[float, float]]]:
    run: list[tuple[float, float]] = []
    for lr, value in zip(lrs, values):
        if math.isfinite(value):
            run.append((lr, value))
        elif run:
            yield run
            run = []
    if run:
        yield run


def _nice_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) within ``[low, high]``."""
    rough = (high - low) / most
    power = 10 ** math.floor(math.log10(rough))
    step = next(power * factor for factor in (1, 2, 2.5, 5, 10) if power * factor >= rough)
    first = math.ceil(low / step)
    return [round(tick * step, 12) for tick in range(first, math.floor(high / step) + 1)]


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()
