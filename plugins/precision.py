"""precision: mixed precision training with ``torch.autocast`` and a GradScaler.

See docs/plugins/precision.md.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.amp.autocast_mode import is_autocast_available

from trainloop import Learner, RunConfig, UsageError, hookimpl
from trainloop.context import RunContext

PRECISIONS = ("32", "16-mixed", "bf16-mixed")
CHECKPOINT_KEY = "grad_scaler"
DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision")
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="32",
        help="32: float32; bf16-mixed or 16-mixed: autocast (16-mixed adds a GradScaler)"
        " (default: 32)",
    )


@hookimpl
def configure_context(context: RunContext, options: argparse.Namespace) -> None:
    # Public, for a plugin that shards the model and casts its gathered parameters.
    context.mixed_precision_dtype = DTYPES.get(options.precision)


@hookimpl
def configure(config: RunConfig) -> None:
    precision = config.options.precision
    if precision == "32":
        return
    check_precision(precision, config.context.device_type)  # before the data loads
    plugin = ScaledPrecision() if precision == "16-mixed" else Precision(precision)
    config.plugin_manager.register(plugin, "precision.amp")


def check_precision(precision: str, device_type: str) -> None:
    """Raise a one-line UsageError when ``precision`` cannot run on ``device_type``."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    if precision == "32":
        return
    if not is_autocast_available(device_type):
        raise UsageError(
            f"--precision {precision}: torch has no autocast for {device_type} devices; "
            "use --precision 32"
        )
    if precision == "bf16-mixed" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(
            "--precision bf16-mixed: this GPU does not support bfloat16; use --precision 16-mixed"
        )
    if precision == "16-mixed" and device_type != "cuda":
        try:
            torch.amp.GradScaler(device_type)
            with torch.autocast(device_type, dtype=torch.float16):
                pass
        except (RuntimeError, ValueError, AssertionError) as error:
            raise UsageError(
                f"--precision 16-mixed needs a CUDA device here: torch {torch.__version__} "
                f"has no float16 training on {device_type} ({error}); "
                "use --precision bf16-mixed"
            ) from None


class Precision:
    """Mixed precision: autocast around the forward pass and the loss.

    For ``16-mixed`` use :class:`ScaledPrecision`, which adds the GradScaler;
    ``bf16-mixed`` needs none, and so pays for no backward or step hook.

    Args:
        precision: ``"bf16-mixed"``, or ``"32"`` (does nothing).
    """

    def __init__(self, precision: str = "bf16-mixed") -> None:
        if precision not in PRECISIONS:
            raise UsageError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
        if precision == "16-mixed" and not isinstance(self, ScaledPrecision):
            raise ValueError("Precision('16-mixed') needs a GradScaler: use ScaledPrecision()")
        self.precision = precision
        self.dtype = DTYPES.get(precision)
        self._device_type = "cpu"

    def _use_model_device(self, learner: Learner) -> None:
        parameter = next(learner.model.parameters(), None)
        self._device_type = parameter.device.type if parameter is not None else "cpu"

    def on_fit_begin(self, learner: Learner) -> None:
        self._use_model_device(learner)  # set up by now: placed where it trains
        check_precision(self.precision, self._device_type)

    def on_valid_begin(self, learner: Learner) -> None:
        self._use_model_device(learner)  # validate() without fit

    def on_predict_begin(self, learner: Learner) -> None:
        self._use_model_device(learner)

    # Autocast wraps whoever owns the step.

    @hookimpl(wrapper=True)
    def forward(self) -> Any:
        if self.dtype is None:
            return (yield)
        with torch.autocast(self._device_type, dtype=self.dtype):
            return (yield)

    @hookimpl(wrapper=True)
    def compute_loss(self) -> Any:
        if self.dtype is None:
            return (yield)
        with torch.autocast(self._device_type, dtype=self.dtype):
            return (yield)


class ScaledPrecision(Precision):
    """float16 autocast plus ``torch.amp.GradScaler``: what ``Precision("16-mixed")`` is.

    Args:
        precision: ``"16-mixed"``.
        **scaler_options: passed to ``torch.amp.GradScaler`` (``init_scale``,
            ``growth_interval``, ...).

    Attributes:
        scaler: the GradScaler, made when ``fit`` starts on the model's device.
    """

    def __init__(self, precision: str = "16-mixed", **scaler_options: Any) -> None:
        if precision != "16-mixed":
            raise ValueError(f"ScaledPrecision is for 16-mixed, not {precision!r}: use Precision")
        super().__init__(precision)
        self.scaler_options = scaler_options
        self.scaler: torch.amp.GradScaler | None = None
        self._scaler_state: dict[str, Any] | None = None  # loaded before the scaler exists

    @hookimpl(tryfirst=True)  # the scaler exists before a plain on_fit_begin restores it
    def on_fit_begin(self, learner: Learner) -> None:
        super().on_fit_begin(learner)
        if self.scaler is None:  # a resume may have given its state already
            self.scaler = torch.amp.GradScaler(self._device_type, **self.scaler_options)
            if self._scaler_state is not None:
                self.scaler.load_state_dict(self._scaler_state)

    @hookimpl
    def backward(self, loss: torch.Tensor) -> bool:
        self.scaler.scale(loss).backward()
        return True

    @hookimpl(tryfirst=True)  # before gradient clipping, which needs the true gradients
    def on_step_begin(self, learner: Learner) -> None:
        self.scaler.unscale_(learner.optimizer)

    @hookimpl
    def optimizer_step(self, learner: Learner) -> bool:
        self.scaler.step(learner.optimizer)  # skipped when the gradients hold inf or NaN
        self.scaler.update()
        return True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.scaler is not None:
            checkpoint[CHECKPOINT_KEY] = self.scaler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        if self.scaler is not None:
            self.scaler.load_state_dict(state)
        else:
            self._scaler_state = state
