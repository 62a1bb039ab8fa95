"""The classic MNIST network: 784-200-200-10, ReLU, log_softmax, SGD with momentum.

Data through ``torchvision.datasets.MNIST``: downloaded into ``--data-dir`` when
online, or read from the standard IDX files in ``DATA_DIR/MNIST/raw/``. Validation is
on the 10,000 test images; expect about 98% ``valid_accuracy`` after 10 epochs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from trainloop import Learner, UsageError
from trainloop.data.tensors import TensorBatches
from trainloop.tasks.mnist.data import load_mnist


@dataclass
class Config:
    data_dir: Path = field(default=Path("data"), metadata={"help": "folder holding MNIST/raw/"})
    download: bool = field(default=True, metadata={"help": "download MNIST if it is missing"})
    batch_size: int = 200
    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = 10
    sample_size: int | None = field(
        default=None, metadata={"help": "train on the first N images only (quick runs)"}
    )


class Net(torch.nn.Module):
    """Linear 784->200, ReLU, 200->200, ReLU, 200->10, log_softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(28 * 28, 200)
        self.fc2 = torch.nn.Linear(200, 200)
        self.fc3 = torch.nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The fraction of samples whose most likely class is the target."""
    return (pred.argmax(dim=1) == target).float().mean()


def build(cfg: Config) -> Learner:
    if cfg.sample_size is not None and cfg.sample_size < 1:
        raise UsageError(
            f"--sample-size {cfg.sample_size}: use 1 or more, or none for all the images"
        )
    train_x, train_y, test_x, test_y = load_mnist(cfg.data_dir, download=cfg.download)
    if cfg.sample_size is not None:
        train_x, train_y = train_x[: cfg.sample_size], train_y[: cfg.sample_size]
    return Learner(
        Net(),
        TensorBatches(train_x, train_y, batch_size=cfg.batch_size, shuffle=True),
        TensorBatches(test_x, test_y, batch_size=1000),
        loss_func=F.nll_loss,
        optimizer=functools.partial(torch.optim.SGD, lr=cfg.lr, momentum=cfg.momentum),
        metrics=(accuracy,),
    )
