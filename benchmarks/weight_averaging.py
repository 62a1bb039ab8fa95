"""Weight averaging: what an EMA update costs per step, and whether averaging helps.

``cost``: the per-step time of training with ``--ema 0.999`` against the same training
without it, alternating in one process (median of ``--rounds``), at the MNIST recipe's
size (the 784-200-200-10 MLP, batch 200) and the Carvana recipe's (its U-Net, batch 8
of 144x96 photos): the EMA update is one ``torch._foreach_lerp_`` over all parameters
and buffers after each optimizer step, so its share is largest for small steps.

``runs``: the recipes run through ``trainloop run`` with no averaging, with EMA and with
SWA, in subprocesses, and a table of each run's last and best validation figures: the
MNIST recipe on the seven-segment stand-in (``write_idx_files``: no download here) and
the Carvana recipe on its synthetic set. The table is the one in
``docs/plugins/weight_averaging.md``.

Run: ``python benchmarks/weight_averaging.py cost [--rounds 7]`` and
``python benchmarks/weight_averaging.py runs [--work DIR]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainloop import Learner
from trainloop.plugins.weight_averaging import WeightAveraging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mlp_case(steps: int):
    from recipes.mnist_mlp import Net

    generator = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(200, 784, generator=generator),
            torch.randint(0, 10, (200,), generator=generator),
        )
        for _ in range(steps)
    ]
    optimizer = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    return Net, F.nll_loss, optimizer, data


def unet_case(steps: int):
    from trainloop.tasks.carvana.losses import bce_dice_loss
    from trainloop.tasks.carvana.unet import UNet

    generator = torch.Generator().manual_seed(0)
    data = [
        (
            torch.rand(8, 3, 96, 144, generator=generator),
            (torch.rand(8, 1, 96, 144, generator=generator) > 0.5).float(),
        )
        for _ in range(steps)
    ]
    optimizer = functools.partial(torch.optim.Adam, lr=2e-3)
    return functools.partial(UNet, base_width=8, depth=4), bce_dice_loss, optimizer, data


def seconds_per_step(case, ema: float | None) -> float:
    make_model, loss, optimizer, data = case
    torch.manual_seed(0)
    plugins = [WeightAveraging(ema=ema)] if ema else []
    learner = Learner(make_model(), data, loss_func=loss, optimizer=optimizer, plugins=plugins)
    learner.fit(1)  # warm-up: allocations, the average's first copy
    start = time.perf_counter()
    learner.fit(1)
    return (time.perf_counter() - start) / len(data)


def cost(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds (with and without EMA alternating)")  # fmt: skip
    print(f"{'model':<34} {'plain s/step':>13} {'--ema s/step':>13} {'ratio':>7} {'ms/step':>8}")
    for name, case in (
        ("MLP 784-200-200-10, batch 200", mlp_case(args.steps)),
        ("U-Net (8 wide, depth 4), batch 8", unet_case(max(args.steps // 50, 4))),
    ):
        plain, averaged = [], []
        for _ in range(args.rounds):
            plain.append(seconds_per_step(case, None))
            averaged.append(seconds_per_step(case, 0.999))
        base, ema = statistics.median(plain), statistics.median(averaged)
        print(f"{name:<34} {base:>13.3e} {ema:>13.3e} {ema / base:>7.3f} "
              f"{(ema - base) * 1e3:>8.3f}")  # fmt: skip


MNIST = ["--sample-size", "2000", "--epochs", "10"]
CARVANA = ["--sample-size", "96", "--no-predict"]
RUNS = [  # (task, recipe, options, the metric next to valid_loss, the averagings compared)
    ("mnist", "mnist_mlp.py", MNIST, "valid_accuracy",
     [[], ["--ema", "0.9", "--no-ema-warmup"], ["--swa-start", "6"]]),
    ("carvana", "unet_carvana.py", [*CARVANA, "--epochs", "6"], "valid_dice",
     [[], ["--ema", "0.9"], ["--swa-start", "4"]]),
    ("carvana", "unet_carvana.py", [*CARVANA, "--epochs", "15"], "valid_dice",
     [[], ["--ema", "0.99"], ["--swa-start", "11"]]),
]  # fmt: skip


def runs(args: argparse.Namespace) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="weight-averaging-"))
    mnist_dir = work / "mnist"
    if not (mnist_dir / "MNIST" / "raw").exists():
        from trainloop.tasks.mnist.data import write_idx_files

        write_idx_files(mnist_dir / "MNIST" / "raw", n_train=2000, n_test=500, seed=0)
    data = {
        "mnist": ["--data-dir", str(mnist_dir), "--no-download"],
        "carvana": ["--input-dir", str(work / "input"), "--synthetic"],
    }
    print("| recipe | averaging | valid_loss (last) | metric (last) | best epoch: valid_loss, "
          "metric | seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for task, recipe, options, metric, averagings in RUNS:
        for averaging in averagings:
            name = "-".join([task, *options[-1:], *averaging]).replace("--", "")
            out = work / "runs" / name
            command = [sys.executable, "-m", "trainloop", "run", str(ROOT / "recipes" / recipe),
                       *data[task], *options, *averaging, "--out", str(out), "--no-tensorboard",
                       "--progress", "plain"]  # fmt: skip
            if (out / "model.pt").exists():
                seconds = float("nan")  # an earlier call's run: its figures, not re-run
            else:
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, text=True)
                seconds = time.perf_counter() - start
            history = [
                json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            ]
            last = history[-1]
            best = min(history, key=lambda record: record["valid_loss"])
            label = " ".join(averaging) or "none"
            print(f"| {task}, {' '.join(options)} | `{label}` | {last['valid_loss']:.4f} | {metric} {last[metric]:.4f} | "
                  f"{best['epoch'] + 1}: {best['valid_loss']:.4f}, {best[metric]:.4f} | "
                  f"{seconds:.0f} |")  # fmt: skip
    print(f"runs in {work / 'runs'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    timing = commands.add_parser("cost", help="the EMA update's cost per step")
    timing.add_argument("--rounds", type=int, default=7)
    timing.add_argument("--steps", type=int, default=300, help="MLP steps per round")
    table = commands.add_parser("runs", help="the recipes with and without averaging")
    table.add_argument("--work", help="folder for the data and runs (kept; reused)")
    args = parser.parse_args()
    cost(args) if args.command == "cost" else runs(args)


if __name__ == "__main__":
    main()
