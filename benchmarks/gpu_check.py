"""GPU check: the U-Net training step in fp32, bf16-mixed, fp16-mixed and channels_last.

One command, a few minutes, on a machine with an NVIDIA GPU::

    python benchmarks/gpu_check.py                 # synthetic Carvana photos, 960x640
    python benchmarks/gpu_check.py --data input    # the real Carvana train/ folder
    python benchmarks/gpu_check.py --compile       # also the torch.compile variants

It trains the Carvana recipe's model (``trainloop.tasks.carvana.unet.UNet``, loss
``bce_dice_loss``, Adam) through a ``Learner`` with the device and precision plugins,
on batches from ``CarvanaDataset`` through a ``DataLoader`` with pinned memory, and
prints for each variant:

* images per second, and the ratio to fp32;
* the peak GPU memory allocated;
* per batch, the time spent waiting for the data (the loader, plus the copy to the GPU)
  and the compute time (forward, loss, backward, optimizer step; the GPU is
  synchronised at each batch end, so the figures are honest but a little lower than
  an unsynchronised run), and the share of the step that waiting takes.

The first ``--warmup`` batches of each variant (worker start-up, cuDNN autotuning,
compilation) are not timed.

Without CUDA it prints one line saying so and exits with status 0. ``--smoke`` runs a
tiny version on the CPU instead, to check that the script itself works; its figures
mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from trainloop import Learner, batch_size
from trainloop.plugins.device import Compile, Device
from trainloop.plugins.precision import Precision
from trainloop.tasks.carvana.dataset import CarvanaDataset
from trainloop.tasks.carvana.losses import bce_dice_loss
from trainloop.tasks.carvana.synthetic import ensure_data
from trainloop.tasks.carvana.unet import UNet


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False


VARIANTS = (
    Variant("fp32"),
    Variant("bf16-mixed", "bf16-mixed"),
    Variant("fp16-mixed", "16-mixed"),
    Variant("channels_last", channels_last=True),
    Variant("channels_last bf16", "bf16-mixed", channels_last=True),
    Variant("channels_last fp16", "16-mixed", channels_last=True),
)
COMPILED_VARIANTS = (
    Variant("compile fp32", compile=True),
    Variant("compile channels_last bf16", "bf16-mixed", channels_last=True, compile=True),
)


class StepTimer:
    """Times each training batch: the wait for it, and its compute (synchronised)."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup = warmup
        self.device = device
        self.waits: list[float] = []
        self.computes: list[float] = []
        self.images = 0
        self._last_end = self._begin = 0.0

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_begin(self, learner: Learner) -> None:
        self._synchronize()
        self._last_end = time.perf_counter()

    def on_batch_begin(self, learner: Learner) -> None:
        now = time.perf_counter()
        if learner.iteration == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if learner.iteration >= self.warmup:
            self.waits.append(now - self._last_end)
            self.images += batch_size(learner.batch)
        self._begin = now

    def on_batch_end(self, learner: Learner) -> None:
        self._synchronize()  # a benchmark: the step is over when the GPU is done
        now = time.perf_counter()
        if learner.iteration >= self.warmup:
            self.computes.append(now - self._begin)
        self._last_end = now


def make_loader(data_dir: Path, options: argparse.Namespace, pin_memory: bool) -> DataLoader:
    dataset = CarvanaDataset(data_dir, size=tuple(options.size), augment=True)
    batches = options.warmup + options.steps
    sampler = RandomSampler(dataset, replacement=True, num_samples=batches * options.batch_size)
    return DataLoader(
        dataset,
        batch_size=options.batch_size,
        sampler=sampler,
        num_workers=options.workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=options.workers > 0,
    )


def run_variant(
    variant: Variant, data_dir: Path, device: torch.device, options: argparse.Namespace
) -> dict[str, float]:
    torch.manual_seed(0)
    model = UNet(base_width=options.base_width, depth=4)
    timer = StepTimer(options.warmup, device)
    plugins: list = [Device(device, channels_last=variant.channels_last), timer]
    if variant.precision != "32":
        plugins.append(Precision(variant.precision))
    if variant.compile:
        plugins.append(Compile())
    learner = Learner(
        model,
        make_loader(data_dir, options, pin_memory=device.type == "cuda"),
        loss_func=bce_dice_loss,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        plugins=plugins,
    )
    learner.fit(1)
    wait, compute = sum(timer.waits), sum(timer.computes)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    result = {
        "images_per_s": timer.images / (wait + compute),
        "peak_mib": peak / 2**20,
        "wait_ms": 1000 * wait / len(timer.waits),
        "compute_ms": 1000 * compute / len(timer.computes),
        "wait_share": wait / (wait + compute),
        "train_loss": learner.metrics["train_loss"],
    }
    del learner, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a Carvana folder (train/, train_masks/); default: a synthetic one",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(960, 640),
        metavar=("WIDTH", "HEIGHT"),
        help="input size, both divisible by 16 (default: 960 640)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--base-width", type=int, default=32, help="U-Net channels at full size (default: 32)"
    )
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (default: 8)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed batches per variant (default: 5)"
    )
    parser.add_argument(
        "--steps", type=int, default=40, help="timed batches per variant (default: 40)"
    )
    parser.add_argument("--device", default="cuda", help="default: cuda")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile variants (minutes more)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny CPU run that checks this script; no figure means anything",
    )
    options = parser.parse_args(argv)
    if options.smoke:
        options.device, options.size, options.batch_size = "cpu", (64, 48), 2
        options.base_width, options.workers, options.warmup, options.steps = 4, 0, 1, 2
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    if not options.smoke and not torch.cuda.is_available():
        print(
            "gpu_check: needs an NVIDIA GPU with CUDA, and torch.cuda.is_available() is False "
            "here; nothing measured (--smoke runs a tiny CPU check of the script)"
        )
        return 0
    device = torch.device(options.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU (smoke run: the figures mean nothing)"
    variants = VARIANTS + (COMPILED_VARIANTS if options.compile else ())
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = options.data
        if data_dir is None:
            data_dir = Path(scratch) / "carvana"
            cars = 1 if options.smoke else 4
            ensure_data(data_dir, n_train_cars=cars, n_test_cars=0, size=tuple(options.size))
        width, height = options.size
        print(f"gpu_check: {name}, torch {torch.__version__}")
        print(
            f"U-Net base width {options.base_width}, {width}x{height}, batch {options.batch_size}, "
            f"{options.workers} loader workers, {options.steps} timed batches after "
            f"{options.warmup}, data {'synthetic' if options.data is None else data_dir}"
        )
        header = f"{'variant':<28}{'images/s':>10}{'vs fp32':>9}{'peak MiB':>10}{'wait ms':>9}{'compute ms':>12}{'wait %':>8}{'loss':>8}"
        print(header)
        baseline = None
        for variant in variants:
            result = run_variant(variant, data_dir, device, options)
            baseline = baseline or result["images_per_s"]
            print(
                f"{variant.name:<28}{result['images_per_s']:>10.1f}"
                f"{result['images_per_s'] / baseline:>8.2f}x{result['peak_mib']:>10.0f}"
                f"{result['wait_ms']:>9.1f}{result['compute_ms']:>12.1f}"
                f"{100 * result['wait_share']:>7.0f}%{result['train_loss']:>8.3f}",
                flush=True,
            )
    print(
        "wait: the loader plus the copy to the device; a wait share above ~20% means the "
        "GPU starves: raise --workers, or make the images smaller before they are loaded"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
