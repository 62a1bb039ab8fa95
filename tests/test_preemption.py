"""Preemption: a scheduler's SIGTERM stops at a batch boundary with a checkpoint, and the very
same command relaunched with ``--resume auto`` finishes with the weights of an unbroken run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import BEACON, without_timings

from trainloop.cli import main
from trainloop.plugins import distributed
from trainloop.plugins.interrupt import parse_signals
from trainloop.run_folder import read_jsonl

RECIPE = """
from dataclasses import dataclass
import functools, torch
from trainloop import Learner

@dataclass
class Config:
    epochs: int = 3
    sleep: float = 0.0

def build(cfg):
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(64, 4, generator=generator)
    target = (inputs.sum(1) > 0).long()
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, target), batch_size=8, shuffle=True
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2),
        torch.nn.LogSoftmax(1),
    )
    return Learner(model, data, optimizer=functools.partial(torch.optim.Adam, lr=0.01),
                   plugins=[Beacon(cfg.sleep)])
"""
RECIPE += BEACON  # the Beacon(sleep) plugin build() adds
STEPS = 3 * 8


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "preempt.py"
    path.write_text(RECIPE)
    return path


def trainloop(*args) -> list[str]:
    return [sys.executable, "-m", "trainloop", *map(str, args)]


ENV = {**os.environ, "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"}


def signal_at_step(command: list[str], step: int, signum: int) -> subprocess.Popen:
    """Run ``command``, send it ``signum`` when its Beacon reports ``step``, wait for it.

    The finished process keeps its standard error as ``stderr_text``.
    """
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in process.stdout:
        if line.strip() == f"beacon step {step}":
            process.send_signal(signum)
            break
    _, process.stderr_text = process.communicate(timeout=60)
    return process


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def train_losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sigterm_stops_after_the_batch_saves_and_exits_143_then_resume_auto_finishes_exactly(
    recipe, tmp_path
):
    unbroken = tmp_path / "unbroken"
    done = subprocess.run(trainloop("run", recipe, "--out", unbroken), env=ENV, capture_output=True)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "preempted"
    command = trainloop("run", recipe, "--out", out, "--resume", "auto", "--sleep", 0.05)
    process = signal_at_step(command, 11, signal.SIGTERM)  # in the second epoch
    err = process.stderr_text

    assert process.returncode == 128 + signal.SIGTERM, err
    assert "trainloop: SIGTERM: finishing the current batch, then saving a checkpoint" in err
    assert err.rstrip().endswith("trainloop: stopped by SIGTERM")
    stopped = json.loads((out / "stopped.json").read_text())
    assert stopped["reason"] == "SIGTERM" and stopped["exit_status"] == 143
    assert 11 <= stopped["step"] < STEPS and stopped["checkpoint"].endswith("interrupt.pt")

    # The scheduler relaunches the very same command, as often as it likes.
    for _ in range(2):
        again = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    assert_same(weights(out), weights(unbroken))
    resumed = without_timings(read_jsonl(out / "metrics.jsonl")[0])
    assert resumed == without_timings(read_jsonl(unbroken / "metrics.jsonl")[0])
    resumes = json.loads((out / "config.json").read_text())["resumes"]
    assert [resume["checkpoint"] for resume in resumes] == [
        str(out / "checkpoints" / "last.pt")
    ] * 2


def test_resume_auto_without_a_checkpoint_starts_afresh_and_records_the_relaunch(
    recipe, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--resume", "auto"]) == 0
    assert "resumed from" not in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["resumes"] == []


def test_resume_auto_refuses_a_folder_of_other_files_and_needs_out(recipe, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    assert main(["run", str(recipe), "--out", str(folder), "--resume", "auto"]) == 2
    assert "already holds files (notes.txt)" in capsys.readouterr().err
    assert main(["run", str(recipe), "--resume", "auto"]) == 2
    assert "--resume auto without a PATH continues the run in --out" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", str(recipe), "--out", str(afile), "--resume", "auto"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_stop_signals_are_parsed_and_bad_ones_are_one_line(recipe, tmp_path, capsys):
    assert parse_signals("SIGTERM,usr1, 12") == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    assert parse_signals("none") == ()
    for option, bad, said in (
        ("--stop-signals", "SIGFOO", "'SIGFOO' is not a signal"),
        ("--stop-signals", "SIGKILL", "cannot be one"),
        ("--stop-timeout", "-1", "give a number of seconds, 0 or more"),
    ):
        status = main(["run", str(recipe), "--out", str(tmp_path / "x"), option, bad])
        err = capsys.readouterr().err
        assert status == 2 and said in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_sigusr1_is_a_stop_too_and_none_leaves_the_default_behaviour(recipe, tmp_path):
    out = tmp_path / "usr1"
    process = signal_at_step(
        trainloop("run", recipe, "--out", out, "--sleep", 0.05), 3, signal.SIGUSR1
    )
    assert process.returncode == 128 + signal.SIGUSR1
    assert (out / "checkpoints" / "interrupt.pt").exists()

    command = trainloop(
        "run", recipe, "--out", tmp_path / "plain", "--sleep", 0.05, "--stop-signals", "none"
    )
    process = signal_at_step(command, 3, signal.SIGTERM)
    assert process.returncode == -signal.SIGTERM  # not handled: the default action
    assert not (tmp_path / "plain" / "checkpoints" / "interrupt.pt").exists()


# --- under torchrun: its workers are in sessions of their own, so a test kills them by tag


TAG = "TRAINLOOP_TEST_TAG"
TORCHRUN_LIMIT = 150  # seconds for one torchrun call, restarts included, on a loaded machine


def tagged(tag: str) -> dict[str, str]:
    """The environment of this test's processes: ENV marked with ``tag``."""
    return {**ENV, TAG: tag}


