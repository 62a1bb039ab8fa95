"""Kaggle RLE speed on full-size Carvana masks, one core.

Encodes and decodes 1918x1280 car masks drawn by the synthetic generator (every view of
a few cars, so the run counts are those of real masks: a few hundred to a few thousand
numbers per mask) and prints masks per second against the target of 200/s.

    python benchmarks/rle_bench.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from trainloop.tasks.carvana.rle import rle_decode, rle_encode
from trainloop.tasks.carvana.synthetic import VIEWS, SyntheticCar, render_view

WIDTH, HEIGHT = 1918, 1280
TARGET_PER_SECOND = 200


def car_masks(car_count: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = []
    for car_index in range(car_count):
        car = SyntheticCar.random(f"{car_index:012x}", rng)
        for view in range(1, VIEWS + 1):
            masks.append(render_view(car, view, (WIDTH, HEIGHT), rng)[1])
    return masks


def rate(function, items: list, seconds: float) -> float:
    """Items per second of ``function`` over ``items``, cycling for about ``seconds``."""
    function(items[0])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for item in items:
            function(item)
        done += len(items)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    arguments = parser.parse_args()

    masks = car_masks()
    encoded = [rle_encode(mask) for mask in masks]
    assert all(
        np.array_equal(rle_decode(text, (HEIGHT, WIDTH)), mask != 0)
        for text, mask in zip(encoded, masks, strict=True)
    )
    numbers = [len(text.split()) for text in encoded]
    coverage = np.mean([mask.mean() for mask in masks])
    print(
        f"{len(masks)} car masks of {WIDTH}x{HEIGHT}, {coverage:.0%} car on average, "
        f"{min(numbers)}-{max(numbers)} numbers per RLE string"
    )
    for name, function, items in (
        ("encode", rle_encode, masks),
        ("decode", lambda text: rle_decode(text, (HEIGHT, WIDTH)), encoded),
    ):
        per_second = rate(function, items, arguments.seconds)
        verdict = "meets" if per_second >= TARGET_PER_SECOND else "MISSES"
        print(
            f"rle {name}: {per_second:7.0f} masks/s, {1000 / per_second:5.2f} ms per mask "
            f"({verdict} the target of {TARGET_PER_SECOND}/s)"
        )


if __name__ == "__main__":
    main()
