"""Per-step overhead of trainloop against a hand-written PyTorch loop.

Two workloads: the 784-200-200-10 MLP on in-memory random data (batch 64) and the
single sigmoid neuron (batch 1). Each is trained by a hand-written loop and by
trainloop with the same model, data, optimizer and seed, alternating in the same
process; the script prints seconds per step and the ratio trainloop / hand-written (the
median of the rounds' own ratios, each round's two runs back to back) for
three plugin sets: none (the bare core), the issue's "default" set (progress,
metrics.jsonl and throughput, the cheap ones that are on by default) and every built-in
plugin as ``trainloop run`` configures it with its default options.

Each trainloop run is one epoch of ``--steps`` batches (the neuron: five times as
many), so per-epoch work — the checkpoint write with its fsync, a metrics line, a
TensorBoard flush — is spread over that epoch as it would be in training; the last
column shows the whole extra time per epoch.

Run: ``python benchmarks/overhead.py [--rounds 7] [--steps 2000] [--threads N]``. On a
small shared machine a run's speed can jump by half from one run to the next (torch's
threads meeting other work); more rounds, or ``--threads 1``, steady the figures.
Targets with the default plugins: ratio <= 1.03 (MLP) and <= 1.15 (neuron).
"""

from __future__ import annotations

import argparse
import functools
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainloop import Learner, RunConfig
from trainloop.cli import load_plugins
from trainloop.context import RunContext
from trainloop.recipe import add_config_options

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipes.mnist_mlp import Net  # noqa: E402
from recipes.single_node import Neuron, half_squared_error  # noqa: E402

DEFAULT_PLUGINS = ("progress", "metrics_jsonl", "throughput")
"""The "default" set: the plugins on by default whose cost per batch must stay small."""


def mlp_workload(steps: int):
    generator = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(64, 784, generator=generator),
            torch.randint(0, 10, (64,), generator=generator),
        )
        for _ in range(steps)
    ]
    return Net, F.nll_loss, functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9), data


def neuron_workload(steps: int):
    sample = (torch.tensor([-0.23]), torch.tensor([0.74]))
    return (
        functools.partial(Neuron, 0.5, -0.5),
        half_squared_error,
        functools.partial(torch.optim.SGD, lr=0.5),
        [sample] * steps,
    )


def hand_written(make_model, loss_func, make_optimizer, data) -> float:
    torch.manual_seed(0)
    model = make_model()
    optimizer = make_optimizer(model.parameters())
    model.train()
    start = time.perf_counter()
    for inputs, target in data:
        loss = loss_func(model(inputs), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(data)


def with_trainloop(make_model, loss_func, make_optimizer, data, plugin_set: str) -> float:
    torch.manual_seed(0)
    learner = Learner(make_model(), data, loss_func=loss_func, optimizer=make_optimizer)
    configured = attach_plugins(learner, plugin_set)
    start = time.perf_counter()
    learner.fit(1)
    seconds = (time.perf_counter() - start) / len(data)
    for config in configured:
        config.plugin_manager.hook.unconfigure(config=config)
    return seconds


def attach_plugins(learner: Learner, plugin_set: str) -> list[RunConfig]:
    """Give ``learner`` the plugins a CLI run would have, with their default options."""
    if plugin_set == "none":
        return []
    specs = [] if plugin_set == "all" else [f"no:{name}" for name in _not_default()]
    manager = load_plugins(specs)
    parser = argparse.ArgumentParser()
    add_config_options(parser, _EmptyConfig)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    manager.hook.add_options(parser=parser, plugin_manager=manager)
    options = parser.parse_args([])
    if hasattr(options, "progress"):
        options.progress = "plain"  # the terminal is not the thing measured
    context = RunContext()
    manager.hook.configure_context(context=context, options=options)
    run_dir = Path(tempfile.mkdtemp(prefix="overhead-"))
    config = RunConfig(options, run_dir, Path("benchmark.py"), _EmptyConfig(), manager, context)
    manager.hook.configure(config=config)
    for name, plugin in manager.list_name_plugin():
        if plugin is not None and not learner.plugin_manager.is_registered(plugin):
            learner.add_plugin(plugin, name)
    learner.run_dir = run_dir
    for plugin in learner.plugin_manager.get_plugins():
        if hasattr(plugin, "stream"):
            plugin.stream = io.StringIO()
    return [config]


def _not_default() -> list[str]:
    from trainloop.manager import builtin_plugin_names

    return [name for name in builtin_plugin_names() if name not in DEFAULT_PLUGINS]


class _EmptyConfig:
    """Stands in for a recipe's Config: the benchmark has no fields."""

    __dataclass_fields__: dict = {}


def measure(name: str, workload, rounds: int, plugin_set: str) -> tuple[float, float, float]:
    """Median seconds per step of each, and the median of the rounds' ratios (each
    round's two runs back to back: a drift of the machine's speed cancels out)."""
    hand_times, loop_times = [], []
    for round_ in range(rounds):
        # Alternate, and swap which goes first each round (hand, loop, loop, hand, ...),
        # so that drifts in machine speed and what one run leaves the next hit both alike.
        if round_ % 2:
            loop_times.append(with_trainloop(*workload, plugin_set=plugin_set))
            hand_times.append(hand_written(*workload))
        else:
            hand_times.append(hand_written(*workload))
            loop_times.append(with_trainloop(*workload, plugin_set=plugin_set))
    ratios = [loop / hand for hand, loop in zip(hand_times, loop_times)]
    return statistics.median(hand_times), statistics.median(loop_times), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds"
    )
    print(
        f"{'workload':<8} {'plugins':<8} {'hand s/step':>12} {'trainloop s/step':>17}"
        f" {'ratio':>7} {'target':>8} {'extra ms/epoch':>15}"
    )
    workloads = {
        "mlp": (mlp_workload(args.steps), 1.03),
        "neuron": (neuron_workload(args.steps * 5), 1.15),
    }
    for name, (workload, target) in workloads.items():
        hand_written(*workload), with_trainloop(*workload, plugin_set="all")  # warm up
        for plugin_set in ("none", "default", "all"):
            hand, loop, ratio = measure(name, workload, args.rounds, plugin_set)
            goal = f"<= {target}" if plugin_set != "none" else ""
            extra = (loop - hand) * len(workload[3]) * 1000
            print(
                f"{name:<8} {plugin_set:<8} {hand:>12.2e} {loop:>17.2e}"
                f" {ratio:>7.3f} {goal:>8} {extra:>15.1f}"
            )


if __name__ == "__main__":
    main()
