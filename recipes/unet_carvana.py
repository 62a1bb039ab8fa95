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
from typing import Any, Literal

import torch

from trainloop import Learner, UsageError
from trainloop.data.carvana import (
    CarvanaDataset,
    FloatImages,
    SetDataEpoch,
    car_id_of,
    check_layout,
    check_size,
    ensure_data,
    has_carvana_files,
    make_loader,
    split_by_car,
    unpack,
)
from trainloop.data.carvana_render import MaskPictures
from trainloop.data.seeding import seeded_rng
from trainloop.models.segmentation import FlipTTA, bce_dice_loss
from trainloop.models.segmentation import dice as dice_score
from trainloop.models.unet import UNet
from trainloop.plugins.predictions import FILE_NAME, PredictionWriter, is_main_process


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
SYNTHETIC_DEFAULTS = {"synthetic_cars": 20, "synthetic_test_cars": 2, "synthetic_size": (288, 192)}


def _say(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def _pin_memory() -> bool:
    try:
        from trainloop.plugins.device import pin_memory_default
    except ImportError:
        return torch.cuda.is_available()
    return pin_memory_default()


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
    asked = any(getattr(cfg, name) is not None for name in SYNTHETIC_DEFAULTS)
    return cfg.synthetic or asked or Path(cfg.input_dir) == DEFAULT_INPUT_DIR


def synthetic_options(cfg: Config) -> dict[str, Any]:
    """The ``--synthetic-*`` values, their defaults where not given."""
    return {
        name: default if getattr(cfg, name) is None else getattr(cfg, name)
        for name, default in SYNTHETIC_DEFAULTS.items()
    }


def prepare_data(cfg: Config) -> None:
    """Unpack Kaggle's zip files, or generate the synthetic set, in ``cfg.input_dir``."""
    synthetic = synthetic_options(cfg)
    generated = wants_synthetic(cfg) and ensure_data(
        cfg.input_dir,
        n_train_cars=synthetic["synthetic_cars"],
        n_test_cars=synthetic["synthetic_test_cars"],
        size=tuple(synthetic["synthetic_size"]),
        seed=cfg.seed,
    )
    if generated:
        width, height = synthetic["synthetic_size"]
        _say(
            f"no Carvana data in {cfg.input_dir}: generated a synthetic set there "
            f"({synthetic['synthetic_cars']} training and {synthetic['synthetic_test_cars']} "
            f"test cars, {width}x{height} photos)"
        )
        return
    unpacked = unpack(cfg.input_dir)
    if unpacked:
        _say(f"unpacked {', '.join(unpacked)} in {cfg.input_dir}")


def varied_order(image_ids: list[str]) -> list[str]:
    """The same photos, ordered so that the first ones show different cars from different sides.

    Car ``k`` (in sorted order) starts at view ``1 + 5k`` and goes round from there; the
    photos are then taken one from each car in turn.
    """
    cars = sorted({car_id_of(image_id) for image_id in image_ids})
    rank = {car: position for position, car in enumerate(cars)}

    def key(image_id: str) -> tuple[int, int]:
        car, view = image_id.rsplit("_", 1)
        return (int(view) - 1 - 5 * rank[car]) % 16, rank[car]

    return sorted(image_ids, key=key)


def build(cfg: Config) -> Learner:
    _check(cfg)
    prepare_data(cfg)
    layout = check_layout(cfg.input_dir, require_test=cfg.predict)
    valid_size = int(cfg.valid_size) if cfg.valid_size >= 1 else cfg.valid_size
    train_ids, valid_ids = split_by_car(layout.train_ids, valid_size, cfg.sample_size, cfg.seed)
    valid_ids = varied_order(valid_ids)  # TensorBoard pictures the first validation photos
    pin_memory = _pin_memory()
    size = tuple(cfg.image_size)
    # uint8 through the loaders (a quarter of the bytes), float32 on the device: FloatImages.
    # Order and augmentation come from (cfg.seed, epoch): exact resumes with any --workers.
    train_data = make_loader(
        CarvanaDataset(cfg.input_dir, train_ids, size, augment=cfg.augment, dtype=torch.uint8),
        cfg.batch_size,
        shuffle=True,
        workers=cfg.workers,
        pin_memory=pin_memory,
        seed=cfg.seed,
    )
    valid_data = None
    if valid_ids:
        valid_data = make_loader(
            CarvanaDataset(cfg.input_dir, valid_ids, size, dtype=torch.uint8),
            cfg.batch_size,
            workers=cfg.workers,
            pin_memory=pin_memory,
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
    if not cfg.predict or not is_main_process():
        return
    test_set = CarvanaDataset(
        cfg.input_dir, size=tuple(cfg.image_size), split="test", dtype=torch.uint8
    )
    test_data = make_loader(test_set, cfg.batch_size, workers=cfg.workers, pin_memory=_pin_memory())
    writer = PredictionWriter(Path(learner.run_dir) / FILE_NAME, test_set, cfg.threshold)
    added = [writer] + ([FlipTTA(cfg.tta)] if cfg.tta != "none" else [])
    for plugin in added:
        learner.add_plugin(plugin)
    try:
        learner.predict(test_data, keep=False)
    finally:
        for plugin in added:
            learner.plugin_manager.unregister(plugin)
    _say(f"submission: {writer.path} ({writer.count} rows)")
