"""How long the ``trainloop`` command takes to start, against importing torch.

Each command runs in a fresh process, in rounds that alternate it with
``python -c "import torch"``, so that both see the same load on the machine; the
script prints the best (least disturbed) wall time of each over the rounds, its
difference from torch's import measured in the same run, and the median; then the same
for CPU time (user + system), which other work on the machine disturbs less. Targets:
``trainloop --version`` and ``--help`` <= 0.3 s; ``trainloop plugins`` and
``trainloop run RECIPE --help`` (MNIST's, Carvana's) <= torch's import + 0.5 s.

The commands run as an installed package does, with Python's bytecode cache (a
``PYTHONDONTWRITEBYTECODE`` in the environment is left out for them; ``--no-bytecode-cache``
keeps it), after one round that is not counted.

Run: ``python benchmarks/startup.py [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_IMPORT = 'python -c "import torch"'
SCRIPT = Path(sys.executable).with_name("trainloop")  # the console script, as a user runs it
TRAINLOOP = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "trainloop"]
COMMANDS = {
    TORCH_IMPORT: [sys.executable, "-c", "import torch"],
    "trainloop --version": [*TRAINLOOP, "--version"],
    "trainloop --help": [*TRAINLOOP, "--help"],
    "trainloop plugins": [*TRAINLOOP, "plugins"],
    "trainloop run recipes/mnist_mlp.py --help": [
        *TRAINLOOP,
        "run",
        "recipes/mnist_mlp.py",
        "--help",
    ],
    "trainloop run recipes/unet_carvana.py --help": [
        *TRAINLOOP,
        "run",
        "recipes/unet_carvana.py",
        "--help",
    ],
}
# name -> (seconds, whether they are on top of torch's import)
TARGETS = {
    "trainloop --version": (0.3, False),
    "trainloop --help": (0.3, False),
    "trainloop plugins": (0.5, True),
    "trainloop run recipes/mnist_mlp.py --help": (0.5, True),
    "trainloop run recipes/unet_carvana.py --help": (0.5, True),
}


def run_timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``command``; return its wall time and its CPU time (user + system), in seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, check=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="keep PYTHONDONTWRITEBYTECODE if the environment sets it",
    )
    options = parser.parse_args()
    env = dict(os.environ)
    if not options.no_bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    for command in COMMANDS.values():  # the uncounted round: fills the bytecode cache
        run_timed(command, env)
    walls: dict[str, list[float]] = {name: [] for name in COMMANDS}
    cpus: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(options.rounds):
        for name, command in COMMANDS.items():
            wall, cpu = run_timed(command, env)
            walls[name].append(wall)
            cpus[name].append(cpu)
    torch_wall, torch_cpu = min(walls[TORCH_IMPORT]), min(cpus[TORCH_IMPORT])
    cache = "off" if env.get("PYTHONDONTWRITEBYTECODE") else "on"
    print(
        f"best of {options.rounds} runs, each in a fresh process (bytecode cache {cache};"
        f" {' '.join(TRAINLOOP)}); CPU time = user + system"
    )
    for name in COMMANDS:
        best, cpu = min(walls[name]), min(cpus[name])
        line = (
            f"{name:>44}: wall {best:5.2f} s ({best - torch_wall:+.2f} vs torch),"
            f" median {statistics.median(walls[name]):5.2f} s;"
            f" CPU {cpu:5.2f} s ({cpu - torch_cpu:+.2f} vs torch)"
        )
        if name in TARGETS:
            limit, on_torch = TARGETS[name]
            allowed = limit + (torch_wall if on_torch else 0.0)
            target = f"torch + {limit} s" if on_torch else f"{limit} s"
            line += f"; target {target}: {'met' if best <= allowed else 'NOT MET'}"
        print(line)


if __name__ == "__main__":
    main()
