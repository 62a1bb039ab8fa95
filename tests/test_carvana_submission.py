"""Carvana's SubmissionWriter: submit.csv.gz rows, Kaggle's RLE of each thresholded mask."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainloop import Learner
from trainloop.tasks.carvana.rle import rle_decode
from trainloop.tasks.carvana.submission import SubmissionWriter


class Passthrough(torch.nn.Module):
    """A model whose output is its input: the test hands it the probability maps."""

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps


def predict_with(writer: SubmissionWriter, batches: list, tmp_path: Path) -> Learner:
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
    writer = SubmissionWriter(tmp_path / "submit.csv.gz", images, threshold=0.5, logits=False)
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
    writer = SubmissionWriter(tmp_path / "s.csv.gz", [("x.jpg", (4, 1))], threshold=0.7)
    predict_with(writer, [(logits[:, None], torch.tensor([0]))], tmp_path)
    assert read_rows(tmp_path / "s.csv.gz")[1] == ["x.jpg", "2 2"]


def test_each_map_is_resized_to_its_own_non_square_original_size(tmp_path):
    # A 4x6 map (height x width) whose left half is set, for images of two sizes.
    half = torch.zeros(1, 1, 4, 6)
    half[..., :3] = 1.0
    sizes = [(30, 8), (12, 20)]  # (width, height), neither square nor the map's ratio
    images = [("wide.jpg", sizes[0]), ("tall.jpg", sizes[1])]
    writer = SubmissionWriter(tmp_path / "s.csv.gz", images, logits=False)
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
    writer = SubmissionWriter(None, Photos(), logits=False)
    predict_with(writer, [(maps, torch.tensor([0, 1]))], tmp_path)
    rows = read_rows(tmp_path / "submit.csv.gz")  # the default path: RUN_DIR/submit.csv.gz
    assert rows[1:] == [["p_01.jpg", "1 1000"], ["p_02.jpg", "1 1000"]]
    assert rle_decode(rows[1][1], (20, 50)).all()


def test_batches_without_indices_are_refused_with_what_to_do(tmp_path):
    writer = SubmissionWriter(tmp_path / "s.csv.gz", [("a.jpg", (2, 1))])
    with pytest.raises(TypeError, match=r"batches of \(images, indices\)"):
        predict_with(writer, [torch.ones(1, 1, 1, 2)], tmp_path)


def test_a_threshold_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="threshold 1.5: use a value in \\(0, 1\\)"):
        SubmissionWriter("s.csv.gz", [("a.jpg", (2, 1))], threshold=1.5)
