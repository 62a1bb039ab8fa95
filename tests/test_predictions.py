"""The predictions plugin: PredictionWriter streams submit.csv.gz rows while predicting."""

from __future__ import annotations

import argparse
import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainloop import Learner, PluginManager, RunConfig, hookimpl
from trainloop.plugins import predictions
from trainloop.plugins.predictions import PredictionWriter
from trainloop.rle import rle_decode


class Passthrough(torch.nn.Module):
    """A model whose output is its input: the test hands it the probability maps."""

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps


def predict_with(writer: PredictionWriter, batches: list, tmp_path: Path) -> Learner:
    learner = Learner(
        Passthrough(), [], plugins=[writer], run_dir=tmp_path, optimizer=_no_optimizer
    )
    learner.predict(batches, keep=False)
    return learner


def _no_optimizer(parameters) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def read_rows(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", newline="") as file:
        return list(csv.reader(file))


def test_rows_are_the_exact_kaggle_rle_of_thresholded_probability_maps(tmp_path):
    maps = torch.tensor(
        [
            [[0.9, 0.2, 0.6], [0.1, 0.51, 0.99]],  # above 0.5: (0,0) (0,2) (1,1) (1,2)
            [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # empty mask: empty RLE
            [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],  # first and last pixel set
        ]
    )
    images = [("a.jpg", (3, 2)), ("b.jpg", (3, 2)), ("c.jpg", (3, 2))]
    writer = PredictionWriter(tmp_path / "submit.csv.gz", images, threshold=0.5, logits=False)
    predict_with(writer, [(maps[:2, None], torch.tensor([0, 1])), (maps[2:, None], [2])], tmp_path)
    assert read_rows(tmp_path / "submit.csv.gz") == [
        ["img", "rle_mask"],
        ["a.jpg", "1 1 3 1 5 2"],
        ["b.jpg", ""],
        ["c.jpg", "1 6"],
    ]
    assert writer.count == 3


def test_logits_go_through_a_sigmoid_and_the_threshold_is_applied_to_probabilities(tmp_path):
    # sigmoid(0.5) = 0.62, sigmoid(1.0) = 0.73, sigmoid(2.0) = 0.88
    logits = torch.tensor([[[0.5, 1.0, 2.0, -3.0]]])
    writer = PredictionWriter(tmp_path / "s.csv.gz", [("x.jpg", (4, 1))], threshold=0.7)
    predict_with(writer, [(logits[:, None], torch.tensor([0]))], tmp_path)
    assert read_rows(tmp_path / "s.csv.gz")[1] == ["x.jpg", "2 2"]


def test_each_map_is_resized_to_its_own_non_square_original_size(tmp_path):
    # A 4x6 map (height x width) whose left half is set, for images of two sizes.
    half = torch.zeros(1, 1, 4, 6)
    half[..., :3] = 1.0
    sizes = [(30, 8), (12, 20)]  # (width, height), neither square nor the map's ratio
    images = [("wide.jpg", sizes[0]), ("tall.jpg", sizes[1])]
    writer = PredictionWriter(tmp_path / "s.csv.gz", images, logits=False)
    predict_with(writer, [(torch.cat([half, half]), torch.tensor([0, 1]))], tmp_path)
    rows = read_rows(tmp_path / "s.csv.gz")[1:]
    for (name, rle), (width, height) in zip(rows, sizes, strict=True):
        mask = rle_decode(rle, (height, width))
        expected = np.zeros((height, width), dtype=bool)
        expected[:, : width // 2] = True
        assert np.array_equal(mask, expected), name


def test_original_sizes_are_read_from_the_dataset_images(tmp_path):
    class Photos:  # what CarvanaDataset(split="test") offers the writer
        names = ["p_01.jpg", "p_02.jpg"]

        def original_size(self, index):
            with Image.open(tmp_path / self.names[index]) as image:
                return image.size

    Image.new("RGB", (50, 20)).save(tmp_path / "p_01.jpg")
    Image.new("RGB", (20, 50)).save(tmp_path / "p_02.jpg")
    maps = torch.ones(2, 1, 8, 8)
    writer = PredictionWriter(None, Photos(), logits=False)
    predict_with(writer, [(maps, torch.tensor([0, 1]))], tmp_path)
    rows = read_rows(tmp_path / "submit.csv.gz")  # the default path: RUN_DIR/submit.csv.gz
    assert rows[1:] == [["p_01.jpg", "1 1000"], ["p_02.jpg", "1 1000"]]
    assert rle_decode(rows[1][1], (20, 50)).all()


def test_rows_come_in_dataset_order_whatever_order_the_batches_come_in(tmp_path):
    names = [f"car_{i:02d}.jpg" for i in range(7)]
    images = [(name, (4, 1)) for name in names]
    maps = torch.zeros(7, 1, 1, 4)
    for index in range(7):  # image i has its first i % 4 + 1 pixels set: rows tell apart
        maps[index, 0, 0, : index % 4 + 1] = 1.0
    order = [[5, 2], [0], [6, 1, 3], [4]]
    batches = [(maps[indices], torch.tensor(indices)) for indices in order]
    writer = PredictionWriter(tmp_path / "s.csv.gz", images, logits=False)
    predict_with(writer, batches, tmp_path)
    rows = read_rows(tmp_path / "s.csv.gz")[1:]
    assert [row[0] for row in rows] == names
    assert [row[1] for row in rows] == [f"1 {index % 4 + 1}" for index in range(7)]


def test_rows_are_written_as_batches_arrive_not_held_until_the_end(tmp_path):
    seen = []

    class Peek:  # after each batch, how many rows has the writer written?
        @hookimpl(trylast=True)  # after the writer
        def on_predict_batch_end(self, learner):
            seen.append(writer.count)

    images = [(f"{i}.jpg", (2, 2)) for i in range(6)]
    writer = PredictionWriter(tmp_path / "s.csv.gz", images, logits=False)
    batches = [(torch.ones(2, 1, 2, 2), torch.tensor([i, i + 1])) for i in (0, 2, 4)]
    learner = Learner(Passthrough(), [], plugins=[writer], optimizer=_no_optimizer)
    learner.add_plugin(Peek())
    learner.predict(batches, keep=False)
    assert seen == [2, 4, 6]


def test_an_error_mid_predict_leaves_no_submission_only_a_partial_file(tmp_path, capsys):
    class Boom:
        @hookimpl
        def forward(self, learner, batch):
            if learner.iteration == 2:
                raise RuntimeError("out of memory")
            return batch[0]

    images = [(f"{i}.jpg", (2, 2)) for i in range(8)]
    writer = PredictionWriter(tmp_path / "submit.csv.gz", images, logits=False)
    batches = [(torch.ones(2, 1, 2, 2), torch.tensor([i, i + 1])) for i in (0, 2, 4, 6)]
    learner = Learner(Passthrough(), [], plugins=[writer, Boom()], optimizer=_no_optimizer)
    with pytest.raises(RuntimeError, match="out of memory"):
        learner.predict(batches, keep=False)
    assert not (tmp_path / "submit.csv.gz").exists()
    partial = tmp_path / "submit.csv.gz.partial"
    assert read_rows(partial) == [["img", "rle_mask"], ["0.jpg", "1 4"], ["1.jpg", "1 4"],
                                  ["2.jpg", "1 4"], ["3.jpg", "1 4"]]  # fmt: skip
    assert "after 4 of 8 rows" in capsys.readouterr().err


def test_a_new_complete_submission_replaces_the_old_one_and_its_partial_file(tmp_path):
    images = [("a.jpg", (2, 1))]
    path = tmp_path / "submit.csv.gz"
    path.write_bytes(b"old")
    writer = PredictionWriter(path, images, logits=False)
    predict_with(writer, [(torch.ones(1, 1, 1, 2), torch.tensor([0]))], tmp_path)
    assert read_rows(path) == [["img", "rle_mask"], ["a.jpg", "1 2"]]
    assert not (tmp_path / "submit.csv.gz.partial").exists()


def test_a_predict_that_misses_images_is_an_error_and_writes_no_submission(tmp_path):
    images = [(f"{i}.jpg", (2, 1)) for i in range(3)]
    writer = PredictionWriter(tmp_path / "submit.csv.gz", images, logits=False)
    with pytest.raises(ValueError, match=r"rows for 2 of 3 images \(the first missing is 1.jpg\)"):
        predict_with(writer, [(torch.ones(2, 1, 1, 2), torch.tensor([0, 2]))], tmp_path)
    assert not (tmp_path / "submit.csv.gz").exists()


def test_an_image_predicted_twice_is_an_error(tmp_path):
    writer = PredictionWriter(tmp_path / "s.csv.gz", [("a.jpg", (2, 1)), ("b.jpg", (2, 1))])
    batches = [(torch.ones(1, 1, 1, 2), torch.tensor([0]))] * 2
    with pytest.raises(ValueError, match=r"image 0 \(a.jpg\) twice"):
        predict_with(writer, batches, tmp_path)


def test_batches_without_indices_are_refused_with_what_to_do(tmp_path):
    writer = PredictionWriter(tmp_path / "s.csv.gz", [("a.jpg", (2, 1))])
    with pytest.raises(TypeError, match=r"batches of \(images, indices\)"):
        predict_with(writer, [torch.ones(1, 1, 1, 2)], tmp_path)


def test_a_process_that_does_not_write_creates_no_file(tmp_path):
    writer = PredictionWriter(tmp_path / "s.csv.gz", [("a.jpg", (2, 1))], write=False)
    predict_with(writer, [(torch.ones(1, 1, 1, 2), torch.tensor([0]))], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_under_the_cli_only_the_main_process_writes(tmp_path):
    config = RunConfig(argparse.Namespace(), tmp_path, Path("r.py"), None, PluginManager())
    config.context.rank, config.context.world_size = 1, 2  # a process above rank 0
    predictions.configure(config)
    try:
        writer = PredictionWriter(tmp_path / "s.csv.gz", [("a.jpg", (2, 1))])
        predict_with(writer, [(torch.ones(1, 1, 1, 2), torch.tensor([0]))], tmp_path)
    finally:
        predictions.unconfigure()
    assert list(tmp_path.iterdir()) == []
    writer = PredictionWriter(tmp_path / "s.csv.gz", [("a.jpg", (2, 1))])  # after the run
    predict_with(writer, [(torch.ones(1, 1, 1, 2), torch.tensor([0]))], tmp_path)
    assert (tmp_path / "s.csv.gz").exists()


def test_a_threshold_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="threshold 1.5: use a value in \\(0, 1\\)"):
        PredictionWriter("s.csv.gz", [("a.jpg", (2, 1))], threshold=1.5)
