"""The prediction-writing path of the Carvana submission: speed, and memory that stays flat.

Feeds ``learner.predict`` batches of 128x128 logit maps shaped like car masks (drawn by
the synthetic generator, softened at the edges) through Carvana's ``SubmissionWriter``
(a ``PredictionWriter`` of the predictions plugin), exactly as the recipe does: each map
goes through a sigmoid, is resized to 1918x1280 (bilinear), thresholded, run-length
encoded and written as a gzipped CSV row of ``submit.csv.gz``. The model is the identity, so only the writing
path is timed. Prints images per second, and for 100 and 2,000 images the peak memory:
what ``tracemalloc`` saw allocated at once (Python objects and NumPy arrays), and the
growth of the process's peak resident size (``ru_maxrss``) over the run, after a
one-batch warm-up, which also counts torch's buffers. Each count runs in a fresh process, so peaks do not carry over.
Both must not grow with the number of images: predictions are never held in memory.

    python benchmarks/predictions_bench.py [--counts 100 2000] [--batch-size 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainloop import Learner
from trainloop.tasks.carvana.submission import SubmissionWriter
from trainloop.tasks.carvana.synthetic import VIEWS, SyntheticCar, render_view

ORIGINAL = (1918, 1280)  # (width, height) of the Carvana photos
MAP_SIZE = 128


class Identity(torch.nn.Module):
    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps


def car_logit_maps(count: int = 32, seed: int = 0) -> torch.Tensor:
    """``count`` maps of 128x128 logits: car masks with soft edges, as a U-Net gives them."""
    rng = np.random.default_rng(seed)
    masks = []
    while len(masks) < count:
        car = SyntheticCar.random(f"{len(masks):012x}", rng)
        for view in range(1, VIEWS + 1):
            masks.append(render_view(car, view, (MAP_SIZE, MAP_SIZE), rng)[1])
    probabilities = torch.from_numpy(np.stack(masks[:count])).float()[:, None]
    probabilities = F.avg_pool2d(probabilities, 5, stride=1, padding=2)  # soft edges
    return torch.logit(probabilities.clamp(0.01, 0.99))


def batches(maps: torch.Tensor, count: int, batch_size: int):
    """``count`` images in batches of ``(logits, indices)``, cycling through ``maps``."""
    for start in range(0, count, batch_size):
        indices = torch.arange(start, min(start + batch_size, count))
        yield maps[indices % len(maps)], indices


def run_once(count: int, batch_size: int, trace: bool) -> dict[str, float]:
    """Write a submission of ``count`` images; return its speed and memory figures."""
    maps = car_logit_maps()
    images = [(f"{index:012x}_01.jpg", ORIGINAL) for index in range(count)]
    folder = Path(tempfile.mkdtemp(prefix="predictions_bench_"))
    learner = Learner(Identity(), [], optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1))
    # A warm-up submission of one batch first: the buffers every image needs (a float
    # and a boolean 1918x1280 map, the RLE's arrays) are then part of the baseline.
    warm_up = SubmissionWriter(folder / "warm-up.csv.gz", images[:batch_size])
    learner.add_plugin(warm_up)
    learner.predict(batches(maps, batch_size, batch_size), keep=False)
    learner.plugin_manager.unregister(warm_up)
    learner.add_plugin(SubmissionWriter(folder / "submit.csv.gz", images))
    gc.collect()
    if trace:
        tracemalloc.start()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    learner.predict(batches(maps, count, batch_size), keep=False)
    seconds = time.perf_counter() - start
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    traced_peak = tracemalloc.get_traced_memory()[1] if trace else float("nan")
    tracemalloc.stop()
    size = (folder / "submit.csv.gz").stat().st_size
    return {
        "count": count,
        "per_second": count / seconds,
        "traced_peak_mb": traced_peak / 2**20,
        "rss_growth_mb": rss_growth / 1024,  # ru_maxrss is in KiB on Linux
        "file_mb": size / 2**20,
    }


def child(count: int, batch_size: int, threads: int, trace: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(count), "--batch-size",
               str(batch_size), "--threads", str(threads)] + (["--trace"] if trace else [])  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 2000])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    if arguments.child is not None:
        print(json.dumps(run_once(arguments.child, arguments.batch_size, arguments.trace)))
        return

    width, height = ORIGINAL
    print(
        f"SubmissionWriter: {MAP_SIZE}x{MAP_SIZE} logit maps -> sigmoid -> {width}x{height} "
        f"bilinear -> threshold -> RLE -> gzip row; batches of {arguments.batch_size}, "
        f"{arguments.threads} torch thread(s)"
    )
    for count in arguments.counts:
        speed = child(count, arguments.batch_size, arguments.threads, trace=False)
        memory = child(count, arguments.batch_size, arguments.threads, trace=True)
        print(
            f"{count:6d} images: {speed['per_second']:6.1f} images/s "
            f"({1000 / speed['per_second']:5.1f} ms each), peak memory: tracemalloc "
            f"{memory['traced_peak_mb']:6.1f} MB, ru_maxrss growth {speed['rss_growth_mb']:6.1f} MB; "
            f"submit.csv.gz {speed['file_mb']:.2f} MB"
        )


if __name__ == "__main__":
    main()
