"""Kaggle run-length encoding of binary masks.

Kaggle's segmentation competitions (Carvana among them) submit each mask as one string of
space-separated ``start length`` pairs:

- the mask is flattened row-major: left to right along the first row, then the next row
  down, and so on (``mask.ravel()`` for a ``(height, width)`` array);
- ``start`` is the 1-indexed position in that flat sequence where a run of foreground
  pixels begins, and ``length`` is the number of foreground pixels in the run;
- runs are listed in increasing order and never touch or overlap;
- an empty mask is the empty string.

For example the 2x3 mask ``[[0, 1, 1], [1, 0, 1]]`` flattens to ``0 1 1 1 0 1`` and
encodes as ``"2 3 6 1"``. The first line of Carvana's ``train_masks.csv`` begins
``00087a6bd4dc_01.jpg,879386 40 881253 141 ...``: on a 1918-pixel wide image, pixel
879386 is row 458, column 941.

Both directions are vectorised with numpy: encoding a 1918x1280 mask takes a few
milliseconds.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rle_decode", "rle_encode"]


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (any non-zero value is foreground) as a Kaggle RLE string.

    >>> rle_encode(np.array([[0, 1, 1], [1, 0, 1]]))
    '2 3 6 1'
    """
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D (height, width) mask, got shape {mask.shape}")
    flat = mask.ravel()
    if flat.dtype != np.bool_:
        flat = flat != 0
    # One False on each side turns every run into exactly one rising and one falling edge,
    # even when the first or the last pixel is set.
    padded = np.zeros(flat.size + 2, dtype=np.bool_)
    padded[1:-1] = flat
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    # edges holds 0-indexed starts and ends alternately; start + 1 makes it 1-indexed.
    edges[1::2] -= edges[::2]
    edges[::2] += 1
    return " ".join(map(str, edges.tolist()))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode a Kaggle RLE string into a boolean mask of ``shape`` = ``(height, width)``.

    Raises ``ValueError`` when the string is malformed: a token that is not an integer, an
    odd number of tokens, a start below 1 or a length below 1, runs out of order or
    overlapping, or a run past the end of the mask. The caller knows which file the string
    came from and names it.

    >>> rle_decode("2 3 6 1", (2, 3)).astype(int).tolist()
    [[0, 1, 1], [1, 0, 1]]
    """
    height, width = shape
    pixel_count = height * width
    tokens = rle.split()
    if len(tokens) % 2:
        raise ValueError(f"RLE string has an odd number of values ({len(tokens)})")
    try:
        numbers = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((token for token in tokens if not token.isdigit()), "a number too large")
        raise ValueError(f"RLE string holds {bad!r}, which is not a positive integer") from None
    starts = numbers[0::2] - 1
    lengths = numbers[1::2]
    if starts.size == 0:
        return np.zeros(shape, dtype=np.bool_)
    if starts.min() < 0:
        raise ValueError("RLE string has a start below 1 (starts are 1-indexed)")
    if lengths.min() < 1:
        raise ValueError("RLE string has a run length below 1")
    ends = starts + lengths
    if np.any(starts[1:] < ends[:-1]):
        raise ValueError("RLE string has runs that are out of order or overlap")
    if ends[-1] > pixel_count:
        raise ValueError(
            f"RLE string has a run ending at pixel {ends[-1]}, past the {height}x{width} "
            f"mask's {pixel_count} pixels"
        )
    # Alternating gap/run lengths expanded with np.repeat fill the mask in one pass.
    gaps = starts - np.concatenate(([0], ends[:-1]))
    run_lengths = np.empty(2 * starts.size + 1, dtype=np.int64)
    run_lengths[0:-1:2] = gaps
    run_lengths[1::2] = lengths
    run_lengths[-1] = pixel_count - ends[-1]
    values = np.zeros(run_lengths.size, dtype=np.bool_)
    values[1::2] = True
    return np.repeat(values, run_lengths).reshape(shape)
