"""The predictions plugin: PredictionWriter streams one CSV row per item while predicting."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pytest
import torch

from trainloop import Learner, PluginManager, hookimpl
from trainloop.context import RunContext, current_run
from trainloop.plugins.predictions import PredictionWriter


class Labels(PredictionWriter):
    """``id,label``: the most likely class of each item of a batch ``(inputs, indices)``."""

    header = ("id", "label")
    file_name = "labels.csv.gz"

    def rows(self, batch, pred):
        for index, label in zip(batch[1].tolist(), pred.argmax(dim=1).tolist(), strict=True):
            yield index, (str(label),)


class Passthrough(torch.nn.Module):
    """A model whose output is its input: the test hands it the class scores."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


def _no_optimizer(parameters) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def learner_with(*plugins, run_dir: Path | None = None) -> Learner:
    return Learner(Passthrough(), [], plugins=plugins, run_dir=run_dir, optimizer=_no_optimizer)


def one_hot(labels: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), num_classes=4).float()


def batches_of(labels: list[int], order: list[list[int]]) -> list:
    """Batches ``(scores, indices)`` that predict ``labels[i]`` for item ``i``, in ``order``."""
    scores = one_hot(labels)
    return [(scores[indices], torch.tensor(indices)) for indices in order]


def read_rows(path: Path) -> list[list[str]]:
    opener = gzip.open if ".gz" in path.suffixes else open
    with opener(path, "rt", newline="") as file:
        return list(csv.reader(file))


def test_rows_come_in_key_order_whatever_order_the_batches_come_in(tmp_path):
    keys = [f"item_{i}" for i in range(7)]
    labels = [3, 1, 0, 2, 2, 1, 3]
    writer = Labels(tmp_path / "labels.csv.gz", keys)
    learner_with(writer).predict(batches_of(labels, [[5, 2], [0], [6, 1, 3], [4]]), keep=False)
    assert read_rows(tmp_path / "labels.csv.gz") == [["id", "label"]] + [
        [key, str(label)] for key, label in zip(keys, labels, strict=True)
    ]
    assert writer.count == 7


def test_rows_are_written_as_batches_arrive_not_held_until_the_end(tmp_path):
    seen = []

    class Peek:  # after each batch, how many rows has the writer written?
        @hookimpl(trylast=True)  # after the writer
        def on_predict_batch_end(self):
            seen.append(writer.count)

    writer = Labels(tmp_path / "l.csv.gz", [str(i) for i in range(6)])
    learner = learner_with(writer, Peek())
    learner.predict(batches_of([0] * 6, [[0, 1], [2, 3], [4, 5]]), keep=False)
    assert seen == [2, 4, 6]


def test_an_error_mid_predict_leaves_no_final_file_only_a_partial_one(tmp_path, capsys):
    class Boom:
        @hookimpl
        def forward(self, learner, batch):
            if learner.iteration == 2:
                raise RuntimeError("out of memory")
            return batch[0]

    writer = Labels(tmp_path / "labels.csv.gz", [str(i) for i in range(8)])
    learner = learner_with(writer, Boom())
    with pytest.raises(RuntimeError, match="out of memory"):
        learner.predict(batches_of([1] * 8, [[0, 1], [2, 3], [4, 5], [6, 7]]), keep=False)
    assert not (tmp_path / "labels.csv.gz").exists()
    assert writer.partial_path == tmp_path / "labels.csv.gz.partial"
    assert read_rows(writer.partial_path) == [["id", "label"], ["0", "1"], ["1", "1"],
                                              ["2", "1"], ["3", "1"]]  # fmt: skip
    assert "after 4 of 8 rows" in capsys.readouterr().err


def test_a_new_complete_file_replaces_the_old_one_and_its_partial_file(tmp_path):
    path = tmp_path / "labels.csv.gz"
    path.write_bytes(b"old")
    learner_with(Labels(path, ["a"])).predict(batches_of([2], [[0]]), keep=False)
    assert read_rows(path) == [["id", "label"], ["a", "2"]]
    assert not (tmp_path / "labels.csv.gz.partial").exists()


