"""The cost of the rank-agreed stop check under torchrun (the interrupt plugin).

Two gloo processes on the CPU train the 784-200-200-10 MLP with DDP on in-memory random
data (batch 64 per process). Each round trains one epoch without the interrupt plugin,
then with it checking every 10 batches (the default) and every batch, alternating in
the same processes; rank 0 prints seconds per step and the ratio to the run without
the plugin. A lone process has no check at all (the per-batch hook exists only under
torchrun), so the single-process figure is the overhead benchmark's.

Run: ``python benchmarks/stop_check.py [--rounds 5] [--steps 300]`` (it starts torchrun).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipes.mnist_mlp import Net  # noqa: E402
from trainloop import Learner  # noqa: E402
from trainloop.plugins.distributed import Distributed  # noqa: E402
from trainloop.plugins.interrupt import Interrupt  # noqa: E402

SETTINGS = {"no interrupt plugin": None, "check every 10": 10, "check every batch": 1}


def one_epoch(check_every: int | None, data: list) -> float:
    torch.manual_seed(0)
    plugins = [Distributed(device="cpu", backend="gloo")]
    if check_every is not None:
        plugins.append(Interrupt(announce=False, check_every=check_every))
    learner = Learner(
        Net(),
        data,
        loss_func=F.nll_loss,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        plugins=plugins,
    )
    start = time.perf_counter()
    learner.fit(1)
    return (time.perf_counter() - start) / len(data) * 2  # each process has half the batches


def worker(rounds: int, steps: int) -> None:
    torch.distributed.init_process_group("gloo")  # once: the plugin then leaves it open
    generator = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(64, 784, generator=generator),
            torch.randint(0, 10, (64,), generator=generator),
        )
        for _ in range(steps * 2)
    ]
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    one_epoch(None, data)  # warm-up
    for _ in range(rounds):
        for name, check_every in SETTINGS.items():
            times[name].append(one_epoch(check_every, data))
    if os.environ["RANK"] == "0":
        base = statistics.median(times["no interrupt plugin"])
        print(f"2 gloo processes, {steps} steps per epoch, median of {rounds} rounds")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:>20}: {median * 1e3:7.3f} ms/step  ratio {median / base:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options.rounds, options.steps)
        return
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        __file__, "--worker", "--rounds", str(options.rounds), "--steps", str(options.steps),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sys.exit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
