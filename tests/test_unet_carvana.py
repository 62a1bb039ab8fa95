"""recipes/unet_carvana.py end to end through the CLI, on tiny generated data, and its bad input."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CARVANA_PHOTO_SIZE, ROOT
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision import tv_tensors
from torchvision.transforms import v2

from trainloop import hookimpl
from trainloop.cli import DISABLE_AUTOLOAD, main
from trainloop.manager import builtin_plugin_names
from trainloop.recipe import load_recipe
from trainloop.tasks.carvana.dataset import resize_mask
from trainloop.tasks.carvana.pictures import overlay_rows
from trainloop.tasks.carvana.rle import rle_decode

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")

RECIPE = str(ROOT / "recipes" / "unet_carvana.py")
PHOTO_SIZE = CARVANA_PHOTO_SIZE  # of conftest's generated set (fixtures generated, input_dir)
TINY = ["--image-size", "32", "24", "--depth", "2", "--base-width", "4", "--epochs", "1"]


class LeftHalfPredictions:
    """Predicts the left half of every test photo as car (logits +-10): a known answer."""

    @hookimpl
    def forward(self, learner, batch):
        images, second = batch
        if second.dim() != 1:  # training and validation batches (images, masks)
            return None
        logits = torch.full((len(images), 1, *images.shape[-2:]), -10.0)
        logits[..., : images.shape[-1] // 2] = 10.0
        return logits


LEFT_HALF = LeftHalfPredictions()  # for -p test_unet_carvana:LEFT_HALF


@pytest.fixture(autouse=True)
def no_entry_points(monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD, "1")


def read_rows(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", newline="") as file:
        return list(csv.reader(file))


def test_a_run_trains_shows_saves_and_writes_a_submission_at_the_photos_own_size(
    generated, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    status = main(
        ["run", RECIPE, "--input-dir", str(generated), *TINY, "--out", str(run_dir),
         "-p", "test_unet_carvana:LEFT_HALF"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    assert "generated" not in out  # the data was there
    assert "16 training and 16 validation photos at 32x24" in out
    assert f"submission: {run_dir / 'submit.csv.gz'} (16 rows)" in out

    (metrics,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert list(metrics) == [
        "epoch", "train_loss", "train_samples_per_second", "train_data_wait", "valid_loss",
        "valid_dice",
    ]  # fmt: skip
    assert 0.0 <= metrics["valid_dice"] <= 1.0

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert {"train_loss", "valid_loss", "valid_dice"} <= set(events.Tags()["scalars"])
    (picture,) = events.Images("valid_images/samples")  # 4 rows of photo | truth | prediction
    assert (picture.height, picture.width) == (4 * 24 + 3 * 2, 3 * 32 + 2 * 2)
    if "model_saver" in builtin_plugin_names():
        saved = torch.load(run_dir / "model.pt", weights_only=True)
        assert saved["config"]["base_width"] == 4

    rows = read_rows(run_dir / "submit.csv.gz")
    test_names = sorted(path.name for path in (generated / "test").glob("*.jpg"))
    assert rows[0] == ["img", "rle_mask"]
    assert [name for name, _ in rows[1:]] == test_names
    width, height = PHOTO_SIZE
    left_half = np.zeros((height, width), dtype=bool)
    left_half[:, : width // 2] = True
    for name, rle in rows[1:]:
        with Image.open(generated / "test" / name) as photo:
            assert photo.size == PHOTO_SIZE
        assert np.array_equal(rle_decode(rle, (height, width)), left_half), name
    assert not list(run_dir.glob("*.partial"))


def test_without_data_the_recipe_generates_it_says_so_once_and_predicts_every_test_photo(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the default --input-dir is ./input
    status = main(
        ["run", RECIPE, *TINY, "--out", "run", "--synthetic-cars", "2",
         "--synthetic-test-cars", "1", "--synthetic-size", "56", "40", "--no-tensorboard"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    assert out.count("generated a synthetic set") == 1
    assert (
        "no Carvana data in input: generated a synthetic set there (2 training and 1 test cars, 56x40 photos)"
        in out
    )
    assert len(list((tmp_path / "input" / "train").glob("*.jpg"))) == 32
    rows = read_rows(tmp_path / "run" / "submit.csv.gz")[1:]
    assert len(rows) == 16
    for name, rle in rows:
        assert rle_decode(rle, (40, 56)).shape == (40, 56), name


def test_no_predict_trains_without_writing_a_submission(generated, tmp_path):
    status = main(["run", RECIPE, "--input-dir", str(generated), *TINY, "--out",
                   str(tmp_path / "run"), "--no-predict", "--no-tensorboard"])  # fmt: skip
    assert status == 0
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "submit.csv.gz").exists()


# --- bad input: one line naming the thing, exit status 2 -------------------------------


def run_expecting_usage_error(input_dir: Path, tmp_path: Path, capsys, *options: str) -> str:
    status = main(["run", RECIPE, "--input-dir", str(input_dir), *TINY, "--out",
                   str(tmp_path / "run"), "--no-tensorboard", *options])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainloop: error: "), err
    return lines[0]


def test_images_without_masks_are_a_usage_error(input_dir, tmp_path, capsys):
    shutil.rmtree(input_dir / "train_masks")
    line = run_expecting_usage_error(input_dir, tmp_path, capsys)
    assert f"{input_dir / 'train_masks'} has no masks: unzip train_masks.zip" in line
    assert not (tmp_path / "run").exists()


def test_a_mask_without_its_image_is_named(input_dir, tmp_path, capsys):
    photo = sorted((input_dir / "train").glob("*.jpg"))[3]
    photo.unlink()
    line = run_expecting_usage_error(input_dir, tmp_path, capsys)
    assert f"{input_dir / 'train_masks' / photo.stem}_mask.gif has no image {photo}" in line


def test_a_photo_that_is_not_a_jpeg_is_named(input_dir, tmp_path, capsys):
    photo = sorted((input_dir / "train").glob("*.jpg"))[5]
    photo.write_bytes(b"this is not a JPEG file at all")
    line = run_expecting_usage_error(input_dir, tmp_path, capsys)
    assert f"{photo} is not a readable JPEG image" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_jpeg_is_named_in_one_line_when_it_is_decoded(
    input_dir, tmp_path, capsys, workers
):
    photo = sorted((input_dir / "train").glob("*.jpg"))[0]
    data = photo.read_bytes()
    photo.write_bytes(data[: len(data) * 2 // 3])  # the header reads; the pixels do not
    # The photo fails in the validation phase, after a first epoch that, decoding JPEGs on
    # a busy machine, may rightly warn that it is data-bound: that line is not under test.
    line = run_expecting_usage_error(
        input_dir, tmp_path, capsys, "--workers", str(workers), "--no-throughput"
    )
    assert f"{photo} is not a readable JPEG image (Image is incomplete or truncated)" in line


def test_an_unreadable_gif_mask_is_named(input_dir, tmp_path, capsys):
    mask = sorted((input_dir / "train_masks").glob("*.gif"))[2]
    mask.write_bytes(b"GIF89a broken")
    line = run_expecting_usage_error(input_dir, tmp_path, capsys)
    assert f"{mask} is not a readable mask" in line


@pytest.mark.parametrize("workers", [0, 2])
def test_an_input_dir_that_is_a_file_is_named_as_the_option(tmp_path, capsys, workers):
    not_a_folder = tmp_path / "input.zip"
    not_a_folder.write_bytes(b"a file")
    line = run_expecting_usage_error(not_a_folder, tmp_path, capsys, "--workers", str(workers))
    assert line.endswith(f"--input-dir {not_a_folder} is a file, not a folder: give the folder "
                         f"that holds (or will hold) the Carvana data")  # fmt: skip
    assert not_a_folder.read_bytes() == b"a file"


def test_an_empty_test_folder_is_a_usage_error(input_dir, tmp_path, capsys):
    for photo in (input_dir / "test").glob("*.jpg"):
        photo.unlink()
    line = run_expecting_usage_error(input_dir, tmp_path, capsys)
    assert f"{input_dir / 'test'} has no .jpg images: unzip test.zip" in line


def test_an_image_size_not_divisible_by_two_to_the_depth_names_the_nearest_valid_sizes(
    generated, tmp_path, capsys
):
    line = run_expecting_usage_error(
        generated, tmp_path, capsys, "--image-size", "150", "100", "--depth", "4"
    )
    assert line.endswith("--image-size 150x100 is not divisible by 2^4=16: use 160x112 or 144x96")


def test_an_image_size_of_zero_suggests_the_smallest_valid_size(generated, tmp_path, capsys):
    line = run_expecting_usage_error(generated, tmp_path, capsys, "--image-size", "0", "0")
    assert line.endswith(
        "--image-size 0x0: each side must be a positive multiple of 2^2=4: use 4x4 or larger"
    )
    assert not (tmp_path / "run").exists()


def test_a_mistyped_input_dir_is_a_usage_error_and_nothing_is_generated(tmp_path, capsys):
    typo = tmp_path / "inptu"
    line = run_expecting_usage_error(typo, tmp_path, capsys)
    assert line.endswith(
        f"--input-dir {typo} has no Carvana data (no photos in train/, no Kaggle zip files): "
        "download the competition's files there (docs/carvana.md), or add --synthetic to "
        "generate a synthetic set there"
    )
    assert not typo.exists() and not (tmp_path / "run").exists()


def test_a_synthetic_option_asks_for_a_generated_set_in_another_folder(tmp_path, capsys):
    elsewhere = tmp_path / "tiny"
    status = main(
        ["run", RECIPE, "--input-dir", str(elsewhere), *TINY, "--out", str(tmp_path / "run"),
         "--synthetic-cars", "2", "--synthetic-test-cars", "1", "--synthetic-size", "56", "40",
         "--no-tensorboard", "--no-predict"]
    )  # fmt: skip
    assert status == 0
    assert (
        f"no Carvana data in {elsewhere}: generated a synthetic set there (2 training and 1 "
        "test cars, 56x40 photos)" in capsys.readouterr().out
    )
    assert len(list((elsewhere / "train").glob("*.jpg"))) == 32
    recipe = load_recipe(Path(RECIPE))
    assert recipe.wants_synthetic(recipe.Config(input_dir=Path("other"), synthetic=True))
    assert recipe.wants_synthetic(recipe.Config())  # the default folder, input
    assert not recipe.wants_synthetic(recipe.Config(input_dir=Path("other")))


def test_build_from_python_seeds_from_cfg_seed_as_the_command_line_does(generated, tmp_path):
    recipe = load_recipe(Path(RECIPE))
    cfg = recipe.Config(
        input_dir=generated, image_size=(32, 24), depth=2, base_width=4, epochs=1,
        predict=False, seed=3,
    )  # fmt: skip
    torch.manual_seed(100)
    first = recipe.build(cfg)
    torch.manual_seed(200)  # the global RNG before build plays no part
    second = recipe.build(cfg)
    other_seed = recipe.build(dataclasses.replace(cfg, seed=4))
    for name, weight in first.model.state_dict().items():
        assert torch.equal(weight, second.model.state_dict()[name]), name
    assert not torch.equal(first.model.stem[0].weight, other_seed.model.stem[0].weight)
    assert torch.equal(next(iter(first.train_data))[0], next(iter(second.train_data))[0])

    first.fit(cfg.epochs)
    status = main(
        ["run", RECIPE, "--input-dir", str(generated), *TINY, "--out", str(tmp_path / "run"),
         "--seed", "3", "--no-predict", "--no-tensorboard"]
    )  # fmt: skip
    assert status == 0
    from_cli = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    for name, weight in first.model.state_dict().items():
        assert torch.equal(weight, from_cli["model"][name]), name


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--threshold", "1.5", "--threshold 1.5: use a probability between 0 and 1"),
        ("--batch-size", "0", "--batch-size 0: use 1 or more"),
        ("--workers", "-1", "--workers -1: use 0"),
    ],
)
def test_bad_option_values_are_usage_errors(generated, tmp_path, capsys, option, value, message):
    line = run_expecting_usage_error(generated, tmp_path, capsys, option, value)
    assert message in line


# --- the pictures ----------------------------------------------------------------------


def test_the_picture_shows_photo_truth_and_prediction_side_by_side():
    images = torch.full((2, 3, 4, 6), 0.5)
    masks = torch.zeros(2, 1, 4, 6)
    masks[0, 0, 0, 0] = 1.0
    logits = torch.full((2, 1, 4, 6), -5.0)
    logits[1, 0, 3, 5] = 5.0
    picture = overlay_rows(images, masks, logits, threshold=0.5)
    assert picture.shape == (3, 2 * 4 + 2, 3 * 6 + 2 * 2)
    assert picture.min() >= 0 and picture.max() <= 1
    photo, truth, prediction = (picture[:, :, left : left + 6] for left in (0, 8, 16))
    torch.testing.assert_close(photo[:, :4], images[0])
    # the truth pixel of sample 0 is tinted green, the predicted pixel of sample 1 red
    assert truth[1, 0, 0] > truth[0, 0, 0] and truth[1, 0, 1] == 0.5
    assert prediction[0, 6 + 3, 5] > prediction[1, 6 + 3, 5]
    assert prediction[0, 6 + 3, 4] == 0.5
    assert (picture[:, 4:6] == 1).all()  # the white line between the rows


def test_masks_are_resized_by_area_so_outlines_match_a_mask_drawn_at_that_size():
    def disc(width, height, scale):  # a disc of radius 40 (at 200x136), centred
        rows, columns = np.mgrid[0:height, 0:width]
        inside = (columns + 0.5 - width / 2) ** 2 + (rows + 0.5 - height / 2) ** 2
        return torch.from_numpy(inside < (40 * scale) ** 2).to(torch.uint8)[None]

    big, expected = disc(200, 136, 1.0), disc(144, 96, 0.72)
    by_area = resize_mask(big, (144, 96))
    by_nearest = v2.functional.resize(tv_tensors.Mask(big), [96, 144])
    assert by_area.shape == (1, 96, 144) and by_area.dtype == torch.uint8
    wrong_by_area = (by_area != expected).sum().item()
    wrong_by_nearest = (by_nearest != expected).sum().item()
    assert wrong_by_area * 1.5 < wrong_by_nearest  # 48 pixels against 91
