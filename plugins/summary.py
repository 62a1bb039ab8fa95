"""summary: ``--summary`` prints the model's layers, output shapes, parameters and memory."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from trainloop import Learner, RunConfig, hookimpl


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("summary")
    group.add_argument(
        "--summary",
        action="store_true",
        help="print the model's layers, their output shapes for the first training batch, "
        "parameter counts and a memory estimate (default: off)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    if config.options.summary and config.is_main_process:
        config.plugin_manager.register(ModelSummary(), "summary.table")


class ModelSummary:
    """Prints a table of the model during the first training batch of ``fit``.

    Forward hooks on the model's leaf modules record each one's output shape while the
    first training batch goes through the model, as it is (no extra forward pass, no
    random number drawn); they are removed as soon as that forward pass is over, so
    the other batches run without them.

    Attributes:
        rows: ``(name, type, output shape, parameters)`` of each leaf module called, in
            call order; ``total``, ``trainable``: parameter counts; ``memory``: bytes of
            parameters, gradients and one batch's leaf outputs.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, int]] = []
        self.total = self.trainable = 0
        self.memory: dict[str, int] = {}
        self._handles: list[Any] = []
        self._activations = 0

    def on_fit_begin(self, learner: Learner) -> None:
        model = learner.model
        self.rows, self._activations = [], 0
        for name, module in model.named_modules():
            if not any(True for _ in module.children()):  # a leaf: it computes something
                self._handles.append(module.register_forward_hook(self._recorder(name)))
        self._handles.append(model.register_forward_hook(self._finish))

    def _recorder(self, name: str) -> Any:
        def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if not module.training:
                return  # validation before the first training batch: not this one
            shape = _shape(output)
            self._activations += _bytes(output)
            count = sum(parameter.numel() for parameter in module.parameters(recurse=False))
            self.rows.append((name or "(model)", type(module).__name__, shape, count))

        return record

    def _finish(self, model: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not model.training:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        parameters = list(model.parameters())
        self.total = sum(parameter.numel() for parameter in parameters)
        self.trainable = sum(p.numel() for p in parameters if p.requires_grad)
        self.memory = {
            "parameters": sum(p.numel() * p.element_size() for p in parameters),
            "gradients": sum(p.numel() * p.element_size() for p in parameters if p.requires_grad),
            "activations": self._activations,
        }
        print(self.table(), flush=True)

    def on_fit_end(self) -> None:
        for handle in self._handles:  # fit ended before a training batch
            handle.remove()
        self._handles = []

    def table(self) -> str:
        """The summary as text, one line per leaf module and the totals."""
        width = max([len(name) for name, *_ in self.rows] + [5])
        kinds = max([len(kind) for _, kind, *_ in self.rows] + [4])
        shapes = max([len(shape) for *_, shape, _ in self.rows] + [6])
        lines = [f"{'layer':<{width}}  {'type':<{kinds}}  {'output':<{shapes}}  {'parameters':>10}"]
        for name, kind, shape, count in self.rows:
            lines.append(f"{name:<{width}}  {kind:<{kinds}}  {shape:<{shapes}}  {count:>10,}")
        memory = ", ".join(f"{key} {_megabytes(value)}" for key, value in self.memory.items())
        lines.append(f"{self.total:,} parameters ({self.trainable:,} trainable); memory: {memory}")
        return "\n".join(lines)


def _shape(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return "x".join(str(size) for size in output.shape)
    if isinstance(output, (tuple, list)):
        return ", ".join(_shape(item) for item in output)
    return type(output).__name__


def _bytes(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_bytes(item) for item in output)
    return 0


def _megabytes(count: int) -> str:
    if count < 2**10:
        return f"{count} B"
    return f"{count / 2**20:.2f} MB" if count >= 2**16 else f"{count / 2**10:.1f} kB"
