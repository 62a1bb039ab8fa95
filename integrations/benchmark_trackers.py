"""What the tracker plugins cost: per-step overhead, per-epoch logging time, per-step logging.

The approach of ``benchmarks/overhead.py``: the 784-200-200-10 MLP on in-memory random
data (batch 64), trained by a hand-written loop and by trainloop with the same model,
data and seed, alternating in one process, so each ratio compares runs made under the
same machine load. Plugin sets: the default ones (progress, metrics_jsonl), the same
plus MLflow logging to a local ``mlflow server`` (per-step logging off, then
``--mlflow-every 1``), and plus W&B in offline mode. For each it prints the time per
step of the batch loop alone (the training phase, timed from ``on_train_begin`` to
``on_train_end``) and of the whole ``fit``, whose extra over the default set is the
tracker's fixed cost per fit (creating the run, params, the epoch's metrics, uploading
files, ending the run). Then the time one epoch end spends logging (``on_epoch_end`` of
the logger, three metrics) against the server.

Run: ``python integrations/benchmark_trackers.py [--rounds 5] [--steps 1000]`` with
both packages installed (``pip install ./integrations/trainloop-mlflow
./integrations/trainloop-wandb mlflow``).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from trainloop import Learner, RunConfig
from trainloop.cli import load_plugins
from trainloop.manager import builtin_plugin_names

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.overhead import _EmptyConfig, hand_written, mlp_workload  # noqa: E402

DEFAULT = ("progress", "metrics_jsonl")


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return process, uri
        except OSError:
            time.sleep(0.25)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit("mlflow server did not start")


class TrainPhaseTimer:
    """Times the training phase of each epoch: the batch loop, without the epoch ends."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def on_train_begin(self) -> None:
        self._start = time.perf_counter()

    def on_train_end(self) -> None:
        self.seconds += time.perf_counter() - self._start


def with_plugins(workload, options: list[str]) -> tuple[float, float]:
    """Seconds per step of one epoch of trainloop with the default plugins and ``options``:
    of the whole ``fit``, and of its batch loop only."""
    make_model, loss_func, make_optimizer, data = workload
    torch.manual_seed(0)
    learner = Learner(make_model(), data, loss_func=loss_func, optimizer=make_optimizer)
    not_default = [f"no:{name}" for name in builtin_plugin_names() if name not in DEFAULT]
    manager = load_plugins(not_default)
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    manager.hook.add_options(parser=parser, plugin_manager=manager)
    parsed = parser.parse_args(options)
    parsed.progress = "plain"
    run_dir = Path(tempfile.mkdtemp(prefix="trackers-"))
    config = RunConfig(parsed, run_dir, Path("benchmark.py"), _EmptyConfig(), manager)
    manager.hook.configure(config=config)
    for name, plugin in manager.list_name_plugin():
        if plugin is not None and not learner.plugin_manager.is_registered(plugin):
            learner.add_plugin(plugin, name)
    learner.run_dir = run_dir
    for plugin in learner.plugin_manager.get_plugins():
        if hasattr(plugin, "stream"):
            plugin.stream = io.StringIO()
    timer = TrainPhaseTimer()
    learner.add_plugin(timer, "timer")
    start = time.perf_counter()
    learner.fit(1)
    seconds = (time.perf_counter() - start) / len(data)
    manager.hook.unconfigure(config=config)
    return seconds, timer.seconds / len(data)


def epoch_logging_ms(uri: str, epochs: int) -> list[float]:
    """Milliseconds of each MLflowLogger.on_epoch_end (three metrics) against ``uri``."""
    from trainloop_mlflow import MLflowLogger

    logger = MLflowLogger(tracking_uri=uri, experiment="epoch-timing", params={"lr": 0.1})
    learner = Learner(torch.nn.Linear(1, 1), [], plugins=[logger])
    learner.run_dir = Path(tempfile.mkdtemp(prefix="trackers-"))
    logger.on_fit_begin(learner)
    times = []
    for epoch in range(epochs):
        learner.epoch = epoch
        learner.metrics = {"train_loss": 1.0 / (epoch + 1), "valid_loss": 1.1, "valid_acc": 0.9}
        start = time.perf_counter()
        logger.on_epoch_end(learner)
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="trackers-server-"))
    server, uri = start_server(folder)
    os.environ["WANDB_SILENT"] = "true"
    try:
        workload = mlp_workload(args.steps)
        logged = ["--mlflow-uri", uri, "--mlflow-images", "--mlflow-timeout", "5"]
        sets = {
            "default": [],
            "+mlflow": logged,
            "+mlflow every 1": [*logged, "--mlflow-every", "1"],
            "+wandb offline": ["--wandb-project", "bench", "--wandb-mode", "offline"],
        }
        with_plugins(workload, logged)  # warm up: imports, the server's first requests
        fits: dict[str, list[float]] = {name: [] for name in ("hand", *sets)}
        loops: dict[str, list[float]] = {name: [] for name in ("hand", *sets)}
        for _ in range(args.rounds):  # alternate, so drifts in machine load hit all alike
            hand = hand_written(*workload)
            fits["hand"].append(hand)
            loops["hand"].append(hand)
            for name, options in sets.items():
                fit, loop = with_plugins(workload, options)
                fits[name].append(fit)
                loops[name].append(loop)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{args.steps} steps/epoch, median of {args.rounds} rounds")  # fmt: skip
        median = {name: statistics.median(values) for name, values in loops.items()}
        print(f"{'plugins':<16} {'loop s/step':>12} {'/hand':>7} {'/default':>9}"
              f" {'fit s/step':>11} {'fit extra ms vs default':>24}")  # fmt: skip
        for name in ("hand", *sets):
            fit = statistics.median(fits[name])
            extra = (fit - statistics.median(fits["default"])) * args.steps * 1000
            print(f"{name:<16} {median[name]:>12.3e} {median[name] / median['hand']:>7.3f}"
                  f" {median[name] / median['default']:>9.3f} {fit:>11.3e} {extra:>24.1f}")  # fmt: skip
        step_cost = median["+mlflow every 1"] - median["+mlflow"]
        print(f"per-step logging (--mlflow-every 1): {step_cost * 1e6:+.1f} us per step "
              "(batch loop, against --mlflow-every 0)")  # fmt: skip
        epoch_times = epoch_logging_ms(uri, 30)
        print(
            f"one epoch end logged to {uri}: median {statistics.median(epoch_times):.1f} ms, "
            f"max {max(epoch_times):.1f} ms over {len(epoch_times)} epochs"
        )
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


if __name__ == "__main__":
    main()