def test_the_same_predictions_make_the_same_bytes(tmp_path):
    for folder in ("first", "second"):
        writer = Labels(tmp_path / folder / "labels.csv.gz", ["a", "b"])
        learner_with(writer).predict(batches_of([1, 2], [[0, 1]]), keep=False)
    first, second = (tmp_path / folder / "labels.csv.gz" for folder in ("first", "second"))
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes()[4:8] == bytes(4)  # gzip's time stamp: none, not the clock


def test_a_name_without_gz_is_a_plain_csv_and_no_path_means_the_run_folder(tmp_path):
    learner_with(Labels(tmp_path / "labels.csv", ["a"])).predict(batches_of([3], [[0]]), keep=False)
    assert (tmp_path / "labels.csv").read_text() == "id,label\na,3\n"
    writer = Labels(None, ["a"])
    learner_with(writer, run_dir=tmp_path / "run").predict(batches_of([3], [[0]]), keep=False)
    assert writer.path == tmp_path / "run" / "labels.csv.gz"
    assert read_rows(writer.path) == [["id", "label"], ["a", "3"]]


def test_a_predict_that_misses_items_is_an_error_and_writes_no_file(tmp_path):
    writer = Labels(tmp_path / "labels.csv.gz", ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"rows for 2 of 3 items \(the first missing is b\)"):
        learner_with(writer).predict(batches_of([0, 0, 0], [[0, 2]]), keep=False)
    assert not (tmp_path / "labels.csv.gz").exists()


def test_an_item_predicted_twice_or_out_of_range_is_an_error(tmp_path):
    writer = Labels(tmp_path / "l.csv.gz", ["a", "b"])
    with pytest.raises(ValueError, match=r"Labels got item 0 \(a\) twice"):
        learner_with(writer).predict(batches_of([0, 0], [[0], [0]]), keep=False)
    writer = Labels(tmp_path / "l.csv.gz", ["a"])
    with pytest.raises(ValueError, match=r"got index 1, but it has 1 items \(0 to 0\)"):
        learner_with(writer).predict([(one_hot([0]), torch.tensor([1]))], keep=False)


def test_a_process_that_does_not_write_creates_no_file(tmp_path):
    writer = Labels(tmp_path / "l.csv.gz", ["a"], write=False)
    learner_with(writer).predict(batches_of([0], [[0]]), keep=False)
    assert list(tmp_path.iterdir()) == []


def test_only_the_main_process_of_the_run_writes(tmp_path):
    def predict(context: RunContext) -> None:
        learner = Learner(Passthrough(), [], optimizer=_no_optimizer, context=context)
        learner.add_plugin(Labels(tmp_path / "l.csv.gz", ["a"]))
        learner.predict(batches_of([0], [[0]]), keep=False)

    predict(RunContext(rank=1, world_size=2))
    assert list(tmp_path.iterdir()) == []
    predict(RunContext(rank=0, world_size=2))
    assert read_rows(tmp_path / "l.csv.gz") == [["id", "label"], ["a", "0"]]


def test_a_learner_made_in_a_run_takes_the_runs_context(tmp_path):
    with current_run(RunContext(rank=1, world_size=2), PluginManager()):
        learner = learner_with(Labels(tmp_path / "l.csv.gz", ["a"]))
    learner.predict(batches_of([0], [[0]]), keep=False)
    assert list(tmp_path.iterdir()) == []


def test_a_writer_without_rows_says_what_to_implement(tmp_path):
    writer = PredictionWriter(tmp_path / "p.csv", ["a"])
    with pytest.raises(NotImplementedError, match=r"PredictionWriter must implement rows"):
        learner_with(writer).predict(batches_of([0], [[0]]), keep=False)