def processes_tagged(tag: str) -> dict[int, dict[str, str]]:
    """The live processes whose environment carries ``tag``: their pid and environment."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            variables = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile, or not ours
            continue
        environ = dict(item.decode(errors="replace").partition("=")[::2] for item in variables)
        if environ.get(TAG) == tag:
            found[int(entry.name)] = environ
    return found


def kill_tagged(tag: str) -> None:
    """SIGKILL every process of ``tag``: torchrun, its workers, theirs (twice: a restart)."""
    for _ in range(2):
        for pid in processes_tagged(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def worker(tag: str, rank: int) -> int:
    """The pid of the training process of ``rank`` (not one of its DataLoader workers)."""
    tagged_now = processes_tagged(tag)
    (pid,) = [
        pid
        for pid, environ in tagged_now.items()
        if environ.get("RANK") == str(rank) and "RANK" not in tagged_now.get(_parent(pid), {})
    ]
    return pid


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def torchrun(recipe: Path, out: Path, *options: object, restarts: int = 0) -> list[str]:
    """torchrun training the recipe on 2 processes into ``out``, with ``--resume auto``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", str(restarts), "--monitor-interval", "0.2",
        "-m", "trainloop", "run", str(recipe), "--out", str(out), "--resume", "auto",
        "--sleep", "0.05", *map(str, options),
    ]  # fmt: skip


@contextlib.contextmanager
def bounded(tag: str) -> Iterator[threading.Event]:
    """Kill every process of ``tag`` when the block ends, or TORCHRUN_LIMIT seconds in.

    The event it yields is set if the limit passed.
    """
    expired = threading.Event()
    timer = threading.Timer(TORCHRUN_LIMIT, lambda: (expired.set(), kill_tagged(tag)))
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()
        timer.join()
        kill_tagged(tag)  # nothing left behind, even after a failed assertion


