"""FSDP against DDP on two CPU processes (gloo): the time of a training step, and how long
a checkpoint holds the training loop up, written as the loop waits or in the background.

For each model (the MNIST recipe's 784-200-200-10 MLP, and a wider one whose checkpoint
is large enough to see), one torchrun launch of two processes trains it

1. under DDP, checkpoints written by rank 0 with ``torch.save`` (the ordinary format);
2. under FSDP, sharded checkpoints written as the loop waits (``dcp.save``);
3. under FSDP, sharded checkpoints written in the background (``--checkpoint-async``,
   ``dcp.async_save``);

for ``--steps`` batches of ``--batch-size`` random images per process, with a checkpoint
every ``--every`` batches. It prints, per case, the median time of a batch without a
checkpoint (the step time), the median extra time of a batch that takes one (the
stall), and the mean time of a batch over all of them (what the run pays in the end,
a background writer competing for the cores included), in wall-clock milliseconds on
rank 0. On a machine shared with other jobs
the figures swing with their load: compare cases of one launch.

    python benchmarks/fsdp_bench.py [--steps 60] [--every 10] [--widths 200,2048]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainloop import Learner, hookimpl
from trainloop.data.tensors import TensorBatches
from trainloop.plugins.checkpoint import Checkpoint
from trainloop.plugins.distributed import Distributed

CASES = (("ddp", False), ("fsdp", False), ("fsdp", True))


class BatchTimer:
    """The wall-clock time of each training batch, every plugin's work included."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    @hookimpl(tryfirst=True)
    def on_batch_begin(self, learner: Learner) -> None:
        if learner.training:
            self._start = time.perf_counter()

    @hookimpl(wrapper=True)  # its end runs after every other on_batch_end (the checkpoint's)
    def on_batch_end(self, learner: Learner):
        result = yield
        if learner.training:
            self.times.append(time.perf_counter() - self._start)
        return result


def mlp(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(784, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
        torch.nn.LogSoftmax(dim=1),
    )


def run_case(strategy: str, asynchronous: bool, args: argparse.Namespace, folder: Path) -> dict:
    torch.manual_seed(0)
    images = torch.randn(args.steps * args.batch_size * 2, 784)
    labels = torch.randint(0, 10, (len(images),))
    timer = BatchTimer()
    learner = Learner(
        mlp(args.width),
        TensorBatches(images, labels, batch_size=args.batch_size, shuffle=True),
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        plugins=[
            Distributed(device="cpu", strategy=strategy),
            Checkpoint(
                folder,
                every=args.every,
                keep_best=0,
                write=int(os.environ["RANK"]) == 0,
                asynchronous=asynchronous,
            ),
            timer,
        ],
    )
    learner.fit(1)
    times = timer.times[1:]  # the first batch pays for the first gathers and allocations
    taking = {step for step in range(len(timer.times)) if (step + 1) % args.every == 0}
    plain = [time for step, time in enumerate(times, start=1) if step not in taking]
    checkpointing = [time for step, time in enumerate(times, start=1) if step in taking]
    step = statistics.median(plain)
    parameters = sum(parameter.numel() for parameter in learner.model.parameters())
    return {
        "width": args.width,
        "parameters": parameters,
        "case": f"{strategy}{' async' if asynchronous else ''}",
        "step_ms": 1000 * step,
        "stall_ms": 1000 * (statistics.median(checkpointing) - step),
        "mean_ms": 1000 * statistics.mean(times),
        "checkpoints": len(checkpointing),
    }


def worker(args: argparse.Namespace) -> None:
    for strategy, asynchronous in CASES:
        with tempfile.TemporaryDirectory() as folder:
            # the same folder on both processes: rank 0 chooses it
            import torch.distributed as dist

            from trainloop.plugins.distributed import init_process_group

            init_process_group("gloo", torch.device("cpu"))
            chosen = [folder]
            dist.broadcast_object_list(chosen, src=0)
            result = run_case(strategy, asynchronous, args, Path(chosen[0]))
            dist.barrier()
        if os.environ["RANK"] == "0":
            print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=200, help="per process")
    parser.add_argument("--widths", default="200,2048")
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)  # in a worker
    args = parser.parse_args()
    if args.width is not None:
        worker(args)
        return
    print(f"torch {torch.__version__}, 2 processes, gloo, CPU; {os.cpu_count()} cores")
    print(
        f"{'width':>6} {'parameters':>11} {'case':>11} {'step ms':>8} {'stall ms':>9} "
        f"{'mean ms':>8}"
    )
    for width in (int(value) for value in args.widths.split(",")):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", __file__, "--width", str(width), "--steps", str(args.steps), "--every",
            str(args.every), "--batch-size", str(args.batch_size),
        ]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        for line in done.stdout.splitlines():
            if line.startswith("RESULT "):
                row = json.loads(line[len("RESULT ") :])
                print(
                    f"{row['width']:>6} {row['parameters']:>11,} {row['case']:>11} "
                    f"{row['step_ms']:>8.1f} {row['stall_ms']:>9.1f} {row['mean_ms']:>8.1f}"
                )


if __name__ == "__main__":
    main()
