"""How long the ``trainloop`` command takes to start, against importing torch.

Each command runs in a fresh process, alternating with ``python -c "import torch"`` in
the same run; the script prints the median wall time of each and its difference from
torch's import. Targets: ``trainloop --version`` and ``--help`` <= 0.3 s;
``trainloop plugins`` and ``trainloop run recipes/mnist_mlp.py --help`` <= torch's
import + 0.5 s.

Run: ``python benchmarks/startup.py [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINLOOP = [sys.executable, "-m", "trainloop"]
COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "trainloop --version": [*TRAINLOOP, "--version"],
    "trainloop --help": [*TRAINLOOP, "--help"],
    "trainloop plugins": [*TRAINLOOP, "plugins"],
    "trainloop run recipes/mnist_mlp.py --help": [
        *TRAINLOOP,
        "run",
        "recipes/mnist_mlp.py",
        "--help",
    ],
}


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, check=True, env=os.environ)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(rounds):
        for name, command in COMMANDS.items():
            times[name].append(wall_time(command))
    torch_import = statistics.median(times['python -c "import torch"'])
    print(f"median of {rounds} runs, each in a fresh process")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>45}: {median:6.2f} s  ({median - torch_import:+.2f} s vs importing torch)")


if __name__ == "__main__":
    main()
