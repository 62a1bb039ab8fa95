"""U-Net on the Kaggle Carvana Image Masking Challenge: train, show, write submit.csv.gz.

``--input-dir`` (default ``input``) holds the competition data in the Kaggle layout:
``train/``, ``train_masks/``, ``test/`` and the CSV files (Kaggle's zip files there are
unpacked first). When the default folder ``input`` has no Carvana data, a small
synthetic set in the same layout is generated there, so the recipe runs anywhere: the
defaults train on it in a few minutes on two CPU cores and reach a validation Dice
above 0.98. Another folder without data is a usage error unless ``--synthetic`` (or a
``--synthetic-*`` option) asks for the generated set.

The run folder gets ``metrics.jsonl`` (``train_loss``, ``valid_loss``, ``valid_dice``),
TensorBoard events with the scalars and, each epoch, pictures of the first validation
cars (photo | true mask | predicted mask), ``checkpoints/``, ``model.pt``, and
``submit.csv.gz``: one ``img,rle_mask`` row per test photo, each predicted mask
resized to its photo's original size and thresholded, streamed as it is predicted.

With the real data on a GPU, train at a size close to the photos' 1918x1280 whose sides
divide by 2^depth, on a wider U-Net, with mixed precision, a cosine schedule, and the
best epoch kept by Dice::

    trainloop run recipes/unet_carvana.py --input-dir input --image-size 1024 688 \\
        --base-width 32 --depth 4 --batch-size 8 --epochs 30 --lr 1e-3 \\
        --lr-schedule cosine --workers 8 --precision bf16-mixed --channels-last \\
        --monitor valid_dice

(full size: ``--image-size 1920 1280 --depth 5 --batch-size 2``; docs/carvana.md has
the whole table of settings.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from trainloop import Learner, UsageError
from trainloop.context import pin_memory_default, run_context
from trainloop.data.seeding import SetDataEpoch, seeded_rng
from trainloop.tasks.carvana.files import check_layout, has_carvana_files
from trainloop.tasks.carvana.losses import bce_dice_loss
from trainloop.tasks.carvana.losses import dice as dice_score
from trainloop.tasks.carvana.pictures import MaskPictures
from trainloop.tasks.carvana.prepare import prepare_input
from trainloop.tasks.carvana.split import train_valid_ids
from trainloop.tasks.carvana.submission import SubmissionWriter
from trainloop.tasks.carvana.tta import FlipTTA
from trainloop.tasks.carvana.unet import UNet, check_size


@dataclass
class Config:
    input_dir: Path = field(
        default=Path("input"),
        metadata={"help": "the Carvana data in the Kaggle layout (generated in input when empty)"},
    )
    image_size: tuple[int, int] = field(
        default=(144, 96),
        metadata={"help": "WIDTH HEIGHT to train and predict at, each divisible by 2^depth"},
    )
    batch_size: int = 8
    epochs: int = 20
    base_width: int = field(default=8, metadata={"help": "channels of the first U-Net level"})
    depth: int = field(default=4, metadata={"help": "halvings of the image in the U-Net"})
    lr: float = field(default=2e-3, metadata={"help": "Adam's learning rate"})
    threshold: float = field(
        default=0.5, metadata={"help": "a pixel is car where the probability is above it"}
    )
    tta: Literal["none", "flip", "flips"] = field(
        default="none",
        metadata={"help": "test-time augmentation of the predictions: mean over flips"},
    )
    valid_size: float = field(
        default=0.2,
        metadata={
            "help": "validation cars: a fraction of the cars, or a number of images if >= 1",
            "resume": "fixed",  # another split would train on validation photos
        },
    )
    sample_size: int | None = field(
        default=None,
        metadata={
            "help": "use about N training images (whole cars; quick runs)",
            "resume": "fixed",
        },
    )
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    augment: bool = field(default=True, metadata={"help": "flip, affine and colour jitter"})
    predict: bool = field(default=True, metadata={"help": "write submit.csv.gz after training"})
    synthetic: bool = field(
        default=False,
        metadata={"help": "generate a synthetic set in --input-dir if it has no Carvana data"},
    )
    synthetic_cars: int | None = field(
        default=None,
        metadata={
            "help": "generated data: training cars, 16 photos each (unset: 20); implies --synthetic"
        },
    )
    synthetic_test_cars: int | None = field(
        default=None, metadata={"help": "generated data: test cars (unset: 2); implies --synthetic"}
    )
    synthetic_size: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "generated data: WIDTH HEIGHT of the photos (unset: 288 192); implies --synthetic"
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed (training, split, data)"})


DEFAULT_INPUT_DIR = Path("input")


def _say(message: str | None) -> None:
    if message is not None and run_context().is_main_process:
        print(message, flush=True)


def _check(cfg: Config) -> None:
    if cfg.input_dir.exists() and not cfg.input_dir.is_dir():
        raise UsageError(
            f"--input-dir {cfg.input_dir} is a file, not a folder: give the folder that holds "
            f"(or will hold) the Carvana data"
        )
    for option, value in (
        ("--batch-size", cfg.batch_size),
        ("--base-width", cfg.base_width),
        ("--depth", cfg.depth),
    ):
        if value < 1:
            raise UsageError(f"{option} {value}: use 1 or more")
    check_size(cfg.image_size, cfg.depth, name="--image-size")
    if cfg.workers < 0:
        raise UsageError(f"--workers {cfg.workers}: use 0 (load in the main process) or more")
    if not 0.0 < cfg.threshold < 1.0:
        raise UsageError(f"--threshold {cfg.threshold}: use a probability between 0 and 1")
    if not cfg.lr > 0:
        raise UsageError(f"--lr {cfg.lr}: use a positive learning rate")
    if not has_carvana_files(cfg.input_dir) and not wants_synthetic(cfg):
        raise UsageError(
            f"--input-dir {cfg.input_dir} has no Carvana data (no photos in train/, no Kaggle "
            f"zip files): download the competition's files there (docs/carvana.md), or add "
            f"--synthetic to generate a synthetic set there"
        )


def wants_synthetic(cfg: Config) -> bool:
    """Whether a synthetic set may be generated in ``cfg.input_dir`` when it has no data.

    Only in the default folder ``input`` or when asked for (``--synthetic`` or a
    ``--synthetic-*`` option): a mistyped ``--input-dir`` is an error, not a new data set.
    """
    synthetic_options = (cfg.synthetic_cars, cfg.synthetic_test_cars, cfg.synthetic_size)
    asked = cfg.synthetic or any(value is not None for value in synthetic_options)
    return asked or Path(cfg.input_dir) == DEFAULT_INPUT_DIR


def build(cfg: Config) -> Learner:
    # Here, not at the top: torchvision takes seconds to import, and --help needs none of it.
    from trainloop.tasks.carvana.dataset import FloatImages, training_loaders

    _check(cfg)
    _say(
        prepare_input(
            cfg.input_dir,
            generate=wants_synthetic(cfg),
            cars=cfg.synthetic_cars,
            test_cars=cfg.synthetic_test_cars,
            size=cfg.synthetic_size,
            seed=cfg.seed,
        )
    )
    layout = check_layout(cfg.input_dir, require_test=cfg.predict)
    train_ids, valid_ids = train_valid_ids(
        layout.train_ids, cfg.valid_size, cfg.sample_size, cfg.seed
    )
    size = tuple(cfg.image_size)
    train_data, valid_data = training_loaders(
        cfg.input_dir,
        train_ids,
        valid_ids,
        size,
        cfg.batch_size,
        augment=cfg.augment,
        workers=cfg.workers,
        pin_memory=pin_memory_default(),
        seed=cfg.seed,
    )
    with seeded_rng(cfg.seed):  # the same weights from Python as from the command line
        model = UNet(base_width=cfg.base_width, depth=cfg.depth)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    width, height = size
    _say(
        f"U-Net: {parameters:,} parameters (depth {cfg.depth}, base width {cfg.base_width}); "
        f"{len(train_ids)} training and {len(valid_ids)} validation photos at {width}x{height}"
    )

    def dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean Dice per image at ``cfg.threshold`` (the ``valid_dice`` metric)."""
        return dice_score(logits, target, cfg.threshold)

    return Learner(
        model,
        train_data,
        valid_data,
        loss_func=bce_dice_loss,
        optimizer=functools.partial(torch.optim.Adam, lr=cfg.lr),
        metrics=(dice,),
        plugins=[FloatImages(), MaskPictures(cfg.threshold), SetDataEpoch()],
    )


def predict(learner: Learner, cfg: Config) -> None:
    """Predict every test photo into ``RUN_DIR/submit.csv.gz``, one row at a time."""
    from trainloop.tasks.carvana.dataset import CarvanaDataset, make_loader

    if not cfg.predict or not learner.context.is_main_process:
        return
    test_set = CarvanaDataset(
        cfg.input_dir, size=tuple(cfg.image_size), split="test", dtype=torch.uint8
    )
    test_data = make_loader(
        test_set, cfg.batch_size, workers=cfg.workers, pin_memory=pin_memory_default()
    )
    writer = SubmissionWriter(None, test_set, cfg.threshold)
    added = [writer] + ([FlipTTA(cfg.tta)] if cfg.tta != "none" else [])
    for plugin in added:
        learner.add_plugin(plugin)
    try:
        learner.predict(test_data, keep=False)
    finally:
        for plugin in added:
            learner.plugin_manager.unregister(plugin)
    print(f"submission: {writer.path} ({writer.count} rows)", flush=True)