def run_tagged(command: list[str], tag: str, on_line=None) -> tuple[int, str]:
    """Run ``command``, bounded in time; return its status and output.

    ``on_line(line)`` sees each line of output (stdout and stderr together) as it comes.
    """
    lines = []
    with bounded(tag) as expired:
        launcher = subprocess.Popen(
            command, env=tagged(tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        with launcher:
            for line in launcher.stdout:
                lines.append(line)
                if on_line is not None:
                    on_line(line)
    output = "".join(lines)
    assert not expired.is_set(), f"killed after {TORCHRUN_LIMIT}s:\n{output[-4000:]}"
    return launcher.returncode, output


def test_under_torchrun_a_sigterm_to_one_process_stops_both_after_the_same_batch(recipe, tmp_path):
    out = tmp_path / "ddp"
    tag = f"sigterm-{os.getpid()}"
    sent = []

    def sigterm_rank_1(line: str) -> None:
        if not sent and line.startswith("beacon step 5"):
            sent.append(worker(tag, rank=1))  # the rank that does not write: no announcement
            os.kill(sent[0], signal.SIGTERM)

    # A stop timeout far shorter than the default: batches go on, so it never fires.
    command = torchrun(recipe, out, "--stop-check-every", 2, "--stop-timeout", 5)
    status, output = run_tagged(command, tag, sigterm_rank_1)
    assert sent and status != 0, output  # torchrun reports its workers' status 143
    stopped = json.loads((out / "stopped.json").read_text())
    assert stopped["reason"] == "SIGTERM" and stopped["step"] % 2 == 0
    checkpoint = torch.load(out / "checkpoints" / "interrupt.pt", weights_only=True)
    assert checkpoint["world_size"] == 2
    assert checkpoint["learner"]["step"] == stopped["step"]


def test_a_stop_signal_to_a_process_stuck_in_a_collective_ends_it_after_the_stop_timeout(
    recipe, tmp_path
):
    # Rank 1 frozen (SIGSTOP): rank 0 waits for it in its next backward's all-reduce, in C
    # code, where Python runs no signal handler; the SIGTERM alone would change nothing.
    out = tmp_path / "stuck"
    tag = f"stuck-{os.getpid()}"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = trainloop(
        "run", recipe, "--out", out, "--epochs", 50, "--sleep", 0.05, "--stop-timeout", 2
    )
    with bounded(tag) as expired:
        ranks = []
        for rank, output in ((0, subprocess.PIPE), (1, subprocess.DEVNULL)):
            env = {**tagged(tag), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
            ranks.append(
                subprocess.Popen(command, env=env, stdout=output, stderr=output, text=True)
            )
        for line in ranks[0].stdout:
            if line.startswith("beacon step 3"):
                break
        ranks[1].send_signal(signal.SIGSTOP)
        time.sleep(1)  # rank 0 is in the next backward by now
        sent = time.monotonic()
        ranks[0].send_signal(signal.SIGTERM)
        _, err = ranks[0].communicate()
        waited = time.monotonic() - sent
    ranks[1].wait()
    assert not expired.is_set() and ranks[0].returncode == -signal.SIGTERM, err
    assert 2 <= waited < 30
    assert (
        "trainloop: SIGTERM: no batch finished in 2s (stuck waiting for another process?); "
        "ending now, without a checkpoint" in err
    )
    assert not (out / "checkpoints" / "interrupt.pt").exists()
    assert not (out / "stopped.json").exists()


def test_each_torchrun_restart_on_one_machine_has_store_keys_of_its_own(monkeypatch):
    # torchrun's store outlives its restarts: keys shared with the attempt before would hand
    # a restarted process the addresses of the processes that torchrun killed.
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    variables = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "GROUP_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port),
                 "TORCHELASTIC_USE_AGENT_STORE": "True"}  # fmt: skip
    written = []
    for attempt in ("0", "1"):
        for name, value in {**variables, "TORCHELASTIC_RESTART_COUNT": attempt}.items():
            monkeypatch.setenv(name, value)
        before = set(server.list_keys())
        assert distributed.init_process_group("gloo", torch.device("cpu"))
        distributed.destroy_process_group()
        written.append(set(server.list_keys()) - before)
    assert written[0] and written[1]  # the second attempt wrote keys, none of the first's


def test_torchrun_restarts_a_killed_worker_and_resume_auto_ends_with_the_unbroken_weights(
    recipe, tmp_path
):
    unbroken = tmp_path / "unbroken"
    # --max-restarts 2 here too: an exit can fail at random in torch (see docs/cluster.md).
    status, output = run_tagged(torchrun(recipe, unbroken, restarts=2), f"unbroken-{os.getpid()}")
    assert status == 0, output

    out = tmp_path / "restarted"
    tag = f"restarted-{os.getpid()}"
    killed = []

    def kill_rank_1(line: str) -> None:
        if not killed and line.startswith("beacon step 6"):  # in the middle of epoch 2
            killed.append(worker(tag, rank=1))
            os.kill(killed[0], signal.SIGKILL)

    command = torchrun(recipe, out, "--checkpoint-every", 1, restarts=2)
    status, output = run_tagged(command, tag, kill_rank_1)
    assert killed and status == 0, output
    assert f"failed (exitcode: -9) local_rank: 1 (pid: {killed[0]})" in output
    assert re.search(r"resumed from \S+last\.pt: epoch 2 after its batch [1-3],", output), output
    assert_same(weights(out), weights(unbroken))
    # Epoch 2's train_loss counts both processes' batches before the kill too (the
    # checkpoint, written by rank 0, holds the run's losses, not rank 0's alone).
    assert train_losses(out) == pytest.approx(train_losses(unbroken), rel=1e-6)
    resumes = json.loads((out / "config.json").read_text())["resumes"]
    assert resumes and {resume["checkpoint"] for resume in resumes} == {
        str(out / "checkpoints" / "last.pt")
    }
