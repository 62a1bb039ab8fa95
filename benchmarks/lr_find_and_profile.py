"""What the two diagnostic tools cost: ``trainloop lr-find`` and ``--profile N``.

``lr-find``: the wall time of ``trainloop lr-find recipes/mnist_mlp.py`` (its default
sweep) against ``trainloop run recipes/mnist_mlp.py --epochs 1`` on the same data, both
as a user runs them (fresh processes, start-up included), on a 60,000-picture MNIST
stand-in (``write_idx_files``: no download here). The finder should take seconds, not
an epoch.

``profile``: the size of the Chrome trace that ``--profile 10`` writes for 10 training
steps of the Carvana recipe on its synthetic set (target: under 50 MB), and the run's
wall time against the same run without it.

Run: ``python benchmarks/lr_find_and_profile.py [--work DIR]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr}")
    return time.perf_counter() - start


def trainloop(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "trainloop", *arguments]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the data and runs (default: a new temp one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="tools-cost-"))
    mnist = work / "mnist"
    if not (mnist / "MNIST" / "raw").exists():
        from trainloop.tasks.mnist.data import write_idx_files

        write_idx_files(mnist / "MNIST" / "raw", n_train=60000, n_test=10000, seed=0)
    recipe = str(ROOT / "recipes" / "mnist_mlp.py")
    data = ["--data-dir", str(mnist), "--no-download"]
    quiet = ["--no-tensorboard", "--progress", "plain"]
    epoch = timed(trainloop("run", recipe, *data, "--epochs", "1", "--out", str(work / "epoch"),
                            *quiet))  # fmt: skip
    finder = timed(trainloop("lr-find", recipe, *data, "--out", str(work / "lr-find")))
    sweep = json.loads((work / "lr-find" / "lr_find.json").read_text())
    print(f"MNIST (60,000 pictures): lr-find {finder:.1f} s in all, its sweep "
          f"{sweep['seconds']:.2f} s ({len(sweep['lrs'])} steps); one epoch of `run` "
          f"{epoch:.1f} s (ratio {finder / epoch:.2f}), start-up and data loading included "
          "in both")  # fmt: skip

    carvana = str(ROOT / "recipes" / "unet_carvana.py")
    inputs = ["--input-dir", str(work / "input"), "--synthetic", "--epochs", "2", "--no-predict"]
    timed(trainloop("run", carvana, *inputs, "--out", str(work / "warm"), *quiet))  # the data
    plain = timed(trainloop("run", carvana, *inputs, "--out", str(work / "plain"), *quiet))
    profiled = timed(trainloop("run", carvana, *inputs, "--profile", "10", "--out",
                               str(work / "profiled"), *quiet))  # fmt: skip
    trace = work / "profiled" / "profile" / "trace.json"
    print(f"Carvana, --profile 10: trace {trace.stat().st_size / 1e6:.1f} MB (target < 50 MB); "
          f"the 2-epoch run {profiled:.1f} s against {plain:.1f} s without it")  # fmt: skip
    print(f"runs in {work}")


if __name__ == "__main__":
    main()
