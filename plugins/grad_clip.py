"""grad_clip: clip the gradients before each optimizer step.

``--clip-grad-norm MAX`` rescales the gradients so that their total norm (2-norm over
all parameters the optimizer updates) is at most MAX, with
``torch.nn.utils.clip_grad_norm_``; ``--clip-grad-value MAX`` clamps each gradient
element to ``[-MAX, MAX]`` with ``torch.nn.utils.clip_grad_value_``. With both, the
values are clamped first, then the norm is clipped. Both are off by default, and then
the plugin registers nothing.

Clipping happens in ``on_step_begin``, which fires only on batches where the optimizer
is about to step, so with gradient accumulation it sees the whole group's mean
gradient. It is a *plain* implementation on purpose: the AMP plugin unscales fp16
gradients and the grad_accumulation plugin averages them in their own
``on_step_begin`` with ``tryfirst``, so by the time this one runs the gradients are in
their true scale. A plugin that wants to see the clipped gradients uses ``trylast``.

Clipping adds no device sync: the norm stays a tensor on the device.

Writes nothing. Python API: ``Learner(..., plugins=[GradClip(max_norm=1.0)])``.
"""

from __future__ import annotations

import argparse

import torch

from trainloop import Learner, RunConfig, UsageError, hookimpl


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("grad_clip")
    group.add_argument(
        "--clip-grad-norm",
        type=float,
        default=None,
        metavar="MAX",
        help="clip the total gradient norm to MAX before each step (default: off)",
    )
    group.add_argument(
        "--clip-grad-value",
        type=float,
        default=None,
        metavar="MAX",
        help="clamp every gradient element to [-MAX, MAX] before each step (default: off)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    max_norm, max_value = config.options.clip_grad_norm, config.options.clip_grad_value
    for option, value in (("--clip-grad-norm", max_norm), ("--clip-grad-value", max_value)):
        if value is not None and not value > 0:
            raise UsageError(f"{option} {value}: give a positive number")
    if max_norm is not None or max_value is not None:
        config.plugin_manager.register(GradClip(max_norm, max_value), "grad_clip.clipper")


class GradClip:
    """Clips the gradients of the optimizer's parameters before each step.

    Args:
        max_norm: the largest total gradient norm allowed, or ``None``.
        max_value: the largest absolute value of a gradient element, or ``None``.
        norm_type: the norm for ``max_norm`` (``2.0``; ``float("inf")`` for the max-norm).
    """

    def __init__(
        self,
        max_norm: float | None = None,
        max_value: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        if max_norm is None and max_value is None:
            raise ValueError("GradClip needs max_norm, max_value or both")
        for name, value in (("max_norm", max_norm), ("max_value", max_value)):
            if value is not None and not value > 0:
                raise ValueError(f"GradClip({name}={value}): it must be positive")
        self.max_norm = max_norm
        self.max_value = max_value
        self.norm_type = norm_type
        self._params: list[torch.Tensor] = []

    @hookimpl(trylast=True)  # after plugins that place or wrap the model and optimizer
    def on_fit_begin(self, learner: Learner) -> None:
        self._params = [
            param for group in learner.optimizer.param_groups for param in group["params"]
        ]

    def on_step_begin(self, learner: Learner) -> None:
        if self.max_value is not None:
            torch.nn.utils.clip_grad_value_(self._params, self.max_value)
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.max_norm, self.norm_type)
