"""Carvana photos and masks as tensors: reading, resizing, augmenting, loading.

::

    from trainloop.tasks.carvana.dataset import CarvanaDataset, make_loader

    train_data = make_loader(
        CarvanaDataset("input", train_ids, size=(480, 320), augment=True),
        batch_size=8, shuffle=True, workers=2, seed=0,
    )  # with the SetDataEpoch plugin on the Learner: order and augmentation from (seed, epoch)

Sizes are ``(width, height)`` throughout, as image files state them; torchvision wants
``(height, width)`` and this module does that conversion in one place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.io
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import query_size

from trainloop.data.seeding import seeded_loader
from trainloop.errors import UsageError
from trainloop.hookspecs import hookimpl

__all__ = [
    "CarvanaDataset",
    "DataFileError",
    "FloatImages",
    "SharedGridAffine",
    "make_loader",
    "read_jpeg",
    "read_mask",
    "resize_mask",
    "training_loaders",
]


class DataFileError(UsageError):
    """A photo or mask that cannot be loaded: missing, corrupt, or of the wrong size.

    When a DataLoader worker process raises it, PyTorch raises it again in the main
    process with the worker's whole traceback as the message; this keeps only the
    original message, so the command line still prints one line (``--debug`` shows the
    traceback).
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def read_jpeg(path: str | os.PathLike) -> torch.Tensor:
    """Decode a JPEG file into a uint8 RGB tensor of shape ``(3, height, width)``.

    Uses torchvision's libjpeg-turbo decoder, about twice as fast as Pillow's route
    through numpy into a channels-first tensor. Raises ``UsageError`` naming the file when
    it is missing or corrupt.
    """
    try:
        data = torchvision.io.read_file(str(path))
        return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError as error:
        if not Path(path).exists():
            raise DataFileError(
                f"{path} does not exist: check the input folder and the image ids"
            ) from None
        # torchvision prefixes its reason with "function, source file:line, ".
        reason = str(error).strip().splitlines()[0].split(", ")[-1] if str(error) else "unknown"
        raise DataFileError(
            f"{path} is not a readable JPEG image ({reason}): replace it with the original "
            f"from the Kaggle zip file"
        ) from None


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """Read a mask file (GIF on Kaggle) into a uint8 tensor of 0 and 1, shape ``(1, height, width)``.

    Any non-zero palette index or grey value is foreground. Raises ``UsageError`` naming
    the file when it is missing or unreadable.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "1"):
                image = image.convert("L")
            pixels = np.asarray(image)
    except FileNotFoundError:
        raise DataFileError(
            f"{path} does not exist: unzip train_masks.zip into the input folder"
        ) from None
    except Exception as error:
        raise DataFileError(
            f"{path} is not a readable mask ({error}): replace it with the original from the "
            f"Kaggle zip file"
        ) from None
    return torch.from_numpy((pixels != 0).astype(np.uint8)).unsqueeze(0)


class SharedGridAffine(v2.RandomAffine):
    """``v2.RandomAffine`` (no shear) that samples photo and mask through one shared grid.

    Same random draw and result as ``v2.RandomAffine`` with nearest-neighbour sampling and
    zero fill; about three times faster on CPU, where the affine transform would otherwise
    cost more than decoding the JPEG: torchvision builds a sampling grid for each input
    with a batched matrix product, this builds it once per draw by broadcasting. Inputs
    other than float images and masks go to ``v2.RandomAffine``.
    """

    def make_params(self, flat_inputs: list) -> dict:
        params = super().make_params(flat_inputs)
        height, width = query_size(flat_inputs)
        # Output pixel p (centred coordinates) samples the input at R(-angle) (p - t) / scale.
        angle = math.radians(params["angle"])
        cos, sin = math.cos(angle) / params["scale"], math.sin(angle) / params["scale"]
        shift_x, shift_y = params["translate"]
        columns = torch.arange(width, dtype=torch.float32) - (width - 1) / 2 - shift_x
        rows = torch.arange(height, dtype=torch.float32)[:, None] - (height - 1) / 2 - shift_y
        # Normalised to [-1, 1] across the pixels' outer edges, grid_sample's align_corners=False.
        source_x = (cos * columns + sin * rows) / (width / 2)
        source_y = (-sin * columns + cos * rows) / (height / 2)
        params["grid"] = torch.stack(torch.broadcast_tensors(source_x, source_y), dim=-1)[None]
        return params

    def transform(self, inpt, params: dict):
        if isinstance(inpt, tv_tensors.Image | tv_tensors.Mask) and inpt.is_floating_point():
            batch = inpt.as_subclass(torch.Tensor).unsqueeze(0)
            sampled = torch.nn.functional.grid_sample(
                batch, params["grid"], mode="nearest", padding_mode="zeros", align_corners=False
            )
            return tv_tensors.wrap(sampled[0], like=inpt)
        return super().transform(inpt, params)


def _transform(size: tuple[int, int] | None, augment: bool, dtype: torch.dtype) -> v2.Compose:
    steps: list[v2.Transform] = []
    if size is not None:
        width, height = size
        # torchvision sizes are (height, width). Masks are resized with nearest neighbours.
        steps.append(v2.Resize((height, width), antialias=True))
    if augment or dtype == torch.float32:
        # Resizing is fastest on uint8; the augmentations below are fastest on float32,
        # which spares them a conversion to float and back each.
        steps.append(
            v2.ToDtype(
                {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.float32}, scale=True
            )
        )
    if augment:
        steps += [
            v2.RandomHorizontalFlip(),
            SharedGridAffine(degrees=5.0, translate=(0.04, 0.04), scale=(0.95, 1.05)),
            # Colour transforms leave masks alone; hue is left out, it is slow on CPU.
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
    if augment and dtype == torch.uint8:
        steps.append(
            v2.ToDtype({tv_tensors.Image: torch.uint8, tv_tensors.Mask: torch.uint8}, scale=True)
        )
    return v2.Compose(steps)


class CarvanaDataset(Dataset):
    """Carvana photos (and, for ``split="train"``, their masks) as tensors.

    ``ids`` are image ids without extension (``"00087a6bd4dc_01"``); ``None`` takes every
    photo of the split's folder. ``size`` = ``(width, height)`` resizes photos and masks
    (``None`` keeps the original size). ``augment`` applies a random horizontal flip, a
    small random affine transform and colour jitter (photo only); photo and mask share one
    random draw, so they stay aligned.

    Items of ``split="train"`` are ``(image, mask)``: ``image`` float32 ``(3, H, W)`` with
    values in [0, 1] (not normalised by a mean and std: the U-Net's BatchNorm takes care of
    scale), ``mask`` float32 ``(1, H, W)`` of 0 and 1. Items of ``split="test"`` are
    ``(image, index)``; ``names[index]`` is the file name for the submission and
    ``original_size(index)`` the size to resize the prediction back to.

    ``dtype=torch.uint8`` returns the photo as 0..255 and the mask as 0 and 1 in uint8
    instead: a quarter of the bytes for the loader workers to hand over through shared
    memory (which costs them about as much as decoding, at 480x320) and to copy to the
    GPU; convert there with ``image.float() / 255`` and ``mask.float()``.
    """

    def __init__(
        self,
        input_dir: str | os.PathLike,
        ids: Sequence[str] | None = None,
        size: tuple[int, int] | None = None,
        augment: bool = False,
        split: str = "train",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f'split must be "train" or "test", got {split!r}')
        if dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
        if augment and split == "test":
            raise ValueError("augment applies to the training split only")
        self.input_dir = Path(input_dir)
        self.split = split
        self.image_dir = self.input_dir / split
        self.mask_dir = self.input_dir / "train_masks"
        if ids is None:
            if not self.image_dir.is_dir():
                raise UsageError(
                    f"{self.image_dir} does not exist: unzip {split}.zip into {self.input_dir}"
                )
            ids = sorted(
                name.removesuffix(".jpg")
                for name in os.listdir(self.image_dir)
                if name.endswith(".jpg")
            )
        self.ids = list(ids)
        if not self.ids:
            raise UsageError(
                f"{self.image_dir} has no .jpg images to load: unzip {split}.zip into {self.input_dir}"
            )
        self.names = [f"{image_id}.jpg" for image_id in self.ids]
        self.size = size
        self.augment = augment
        self.dtype = dtype
        self.transform = _transform(size, augment, dtype)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        """The photo file of item ``index``."""
        return self.image_dir / self.names[index]

    def mask_path(self, index: int) -> Path:
        """The mask file of item ``index`` (training split)."""
        return self.mask_dir / f"{self.ids[index]}_mask.gif"

    def original_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of photo ``index`` as its file header states it."""
        with Image.open(self.image_path(index)) as image:
            return image.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | int]:
        image = tv_tensors.Image(read_jpeg(self.image_path(index)))
        if self.split == "test":
            return self.transform(image).as_subclass(torch.Tensor), index
        mask = tv_tensors.Mask(read_mask(self.mask_path(index)))
        if image.shape[-2:] != mask.shape[-2:]:
            raise DataFileError(
                f"{self.mask_path(index)} is {mask.shape[-1]}x{mask.shape[-2]} but its image "
                f"{self.image_path(index)} is {image.shape[-1]}x{image.shape[-2]}: replace them "
                f"with the originals from the Kaggle zip files"
            )
        if self.size is not None:
            mask = resize_mask(mask, self.size)  # the transform's Resize then leaves it as is
        image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> tv_tensors.Mask:
    """A 0/1 mask ``(1, H, W)`` resized to ``size`` = ``(width, height)`` by area, not nearest.

    Each new pixel is car where most of the area it covers is car (bilinear with
    antialiasing, then a threshold at one half), which is what the resized photo shows.
    Nearest-neighbour resizing keeps an irregular grid of the original pixels (at a
    factor such as 0.72) and gives jagged outlines that no model can match: synthetic car
    masks drawn at 200x136 and resized to 144x96 agree with the same cars drawn at 144x96
    to a mean Dice of 0.971 by nearest neighbour, 0.982 by area.
    """
    width, height = size
    if tuple(mask.shape[-2:]) == (height, width):
        return tv_tensors.Mask(mask)
    area = torch.nn.functional.interpolate(
        mask.as_subclass(torch.Tensor)[None].float(),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0]
    return tv_tensors.Mask((area > 0.5).to(torch.uint8))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with ``workers`` processes kept between epochs.

    Built with :func:`~trainloop.data.seeding.seeded_loader`: the order of each epoch
    and every sample's augmentation come from ``(seed, epoch)``, so the batches are the
    same with any number of workers and in a resumed run (the learner needs the
    :class:`~trainloop.data.seeding.SetDataEpoch` plugin). ``pin_memory`` takes effect
    only when CUDA is available (it is useless, and warns, without it).
    """
    return seeded_loader(
        dataset,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
    )


def training_loaders(
    input_dir: str | os.PathLike,
    train_ids: Sequence[str],
    valid_ids: Sequence[str],
    size: tuple[int, int],
    batch_size: int,
    *,
    augment: bool = True,
    workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader | None]:
    """The training loader (shuffled, augmented) and the validation loader (``None``
    without validation ids) of a Carvana run, at ``size`` = ``(width, height)``.

    Their batches are uint8 (a quarter of the bytes through the loaders): register
    :class:`FloatImages` on the learner for float32 on the device. Order and augmentation
    come from ``(seed, epoch)`` (:func:`make_loader`): exact resumes with any ``workers``.
    """
    train_data = make_loader(
        CarvanaDataset(input_dir, train_ids, size, augment=augment, dtype=torch.uint8),
        batch_size,
        shuffle=True,
        workers=workers,
        pin_memory=pin_memory,
        seed=seed,
    )
    valid_data = None
    if valid_ids:
        valid_data = make_loader(
            CarvanaDataset(input_dir, valid_ids, size, dtype=torch.uint8),
            batch_size,
            workers=workers,
            pin_memory=pin_memory,
            seed=seed,
        )
    return train_data, valid_data


class FloatImages:
    """A plugin that turns ``CarvanaDataset(dtype=torch.uint8)`` batches into float32 once
    they are on the device: the photo divided by 255, the mask as 0.0 and 1.0.

    The loader workers then hand over a quarter of the bytes, and the host-to-device copy
    is a quarter as large; the conversion runs where the model runs. It wraps the
    ``transfer_batch`` step, so it works with whichever plugin places batches.
    """

    @hookimpl(wrapper=True)
    def transfer_batch(self, batch):
        batch = yield
        image, second, *rest = batch
        if image.dtype == torch.uint8:
            image = image.float().div_(255)
        if second.dtype == torch.uint8:  # a training mask; a test batch carries int64 indices
            second = second.float()
        return (image, second, *rest)
