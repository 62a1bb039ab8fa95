"""The interrupt plugin: Ctrl-C stops after the batch, saves interrupt.pt, exits 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import BEACON, make_learner

from trainloop import Learner, cli
from trainloop.plugins.checkpoint import Checkpoint
from trainloop.plugins.interrupt import FIRST_LINE, Interrupt

RECIPE = '''
"""An MLP with dropout on shuffled data that prints a line per batch, for Ctrl-C tests."""

import functools
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from trainloop import Learner, cli


@dataclass
class Config:
    epochs: int = 4
    sleep: float = 0.0


def build(cfg):
    inputs = torch.randn(96, 8, generator=torch.Generator().manual_seed(1))
    target = (inputs[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(16, 2), torch.nn.LogSoftmax(dim=1))
    data = DataLoader(TensorDataset(inputs, target), batch_size=8, shuffle=True)
    return Learner(model, data, DataLoader(TensorDataset(inputs[:16], target[:16]), batch_size=8),
                   optimizer=functools.partial(torch.optim.Adam, lr=0.01), plugins=[Beacon(cfg.sleep)])
'''
RECIPE += BEACON  # the Beacon(sleep) plugin build() adds
STEPS = 4 * 12


def _point(path: Path) -> tuple[int, int, int]:
    state = torch.load(path, weights_only=True)["learner"]
    return state["epoch"], state["iteration"], state["step"]


def test_sigint_saves_interrupt_pt_exits_130_and_resume_continues_there(tmp_path, capsys):
    recipe = tmp_path / "beacon.py"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    env = {**os.environ, "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [sys.executable, "-m", "trainloop", "run", str(recipe), "--out", str(out)]
    process = subprocess.Popen(
        command + ["--sleep", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    read = []
    for line in process.stdout:  # training is under way once batches go by
        read.append(line)
        if line.strip() == "beacon step 8" or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=120)
    stdout = "".join(read) + rest

    assert process.returncode == 130, stderr
    assert stderr.count(FIRST_LINE) == 1
    assert stderr.rstrip().endswith("trainloop: interrupted")
    interrupt_pt = out / "checkpoints" / "interrupt.pt"
    assert f"saved {interrupt_pt}; continue with --resume {interrupt_pt}" in stderr
    epoch, iteration, step = _point(interrupt_pt)
    assert 8 <= step < STEPS and epoch * 12 + iteration == step
    last_beacon = [line for line in stdout.splitlines() if line.startswith("beacon step")][-1]
    assert last_beacon == f"beacon step {step}"  # it stopped right after the batch it was in
    assert _point(out / "checkpoints" / "last.pt") == (epoch, iteration, step)
    assert (out / "model.pt").exists()

    assert cli.main(["run", str(recipe), "--out", str(out), "--resume", str(interrupt_pt)]) == 0
    beacons = [line for line in capsys.readouterr().out.splitlines() if "beacon step" in line]
    assert beacons[0] == f"beacon step {step + 1}" and beacons[-1] == f"beacon step {STEPS}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [0, 1, 2, 3]
    assert _point(out / "checkpoints" / "last.pt") == (4, 0, STEPS)


# --- in process, with real signals ------------------------------------------------------


class CtrlC:
    """Sends SIGINT to this process ``times`` times during training step ``step``."""

    def __init__(self, step: int, times: int = 1) -> None:
        self.step, self.times = step, times

    def on_batch_begin(self, learner: Learner) -> None:
        if learner.training and learner.step + 1 == self.step:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)


def test_first_ctrl_c_finishes_the_batch_then_resume_is_exact(tmp_path: Path, capfd) -> None:
    reference = make_learner()
    reference.fit(3)
    interrupt = Interrupt()
    stopped = make_learner([Checkpoint(tmp_path), interrupt, CtrlC(step=6)])
    with pytest.raises(KeyboardInterrupt):
        stopped.fit(3)
    assert capfd.readouterr().err.startswith(FIRST_LINE + "\n")
    assert interrupt.path == tmp_path / "interrupt.pt"
    assert _point(tmp_path / "interrupt.pt") == (1, 2, 6)  # 4 batches an epoch
    assert stopped.exception is None  # a clean stop, then KeyboardInterrupt for the CLI

    resumed = make_learner([Checkpoint(tmp_path, resume=tmp_path / "interrupt.pt")])
    resumed.fit(3)
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor)
    assert resumed.history == reference.history


def test_second_ctrl_c_quits_at_once_and_saves_nothing_more(tmp_path: Path) -> None:
    learner = make_learner([Checkpoint(tmp_path), Interrupt(announce=False), CtrlC(6, times=2)])
    with pytest.raises(KeyboardInterrupt):
        learner.fit(3)
    assert isinstance(learner.exception, KeyboardInterrupt)
    assert learner.step == 5  # raised inside step 6, before it ran
    assert not (tmp_path / "interrupt.pt").exists()
    assert _point(tmp_path / "last.pt") == (1, 0, 4)  # the last good one


def test_without_a_checkpoint_plugin_it_still_stops_and_says_so(capfd) -> None:
    learner = make_learner([Interrupt(), CtrlC(step=2)])
    with pytest.raises(KeyboardInterrupt):
        learner.fit(2)
    assert learner.step == 2
    assert "no checkpoint plugin is enabled" in capfd.readouterr().err


def test_the_previous_handler_is_back_after_fit() -> None:
    calls = []

    def mine(signum, frame):
        calls.append(signum)

    previous = {number: signal.signal(number, mine) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        inside = []

        class Look:
            def on_epoch_begin(self) -> None:
                inside.append([signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)])

        make_learner([Interrupt(), Look()]).fit(1)
        ((during_sigint, during_sigterm),) = inside
        assert during_sigint is not mine and during_sigterm is not mine
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert calls == [signal.SIGINT, signal.SIGTERM]
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_outside_the_main_thread_no_handler_is_installed() -> None:
    before = signal.getsignal(signal.SIGINT)
    inside = []

    class Look:
        def on_epoch_begin(self) -> None:
            inside.append(signal.getsignal(signal.SIGINT))

    errors = []

    def train() -> None:
        try:
            make_learner([Interrupt(), Look()]).fit(1)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert errors == [] and inside == [before]


def test_in_a_forked_child_the_handler_does_nothing() -> None:
    interrupt = Interrupt(announce=False)

    class ForkAndCtrlC:
        """Forks during step 2, as a DataLoader starting its workers does; Ctrl-C in the
        child (a terminal sends it to the whole process group) must leave it alone."""

        child_status: int | None = None

        def on_batch_begin(self, learner: Learner) -> None:
            if not learner.training or learner.step != 1:
                return
            pid = os.fork()
            if pid == 0:  # the child: report with the exit status, run nothing else
                ignored = False
                try:
                    signal.raise_signal(signal.SIGINT)
                    ignored = learner.should_stop is False and interrupt.requested is None
                finally:
                    os._exit(0 if ignored else 1)
            self.child_status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    forker = ForkAndCtrlC()
    learner = make_learner([interrupt, forker])
    learner.fit(1)
    assert forker.child_status == 0
    assert interrupt.requested is None and learner.history  # the parent trained on
