"""The Carvana training photos split into training and validation, by car."""

from __future__ import annotations

import numbers
import random
from collections.abc import Sequence

from trainloop.errors import UsageError
from trainloop.tasks.carvana.files import car_id_of

__all__ = ["split_by_car", "train_valid_ids", "varied_order"]


def split_by_car(
    ids: Sequence[str],
    valid_size: float | int = 0.2,
    sample_size: int | None = None,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Split image ids into training and validation ids with no car on both sides.

    The 16 views of a car are near duplicates, so a split by image would leak the
    validation cars into training. ``valid_size`` is a fraction of the cars when a float
    (``0.2``; at least one car when above 0) and a number of images when an int (``320``,
    rounded down to whole cars, at least one car when above 0). ``sample_size``, when
    given, first keeps about that many images (whole cars, at least one), for quick runs.
    The same ``seed`` gives the same split whatever the order of ``ids``. Returns two
    sorted lists.
    """
    if isinstance(valid_size, bool) or not isinstance(valid_size, numbers.Real):
        raise UsageError(
            f"valid_size {valid_size!r} must be a fraction like 0.2 or a number of images"
        )
    if isinstance(valid_size, numbers.Integral) and valid_size < 0:
        raise UsageError(f"valid_size {valid_size} must not be negative")
    if not isinstance(valid_size, numbers.Integral) and not 0.0 <= valid_size < 1.0:
        raise UsageError(
            f"valid_size {valid_size} must be a fraction in [0, 1) or a number of images"
        )
    if sample_size is not None and sample_size < 1:
        raise UsageError(f"sample_size {sample_size} must be at least 1 image, or None for all")
    images_of: dict[str, list[str]] = {}
    for image_id in ids:
        images_of.setdefault(car_id_of(image_id), []).append(image_id)
    if not images_of:
        raise UsageError("there are no training images to split: check the input folder")
    cars = sorted(images_of)
    random.Random(seed).shuffle(cars)

    def leading_cars(image_count: int) -> list[str]:
        """The first cars whose images add up to ``image_count`` at most (one car at least)."""
        taken, total = [], 0
        for car in cars:
            if taken and total + len(images_of[car]) > image_count:
                break
            taken.append(car)
            total += len(images_of[car])
        return taken

    if sample_size is not None:
        cars = leading_cars(sample_size)
    if valid_size == 0:
        valid_cars = []
    elif isinstance(valid_size, numbers.Integral):
        valid_cars = leading_cars(int(valid_size))
    else:
        valid_cars = cars[: max(1, round(valid_size * len(cars)))]
    if len(valid_cars) >= len(cars):
        raise UsageError(
            f"valid_size {valid_size} leaves no car for training out of {len(cars)}: "
            f"use a smaller valid_size or more images"
        )
    valid_set = set(valid_cars)
    train_ids = [image_id for car in cars if car not in valid_set for image_id in images_of[car]]
    valid_ids = [image_id for car in valid_cars for image_id in images_of[car]]
    return sorted(train_ids), sorted(valid_ids)


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


def train_valid_ids(
    ids: Sequence[str], valid_size: float, sample_size: int | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """The training ids, sorted, and the validation ids in :func:`varied_order`.

    The split of :func:`split_by_car`, with ``valid_size`` as one number (a command-line
    option): below 1 a fraction of the cars, from 1 on a number of images. The first
    validation photos are the ones pictured each epoch, so they show different cars from
    different sides.
    """
    count_or_fraction = int(valid_size) if valid_size >= 1 else valid_size
    train_ids, valid_ids = split_by_car(ids, count_or_fraction, sample_size, seed)
    return train_ids, varied_order(valid_ids)
