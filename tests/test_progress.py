"""The progress plugin: a metrics table per epoch, and progress lines off a terminal."""

from __future__ import annotations

import io
import threading
import time

import pytest
from conftest import implemented_hooks, make_learner

from trainloop.plugins.progress import Progress


class SlowBatches:
    def on_batch_end(self, learner):
        time.sleep(0.02)


def test_plain_mode_prints_a_header_and_one_row_per_epoch_with_the_metrics():
    stream = io.StringIO()
    learner = make_learner(plugins=[Progress(mode="plain", stream=stream)])
    history = learner.fit(2)
    lines = stream.getvalue().splitlines()
    assert lines[0].split() == ["epoch", "train_loss", "valid_loss", "valid_accuracy", "time"]
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == ["1", "2"]
    assert float(rows[1][1]) == float(f"{history[1]['train_loss']:.6g}")
    assert float(rows[1][3]) == float(f"{history[1]['valid_accuracy']:.6g}")


def test_plain_mode_prints_progress_lines_during_an_epoch_from_its_refresh_thread():
    stream = io.StringIO()
    learner = make_learner(
        plugins=[Progress(mode="plain", plain_every=0.03, stream=stream), SlowBatches()]
    )
    learner.fit(1)
    progress_lines = [line for line in stream.getvalue().splitlines() if " batch " in line]
    assert progress_lines, stream.getvalue()
    assert progress_lines[0].startswith("epoch 1/1 batch ")
    assert "/4 loss " in progress_lines[0]  # 50 samples in batches of 16


def test_progress_adds_no_per_batch_hook():
    learner = make_learner(plugins=[Progress(mode="plain", stream=io.StringIO())])
    per_batch = {
        "on_batch_begin",
        "on_batch_end",
        "on_backward_end",
        "on_step_begin",
        "on_step_end",
    }
    assert implemented_hooks(learner, per_batch) == set()


def test_the_refresh_thread_stops_when_fit_fails():
    before = set(threading.enumerate())
    during = []

    class Fail:
        def on_batch_end(self, learner):
            during.extend(set(threading.enumerate()) - before)
            raise RuntimeError("stop here")

    progress = Progress(mode="plain", plain_every=0.01, stream=io.StringIO())
    learner = make_learner(plugins=[progress, Fail()])
    with pytest.raises(RuntimeError, match="stop here"):
        learner.fit(1)
    assert during  # the refresh thread ran while the epoch did
    assert not any(thread.is_alive() for thread in during)
