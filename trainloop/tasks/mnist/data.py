"""MNIST as four in-memory tensors, read through ``torchvision.datasets.MNIST``.

``load_mnist`` skips torchvision's per-sample PIL path: it takes the whole ``uint8``
image tensor (``dataset.data``) and normalises it in one operation, which is what makes
``TensorBatches`` over MNIST fast.

The data folder has torchvision's layout: ``DATA_DIR/MNIST/raw/`` holds the four standard
IDX files, plain or gzipped (``train-images-idx3-ubyte[.gz]``, ...). ``write_idx_files``
writes small valid ones, for tests and offline demos.
"""

from __future__ import annotations

import gzip
import os
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from trainloop.errors import UsageError

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# name -> (magic number, number of dimensions); the magic is 0x08 (unsigned byte) * 256
# + the number of dimensions.
IDX_FILES = {
    "train-images-idx3-ubyte": (2051, 3),
    "train-labels-idx1-ubyte": (2049, 1),
    "t10k-images-idx3-ubyte": (2051, 3),
    "t10k-labels-idx1-ubyte": (2049, 1),
}

# Without a timeout a download on a machine whose network silently drops packets hangs
# forever; torchvision sets none.
DOWNLOAD_TIMEOUT_S = 60.0


def load_mnist(
    data_dir: Path, download: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load MNIST as ``(train_x, train_y, test_x, test_y)``.

    Images come back as float32 rows of 784 pixels, normalised as
    ``(pixel / 255 - 0.1307) / 0.3081``; labels as int64. The IDX files are read from
    ``data_dir/MNIST/raw/``; gzipped files without a plain copy are decompressed next to
    themselves first (torchvision only reads the plain ones).

    Args:
        data_dir: the folder that holds ``MNIST/raw/``.
        download: fetch the missing files with torchvision's downloader.

    Raises:
        UsageError: files are missing (and ``download`` is false or fails), or one is
            corrupt or empty; the message names the files and the folder they belong in.

    Example:
        >>> train_x, train_y, test_x, test_y = load_mnist(Path("data"), download=True)  # doctest: +SKIP
        >>> train_x.shape, train_y.dtype  # doctest: +SKIP
        (torch.Size([60000, 784]), torch.int64)
    """
    import torchvision  # here, not at the top: it takes seconds (torch._dynamo with it)

    data_dir = Path(data_dir).expanduser()
    raw_dir = data_dir / "MNIST" / "raw"
    _decompress_lone_gz_files(raw_dir)
    if _missing_files(raw_dir):
        if not download:
            raise UsageError(_missing_files_message(data_dir))
        _download(data_dir)

    counts = {name: _check_idx_file(raw_dir / name) for name in IDX_FILES}
    for name, count in counts.items():
        if count == 0:  # torchvision cannot read an empty IDX file (a numpy ValueError)
            raise UsageError(
                f"MNIST file {raw_dir / name} holds 0 samples; replace it with an intact copy."
            )
    for split in ("train", "t10k"):
        images, labels = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        if counts[images] != counts[labels]:
            raise UsageError(
                f"MNIST files in {raw_dir} do not match: {images} holds {counts[images]} "
                f"images but {labels} {counts[labels]} labels; replace them with an intact pair."
            )

    tensors = []
    for train, split in ((True, "train"), (False, "t10k")):
        dataset = torchvision.datasets.MNIST(root=data_dir, train=train, download=False)
        if len(dataset.targets) and int(dataset.targets.max()) > 9:
            raise UsageError(
                f"MNIST file {raw_dir / f'{split}-labels-idx1-ubyte'} holds labels above 9; "
                "replace it with an intact copy."
            )
        tensors += [_normalise(dataset.data), dataset.targets.long()]
    train_x, train_y, test_x, test_y = tensors
    return train_x, train_y, test_x, test_y


def _normalise(images: torch.Tensor) -> torch.Tensor:
    pixels = images.reshape(len(images), -1).to(torch.float32)
    return pixels.div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)


def _missing_files(raw_dir: Path) -> list[str]:
    return [name for name in IDX_FILES if not (raw_dir / name).is_file()]


def _missing_files_message(data_dir: Path) -> str:
    raw_dir = data_dir / "MNIST" / "raw"
    files = ", ".join(f"{name}[.gz]" for name in _missing_files(raw_dir))
    message = (
        f"MNIST files not found: put {files} in {raw_dir}/ "
        f"(--data-dir names the folder that holds MNIST/raw/), or allow the download"
    )
    # The usual slips: --data-dir names the MNIST folder, the raw folder, or a flat folder.
    if _has_idx_files(data_dir / "raw") and data_dir.name == "MNIST":
        return (
            message
            + f"; they seem to be in {data_dir / 'raw'}, so try --data-dir {data_dir.parent}."
        )
    if _has_idx_files(data_dir) and data_dir.name == "raw" and data_dir.parent.name == "MNIST":
        return (
            message
            + f"; they seem to be in {data_dir}, so try --data-dir {data_dir.parent.parent}."
        )
    if _has_idx_files(data_dir):
        return message + f"; they seem to be in {data_dir}, so move them into {raw_dir}/."
    return message + "."


def _has_idx_files(folder: Path) -> bool:
    return any(folder.glob("train-images-idx3-ubyte*"))


def _decompress_lone_gz_files(raw_dir: Path) -> None:
    for name in IDX_FILES:
        plain, packed = raw_dir / name, raw_dir / f"{name}.gz"
        if plain.is_file() or not packed.is_file():
            continue
        try:
            content = gzip.decompress(packed.read_bytes())
        except (OSError, EOFError, zlib.error) as error:
            raise UsageError(
                f"MNIST file {packed} is not a valid gzip file ({error}); "
                "delete it and put an intact copy there."
            ) from error
        # Through a temporary name, so that an interrupted run never leaves a truncated
        # plain file that later passes the existence check.
        partial = plain.with_name(f"{name}.partial")
        try:
            partial.write_bytes(content)
            os.replace(partial, plain)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise UsageError(
                f"Cannot write the decompressed MNIST file {plain} ({error.strerror}); "
                f"make {raw_dir} writable or decompress {packed.name} there yourself."
            ) from error


def _download(data_dir: Path) -> None:
    import torchvision

    raw_dir = data_dir / "MNIST" / "raw"
    previous_timeout = socket.getdefaulttimeout()
    if previous_timeout is None:
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # Downloads all four files (and checks their MD5) whichever split is asked for.
        torchvision.datasets.MNIST(root=data_dir, train=False, download=True)
    except (RuntimeError, OSError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(error).__name__
        files = ", ".join(f"{name}[.gz]" for name in _missing_files(raw_dir))
        raise UsageError(
            f"Could not download MNIST ({reason}): put {files} in {raw_dir}/ yourself "
            "(--data-dir names the folder that holds MNIST/raw/)."
        ) from error
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _check_idx_file(path: Path) -> int:
    """Check an IDX file's header against its size (a few bytes read); return its length."""
    expected_magic, ndim = IDX_FILES[path.name]
    header_size = 4 * (1 + ndim)
    with open(path, "rb") as file:
        header = file.read(header_size)
    problem = None
    if len(header) < header_size:
        problem = f"{len(header)} bytes, shorter than an IDX header"
    else:
        magic, *dims = struct.unpack(f">{1 + ndim}I", header)
        expected_size = header_size + int(np.prod(dims))
        actual_size = path.stat().st_size
        if magic != expected_magic:
            problem = f"magic number {magic}, expected {expected_magic}"
        elif ndim == 3 and dims[1:] != [28, 28]:
            problem = f"images of {dims[1]}x{dims[2]} pixels, expected 28x28"
        elif actual_size != expected_size:
            problem = f"{actual_size} bytes, its header announces {expected_size}"
    if problem:
        raise UsageError(
            f"MNIST file {path} is corrupt or truncated ({problem}); "
            "delete it and put an intact copy there."
        )
    return dims[0]


# Seven-segment drawings of the digits, for write_idx_files: a learnable stand-in for
# handwriting. Segments: a top, b top right, c bottom right, d bottom, e bottom left,
# f top left, g middle.
_SEGMENTS = (
    "abcdef",
    "bc",
    "abdeg",
    "abcdg",
    "bcfg",
    "acdfg",
    "acdefg",
    "abc",
    "abcdefg",
    "abcdfg",
)


def _digit_templates() -> np.ndarray:
    """Ten 28x28 float images of the digits 0-9 in seven-segment style, centred."""
    top, left, height, width, stroke = 4, 8, 20, 12, 3
    middle = top + height // 2
    boxes = {  # segment -> (row slice, column slice)
        "a": (slice(top, top + stroke), slice(left, left + width)),
        "d": (slice(top + height - stroke, top + height), slice(left, left + width)),
        "g": (slice(middle - 1, middle - 1 + stroke), slice(left, left + width)),
        "f": (slice(top, middle + 1), slice(left, left + stroke)),
        "b": (slice(top, middle + 1), slice(left + width - stroke, left + width)),
        "e": (slice(middle - 1, top + height), slice(left, left + stroke)),
        "c": (slice(middle - 1, top + height), slice(left + width - stroke, left + width)),
    }
    templates = np.zeros((10, 28, 28), dtype=np.float32)
    for digit, segments in enumerate(_SEGMENTS):
        for segment in segments:
            templates[(digit, *boxes[segment])] = 1.0
    return templates


def write_idx_files(
    raw_dir: Path, n_train: int, n_test: int, seed: int = 0, gz: bool = True
) -> list[Path]:
    """Write a small, valid, learnable MNIST look-alike into ``raw_dir`` (for tests).

    The four files have the standard IDX format and names (big-endian header, magic 2051
    and dimensions ``N, 28, 28`` for images, magic 2049 and ``N`` for labels), so that
    ``torchvision.datasets.MNIST`` and ``load_mnist`` read them as the real data set.
    Each image is its label drawn as a seven-segment digit, shifted by up to one pixel,
    with random stroke brightness and noise: a small MLP learns it to over 95% accuracy
    in a few epochs. Labels are balanced over the ten classes. The same ``seed`` writes
    the same bytes (gzip timestamps included).

    Args:
        raw_dir: the folder to write to, usually ``DATA_DIR / "MNIST" / "raw"``; created.
        n_train: the number of training samples.
        n_test: the number of test samples.
        seed: seeds the labels, shifts and noise.
        gz: write ``*.gz`` files only (as downloaded); otherwise the plain files only.

    Returns:
        The paths written: train images, train labels, test images, test labels.

    Example:
        >>> write_idx_files(tmp_path / "MNIST" / "raw", n_train=500, n_test=100)  # doctest: +SKIP
        >>> train_x, train_y, test_x, test_y = load_mnist(tmp_path, download=False)  # doctest: +SKIP
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = _digit_templates()
    padded = np.pad(templates, ((0, 0), (1, 1), (1, 1)))
    written = []
    for split, count in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)
        shifts = rng.integers(0, 3, size=(count, 2))
        images = np.zeros((count, 28, 28), dtype=np.float32)
        for index, (label, (row, col)) in enumerate(zip(labels, shifts, strict=True)):
            images[index] = padded[label, row : row + 28, col : col + 28]
        brightness = rng.uniform(150, 255, size=(count, 1, 1))
        noise = rng.normal(0, 30, size=images.shape)
        pixels = np.clip(images * brightness + noise, 0, 255).round().astype(np.uint8)
        files = {
            f"{split}-images-idx3-ubyte": struct.pack(">IIII", 2051, count, 28, 28)
            + pixels.tobytes(),
            f"{split}-labels-idx1-ubyte": struct.pack(">II", 2049, count) + labels.tobytes(),
        }
        for name, content in files.items():
            path = raw_dir / (f"{name}.gz" if gz else name)
            path.write_bytes(gzip.compress(content, compresslevel=1, mtime=0) if gz else content)
            written.append(path)
    return written
