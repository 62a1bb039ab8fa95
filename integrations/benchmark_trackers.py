"""What the tracker plugins cost: per-step overhead, per-epoch logging time, per-step logging.

The approach of ``benchmarks/overhead.py``: the 784-200-200-10 MLP on in-memory random
data (batch 64), trained by a hand-written loop and by trainloop with the same model,
data and seed, alternating in one process, so each ratio compares runs made under the
same machine load. Plugin sets: the default ones (progress, metrics_jsonl), the same
plus MLflow logging to a local ``mlflow server`` (per-step logging off, then
``--mlflow-every 1``), and plus W&B in offline mode. Then the time one epoch end spends
logging (``on_epoch_end`` of the logger, three metrics) against the server.

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


def with_plugins(workload, options: list[str]) -> float:
    """Seconds per step of one epoch of trainloop with the default plugins and ``options``."""
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
    start = time.perf_counter()
    learner.fit(1)
    seconds = (time.perf_counter() - start) / len(data)
    manager.hook.unconfigure(config=config)
    return seconds


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
    args = parser.parse_args()
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
        times: dict[str, list[float]] = {name: [] for name in ("hand", *sets)}
        for _ in range(args.rounds):  # alternate, so drifts in machine load hit all alike
            times["hand"].append(hand_written(*workload))
            for name, options in sets.items():
                times[name].append(with_plugins(workload, options))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{args.steps} steps/epoch, median of {args.rounds} rounds")  # fmt: skip
        hand = statistics.median(times["hand"])
        default = statistics.median(times["default"])
        print(f"{'plugins':<18} {'s/step':>10} {'/hand':>7} {'/default':>9} {'extra ms/epoch':>15}")
        for name in ("hand", *sets):
            value = statistics.median(times[name])
            extra = (value - default) * args.steps * 1000
            print(f"{name:<18} {value:>10.3e} {value / hand:>7.3f} {value / default:>9.3f}"
                  f" {extra:>15.1f}")  # fmt: skip
        step_cost = statistics.median(times["+mlflow every 1"]) - statistics.median(
            times["+mlflow"]
        )
        print(f"per-step logging (--mlflow-every 1): {step_cost * 1e6:.1f} us per step")
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
