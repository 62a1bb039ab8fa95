"""One sigmoid neuron, O = sigmoid(w*x + b), taught to output 0.74 for x = -0.23.

Two unknowns and one equation: infinitely many (w, b) give O = 0.74. Gradient descent
on the error E = 1/2 (O - 0.74)^2 walks down the error surface to one of them. The run
folder gets ``error_surface.png``: E(w, b) as a heat map with the descent path on it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from trainloop import Learner, UsageError, hookimpl
from trainloop.tasks.neuron.surface import draw_error_surface


@dataclass
class Config:
    x: float = field(default=-0.23, metadata={"help": "the input"})
    target: float = field(default=0.74, metadata={"help": "the output wanted for x"})
    w: float = field(default=0.5, metadata={"help": "starting weight"})
    b: float = field(default=-0.5, metadata={"help": "starting bias"})
    lr: float = field(default=0.5, metadata={"help": "gradient descent step size"})
    steps_per_epoch: int = 50
    epochs: int = 10


class Neuron(torch.nn.Module):
    """O = sigmoid(w*x + b) with a trainable weight and bias."""

    def __init__(self, w: float, b: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))
        self.b = torch.nn.Parameter(torch.tensor(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.w * x + self.b)


def half_squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """E = 1/2 (O - target)^2, averaged over the batch."""
    return 0.5 * ((output - target) ** 2).mean()


class DescentPath:
    """Records (w, b) after every step, reports ``output`` and ``error`` each epoch,
    and draws the error surface with the path at the end (a resumed run's path starts
    where the first run's did: the path so far is in its checkpoints)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.path: list[tuple[float, float]] = []

    def on_fit_begin(self, learner: Learner) -> None:
        if not self.path:  # a resume brought back the path so far (on_load_checkpoint)
            self.path = [(learner.model.w.item(), learner.model.b.item())]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["descent_path"] = list(self.path)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.path = [tuple(point) for point in checkpoint.get("descent_path", self.path)]

    def on_step_end(self, learner: Learner) -> None:
        self.path.append((learner.model.w.item(), learner.model.b.item()))

    def on_epoch_end(self, learner: Learner) -> None:
        with torch.no_grad():
            output = learner.model(torch.tensor(self.cfg.x)).item()
        learner.metrics["output"] = output
        learner.metrics["error"] = 0.5 * (output - self.cfg.target) ** 2

    @hookimpl(trylast=True)
    def on_fit_end(self, learner: Learner) -> None:
        if learner.run_dir is not None and len(self.path) > 1:
            picture = learner.run_dir / "error_surface.png"
            draw_error_surface(picture, self.cfg.x, self.cfg.target, self.path)


def _check(cfg: Config) -> None:
    for option, value in (("--x", cfg.x), ("--w", cfg.w), ("--b", cfg.b)):
        if not math.isfinite(value):
            raise UsageError(f"{option} {value}: use a finite number")
    if not 0.0 < cfg.target < 1.0:
        raise UsageError(
            f"--target {cfg.target}: use a number between 0 and 1, the outputs a sigmoid has"
        )
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UsageError(f"--lr {cfg.lr}: use a positive step size, such as 0.5")
    if cfg.steps_per_epoch < 1:
        raise UsageError(f"--steps-per-epoch {cfg.steps_per_epoch}: use 1 or more")


def build(cfg: Config) -> Learner:
    _check(cfg)
    sample = (torch.tensor([cfg.x]), torch.tensor([cfg.target]))
    return Learner(
        Neuron(cfg.w, cfg.b),
        train_data=[sample] * cfg.steps_per_epoch,
        loss_func=half_squared_error,
        optimizer=functools.partial(torch.optim.SGD, lr=cfg.lr),
        plugins=[DescentPath(cfg)],
    )


def predict(learner: Learner, cfg: Config) -> None:
    """Print where the descent ended."""
    model = learner.model
    with torch.no_grad():
        output = model(torch.tensor(cfg.x)).item()
    print(f"w = {model.w.item():.4f}, b = {model.b.item():.4f}: O({cfg.x}) = {output:.4f}")
