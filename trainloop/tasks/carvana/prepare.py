"""A Carvana input folder made ready to load: Kaggle's zip files unpacked, or a synthetic set."""

from __future__ import annotations

import os

from trainloop.tasks.carvana.files import unpack
from trainloop.tasks.carvana.synthetic import ensure_data

__all__ = ["SYNTHETIC_CARS", "SYNTHETIC_SIZE", "SYNTHETIC_TEST_CARS", "prepare_input"]

SYNTHETIC_CARS = 20
"""Training cars of a generated set when not given (16 photos each)."""
SYNTHETIC_TEST_CARS = 2
"""Test cars of a generated set when not given."""
SYNTHETIC_SIZE = (288, 192)
"""``(width, height)`` of a generated set's photos when not given."""


def prepare_input(
    input_dir: str | os.PathLike,
    *,
    generate: bool,
    cars: int | None = None,
    test_cars: int | None = None,
    size: tuple[int, int] | None = None,
    seed: int = 0,
) -> str | None:
    """Generate a synthetic set in ``input_dir`` when it has no Carvana data and
    ``generate`` allows it; otherwise unpack whichever Kaggle zip files it holds.

    ``cars``, ``test_cars`` and ``size`` describe the generated set (``None``:
    :data:`SYNTHETIC_CARS`, :data:`SYNTHETIC_TEST_CARS`, :data:`SYNTHETIC_SIZE`); the
    same ``seed`` generates the same files. Returns one line that says what was done, or
    ``None`` when the folder was ready as it was.
    """
    cars = SYNTHETIC_CARS if cars is None else cars
    test_cars = SYNTHETIC_TEST_CARS if test_cars is None else test_cars
    width, height = SYNTHETIC_SIZE if size is None else size
    generated = generate and ensure_data(
        input_dir, n_train_cars=cars, n_test_cars=test_cars, size=(width, height), seed=seed
    )
    if generated:
        return (
            f"no Carvana data in {input_dir}: generated a synthetic set there "
            f"({cars} training and {test_cars} test cars, {width}x{height} photos)"
        )
    unpacked = unpack(input_dir)
    if unpacked:
        return f"unpacked {', '.join(unpacked)} in {input_dir}"
    return None
