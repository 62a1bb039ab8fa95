"""Throughput of the Carvana training data pipeline against decoding alone.

Measures, in images per second:

1. decode + resize alone, one process with one thread (what one loader worker can do at
   best): ``read_jpeg`` + ``read_mask`` + resizing both to the training size;
2. ``CarvanaDataset`` + ``make_loader`` with ``--workers`` processes, without and with
   augmentation, batches collated and handed to the main process, as float32 (the
   default) and as uint8 (``dtype=torch.uint8``, a quarter of the bytes to hand over).

and prints the loader's rate per worker as a share of (1); the target is 0.8. Each rate
comes twice: per second of wall-clock time, and per second of CPU time of the processes
doing the work (the workers, for the loader). On a machine shared with other jobs the
wall-clock figures swing with their load while the CPU-time ones stay put.

By default it generates 128 synthetic photos of 960x640 (half the real 1918x1280 on each
side) and trains at 480x320, which keeps the aspect ratio and divides by 16 for a U-Net
of depth 4.

    python benchmarks/data_pipeline_bench.py [--input DIR] [--size 480x320] [--workers 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as transforms

from trainloop.tasks.carvana.dataset import CarvanaDataset, make_loader, read_jpeg, read_mask
from trainloop.tasks.carvana.files import check_layout
from trainloop.tasks.carvana.synthetic import generate_dataset

TARGET_SHARE = 0.8


@dataclass
class Rate:
    """Images per wall-clock second and per CPU second of the working processes."""

    wall: float
    cpu: float


def parse_size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def children_cpu_seconds() -> float:
    """CPU time of the child processes that have ended (DataLoader workers, here)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def decode_and_resize_rate(dataset: CarvanaDataset, size: tuple[int, int], passes: int) -> Rate:
    """Decoding and resizing only, in this process."""
    width, height = size
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(passes):
        for index in range(len(dataset)):
            image = tv_tensors.Image(read_jpeg(dataset.image_path(index)))
            mask = tv_tensors.Mask(read_mask(dataset.mask_path(index)))
            transforms.resize(image, [height, width], antialias=True)
            transforms.resize(mask, [height, width])
    images = passes * len(dataset)
    return Rate(
        images / (time.perf_counter() - start_wall), images / (time.process_time() - start_cpu)
    )


def loader_rate(dataset: CarvanaDataset, batch_size: int, workers: int, passes: int) -> Rate:
    """Through the DataLoader; wall-clock time counts from the first batch on."""
    start_cpu = children_cpu_seconds()
    loader = make_loader(dataset, batch_size=batch_size, shuffle=True, workers=workers)
    batches = iter(loader)
    images = len(next(batches)[0])
    start_wall = time.perf_counter()
    timed_images = 0
    for _ in range(passes):
        for image_batch, _ in batches:
            timed_images += len(image_batch)
        batches = iter(loader)
    wall_seconds = time.perf_counter() - start_wall
    # Ending the persistent workers makes their CPU time visible to getrusage.
    del batches, loader
    gc.collect()
    cpu_seconds = children_cpu_seconds() - start_cpu
    # CPU time covers all images, the workers' start and their prefetching of one extra
    # epoch's first batches; the wall-clock rate covers the timed images only.
    prefetched = min(len(dataset), 2 * workers * batch_size)
    return Rate(timed_images / wall_seconds, (images + timed_images + prefetched) / cpu_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, help="a Carvana input folder (default: generate one)")
    parser.add_argument(
        "--source-size", type=parse_size, default=(960, 640), help="generated photos"
    )
    parser.add_argument("--size", type=parse_size, default=(480, 320), help="training size WxH")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--passes", type=int, default=2, help="epochs per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="measurements; the best counts")
    arguments = parser.parse_args()
    if arguments.workers < 1:
        parser.error("--workers must be at least 1")

    with tempfile.TemporaryDirectory() as scratch:
        input_dir = arguments.input
        if input_dir is None:
            input_dir = Path(scratch) / "input"
            generate_dataset(input_dir, n_train_cars=8, n_test_cars=0, size=arguments.source_size)
        layout = check_layout(input_dir, require_test=False)
        sizes = ", ".join(f"{width}x{height}" for width, height in layout.image_sizes)
        width, height = arguments.size
        print(
            f"{len(layout.train_ids)} photos of {sizes} -> {width}x{height}, batch "
            f"{arguments.batch_size}, {arguments.workers} workers, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} at the start"
        )
        datasets = {
            f"loader, {label}, {dtype_name}:": CarvanaDataset(
                input_dir, layout.train_ids, size=arguments.size, augment=augment, dtype=dtype
            )
            for dtype_name, dtype in (("float32", torch.float32), ("uint8", torch.uint8))
            for label, augment in (("plain", False), ("augmented", True))
        }
        plain = next(iter(datasets.values()))
        torch.set_num_threads(1)  # as in a DataLoader worker
        # Best of a few interleaved rounds: other jobs on the machine only ever slow a
        # measurement down.
        best = {name: Rate(0.0, 0.0) for name in ["decode", *datasets]}
        for _ in range(arguments.rounds):
            rates = {"decode": decode_and_resize_rate(plain, arguments.size, arguments.passes)}
            for name, dataset in datasets.items():
                rates[name] = loader_rate(
                    dataset, arguments.batch_size, arguments.workers, arguments.passes
                )
            for name, rate in rates.items():
                best[name] = Rate(max(best[name].wall, rate.wall), max(best[name].cpu, rate.cpu))
        decode = best["decode"]
        print(
            f"{'decode + resize alone:':34} {decode.wall:6.1f} images/s wall-clock, "
            f"{decode.cpu:6.1f} per CPU second, one process"
        )
        for name in datasets:
            rate = best[name]
            wall_share = rate.wall / arguments.workers / decode.wall
            cpu_share = rate.cpu / decode.cpu
            verdict = "meets" if cpu_share >= TARGET_SHARE else "misses"
            print(
                f"{name:34} {rate.wall:6.1f} images/s wall-clock ({wall_share:.2f} x per worker), "
                f"{rate.cpu:6.1f} per worker CPU second ({cpu_share:.2f} x, {verdict} "
                f"{TARGET_SHARE})"
            )


if __name__ == "__main__":
    main()
