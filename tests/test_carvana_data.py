import csv
import re
import shutil
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from trainloop.errors import UsageError
from trainloop.tasks.carvana.dataset import (
    CarvanaDataset,
    SharedGridAffine,
    make_loader,
    training_loaders,
)
from trainloop.tasks.carvana.files import check_layout, fetch_kaggle, kaggle_file_names, unpack
from trainloop.tasks.carvana.prepare import prepare_input
from trainloop.tasks.carvana.rle import rle_decode
from trainloop.tasks.carvana.split import split_by_car, train_valid_ids, varied_order
from trainloop.tasks.carvana.synthetic import ensure_data, generate_dataset
from trainloop.tasks.carvana.unet import check_size

# torchvision 0.29 deprecates its JPEG decoder in favour of TorchCodec; it still works.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")

SIZE = (64, 40)  # (width, height): non-square on purpose


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> Path:
    """A synthetic set of 3 training cars and 1 test car, shared read-only by the tests
    (conftest's ``input_dir`` copies it for the tests that break it)."""
    input_dir = tmp_path_factory.mktemp("carvana-data") / "input"
    generate_dataset(input_dir, n_train_cars=3, n_test_cars=1, size=SIZE, seed=0)
    return input_dir


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as file:
        return list(csv.reader(file))


def gif_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "GIF"
        assert image.mode == "P"
        return np.asarray(image)


# The generator


def test_generator_writes_the_kaggle_layout(generated):
    train = sorted(path.name for path in (generated / "train").iterdir())
    masks = sorted(path.name for path in (generated / "train_masks").iterdir())
    test = sorted(path.name for path in (generated / "test").iterdir())
    assert len(train) == 48 and len(test) == 16
    assert all(re.fullmatch(r"[0-9a-f]{12}_(0[1-9]|1[0-6])\.jpg", name) for name in train + test)
    cars = sorted({name[:12] for name in train})
    assert len(cars) == 3
    assert train == [f"{car}_{view:02d}.jpg" for car in cars for view in range(1, 17)]
    assert masks == [name.replace(".jpg", "_mask.gif") for name in train]
    with Image.open(generated / "train" / train[0]) as photo:
        assert (photo.format, photo.mode, photo.size) == ("JPEG", "RGB", SIZE)

    metadata = read_csv(generated / "metadata.csv")
    assert metadata[0] == ["id", "year", "make", "model", "trim1", "trim2"]
    assert sorted(row[0] for row in metadata[1:]) == sorted([*cars, test[0][:12]])
    assert all(2001 <= int(row[1]) <= 2017 and row[2] and row[3] for row in metadata[1:])
    submission = read_csv(generated / "sample_submission.csv")
    assert submission[0] == ["img", "rle_mask"]
    assert submission[1:] == [[name, "1 1"] for name in test]


def test_train_masks_csv_decodes_to_the_gif_masks(generated):
    rows = read_csv(generated / "train_masks.csv")
    assert rows[0] == ["img", "rle_mask"]
    assert [row[0] for row in rows[1:]] == sorted(
        path.name for path in (generated / "train").iterdir()
    )
    for name, rle in rows[1:]:
        mask = gif_mask(generated / "train_masks" / name.replace(".jpg", "_mask.gif"))
        assert set(np.unique(mask)) == {0, 1}
        # A car covers a real share of the picture but not all of it.
        assert 0.05 < mask.mean() < 0.8
        np.testing.assert_array_equal(rle_decode(rle, mask.shape), mask == 1)


def test_generated_car_pixels_differ_from_the_background(generated):
    name = sorted((generated / "train").iterdir())[4].name  # a side view
    photo = np.asarray(Image.open(generated / "train" / name), dtype=float)
    mask = gif_mask(generated / "train_masks" / name.replace(".jpg", "_mask.gif")) == 1
    # Every view of a car turns it, so the masks of one car differ from view to view.
    other = gif_mask(generated / "train_masks" / name.replace("_05.jpg", "_01_mask.gif"))
    assert (mask != (other == 1)).mean() > 0.05
    background_mean = photo[~mask].mean(axis=0)
    car_distance = np.abs(photo[mask] - background_mean).sum(axis=1)
    assert np.median(car_distance) > 30


def test_generator_is_deterministic_by_seed(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate_dataset(tmp_path / name, n_train_cars=1, n_test_cars=0, size=(32, 32), seed=seed)
    first, again, other = (
        (tmp_path / name / "train_masks.csv").read_text() for name in ("a", "b", "c")
    )
    assert first == again
    assert first.splitlines()[1][:12] != other.splitlines()[1][:12]
    photo = sorted((tmp_path / "a" / "train").iterdir())[0].name
    assert (tmp_path / "a" / "train" / photo).read_bytes() == (
        tmp_path / "b" / "train" / photo
    ).read_bytes()


def test_ensure_data_generates_only_into_a_folder_without_data(tmp_path):
    options = dict(n_train_cars=1, n_test_cars=0, size=(32, 32))
    assert ensure_data(tmp_path / "input", **options) is True
    assert ensure_data(tmp_path / "input", **options) is False
    assert len(list((tmp_path / "input" / "train").iterdir())) == 16
    (tmp_path / "zipped").mkdir()
    (tmp_path / "zipped" / "train.zip").write_bytes(b"")
    assert ensure_data(tmp_path / "zipped", **options) is False


def test_generate_refuses_a_folder_with_data(generated):
    with pytest.raises(UsageError, match="already holds Carvana data"):
        generate_dataset(generated, n_train_cars=1)


# The layout check


def test_check_layout_lists_ids_and_sizes(generated):
    layout = check_layout(generated)
    assert len(layout.train_ids) == 48 and len(layout.test_ids) == 16
    assert len(layout.car_ids) == 3
    assert layout.image_sizes == [SIZE]
    assert layout.train_ids[0].endswith("_01")


def test_check_layout_names_an_image_without_mask(input_dir):
    image_id = check_layout(input_dir).train_ids[5]
    (input_dir / "train_masks" / f"{image_id}_mask.gif").unlink()
    with pytest.raises(UsageError) as error:
        check_layout(input_dir)
    assert str(error.value).startswith(
        f"{input_dir}/train/{image_id}.jpg has no mask {input_dir}/train_masks/{image_id}_mask.gif:"
    )


def test_check_layout_names_a_mask_without_image(input_dir):
    image_ids = check_layout(input_dir).train_ids
    for image_id in image_ids[:3]:
        (input_dir / "train" / f"{image_id}.jpg").unlink()
    with pytest.raises(UsageError) as error:
        check_layout(input_dir)
    assert str(error.value).startswith(
        f"{input_dir}/train_masks/{image_ids[0]}_mask.gif has no image "
        f"{input_dir}/train/{image_ids[0]}.jpg (and 2 more masks without images):"
    )


def test_check_layout_says_when_there_are_no_masks_at_all(input_dir):
    shutil.rmtree(input_dir / "train_masks")
    with pytest.raises(
        UsageError, match=r"train has 48 images but .*train_masks has no masks: unzip"
    ):
        check_layout(input_dir)


def test_check_layout_names_a_corrupt_jpeg(input_dir):
    corrupt = input_dir / "train" / f"{check_layout(input_dir).train_ids[7]}.jpg"
    corrupt.write_bytes(b"this is not a JPEG")
    with pytest.raises(
        UsageError, match=f"^{re.escape(str(corrupt))} is not a readable JPEG image"
    ):
        check_layout(input_dir)


def test_check_layout_names_a_png_saved_as_jpg_once_as_a_jpeg_image(input_dir):
    photo = input_dir / "train" / f"{check_layout(input_dir).train_ids[4]}.jpg"
    Image.open(photo).save(photo, format="PNG")
    with pytest.raises(
        UsageError, match=f"^{re.escape(str(photo))} is a PNG file, not a JPEG image: replace"
    ):
        check_layout(input_dir)


def test_check_layout_names_an_unreadable_gif(input_dir):
    image_id = check_layout(input_dir).train_ids[9]
    unreadable = input_dir / "train_masks" / f"{image_id}_mask.gif"
    unreadable.write_bytes(b"GIF89a broken")
    with pytest.raises(UsageError, match=f"^{re.escape(str(unreadable))} is not a readable mask"):
        check_layout(input_dir)


def test_check_layout_names_a_mask_of_the_wrong_size(input_dir):
    image_id = check_layout(input_dir).train_ids[0]
    mask_path = input_dir / "train_masks" / f"{image_id}_mask.gif"
    Image.open(mask_path).resize((32, 20)).save(mask_path)
    with pytest.raises(
        UsageError, match=f"{re.escape(str(mask_path))} is 32x20 but its image .* is 64x40"
    ):
        check_layout(input_dir)


def test_check_layout_rejects_an_empty_test_folder(input_dir):
    for photo in (input_dir / "test").iterdir():
        photo.unlink()
    with pytest.raises(
        UsageError, match=f"^{re.escape(str(input_dir / 'test'))} has no .jpg images"
    ):
        check_layout(input_dir)
    assert check_layout(input_dir, require_test=False).test_ids == []


def test_check_layout_rejects_a_missing_folder(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        check_layout(tmp_path / "nowhere")


# Unpacking and fetching


def zip_folder(source: Path, zip_path: Path, folder_in_zip: str) -> None:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(source.iterdir()):
            archive.write(path, f"{folder_in_zip}/{path.name}")


def kaggle_zips(generated: Path, target: Path, hq: bool = False) -> None:
    """The generated set zipped as Kaggle ships it."""
    target.mkdir()
    quality = "_hq" if hq else ""
    zip_folder(generated / "train", target / f"train{quality}.zip", f"train{quality}")
    zip_folder(generated / "test", target / f"test{quality}.zip", f"test{quality}")
    zip_folder(generated / "train_masks", target / "train_masks.zip", "train_masks")
    for table in ("train_masks.csv", "metadata.csv", "sample_submission.csv"):
        with zipfile.ZipFile(target / f"{table}.zip", "w") as archive:
            archive.write(generated / table, table)


def test_unpack_turns_kaggle_zips_into_the_layout_and_is_idempotent(generated, tmp_path):
    kaggle_zips(generated, tmp_path / "input")
    unpacked = unpack(tmp_path / "input")
    assert sorted(unpacked) == sorted(kaggle_file_names())
    layout = check_layout(tmp_path / "input")
    assert layout.train_ids == check_layout(generated).train_ids
    assert (tmp_path / "input" / "metadata.csv").read_bytes() == (
        generated / "metadata.csv"
    ).read_bytes()
    assert unpack(tmp_path / "input") == []
    # A half-written file from an interrupted run is written again.
    (tmp_path / "input" / "train" / f"{layout.train_ids[0]}.jpg").write_bytes(b"partial")
    assert unpack(tmp_path / "input") == ["train.zip"]
    check_layout(tmp_path / "input", decode=True)


def test_prepare_input_generates_or_unpacks_and_says_which(generated, tmp_path):
    message = prepare_input(tmp_path / "new", generate=True, cars=1, test_cars=1, size=(32, 16))
    assert message == (
        f"no Carvana data in {tmp_path / 'new'}: generated a synthetic set there "
        f"(1 training and 1 test cars, 32x16 photos)"
    )
    assert len(check_layout(tmp_path / "new").train_ids) == 16
    assert prepare_input(tmp_path / "new", generate=True) is None  # ready as it is
    assert prepare_input(tmp_path / "empty", generate=False) is None  # not asked to generate
    assert not (tmp_path / "empty").exists()
    kaggle_zips(generated, tmp_path / "zipped")
    message = prepare_input(tmp_path / "zipped", generate=True)  # data there: no generating
    assert message.startswith("unpacked train.zip, ") and message.endswith(
        f" in {tmp_path / 'zipped'}"
    )
    assert check_layout(tmp_path / "zipped").train_ids == check_layout(generated).train_ids


def test_unpack_puts_the_hq_photos_in_train_and_test(generated, tmp_path):
    kaggle_zips(generated, tmp_path / "input", hq=True)
    assert "train_hq.zip" in unpack(tmp_path / "input")
    assert len(check_layout(tmp_path / "input").test_ids) == 16
    assert not (tmp_path / "input" / "train_hq").exists()


def test_unpack_names_a_corrupt_zip(tmp_path):
    (tmp_path / "train_masks.zip").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="train_masks.zip is not a readable zip file"):
        unpack(tmp_path)


def test_fetch_without_the_kaggle_package_says_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kaggle", None)  # makes "import kaggle" fail
    with pytest.raises(UsageError, match=r"kaggle package is missing; install it with pip install"):
        fetch_kaggle(tmp_path)


def fake_kaggle(monkeypatch) -> list[tuple[str, str, str]]:
    """Install a stand-in for the kaggle package; returns the downloads it is asked for."""
    calls: list[tuple[str, str, str]] = []

    class KaggleApi:
        def authenticate(self) -> None:
            pass

        def competition_download_file(self, competition, file_name, path=None, quiet=True):
            calls.append((competition, file_name, path))
            Path(path, file_name).write_bytes(b"zip")

    modules = {
        name: types.ModuleType(name)
        for name in ("kaggle", "kaggle.api", "kaggle.api.kaggle_api_extended")
    }
    modules["kaggle.api.kaggle_api_extended"].KaggleApi = KaggleApi
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_fetch_without_credentials_says_how_to_get_the_data(tmp_path, monkeypatch):
    fake_kaggle(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    for variable in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(UsageError, match="no Kaggle API token found; .*kaggle.json"):
        fetch_kaggle(tmp_path / "input")


def test_fetch_downloads_the_missing_competition_files(tmp_path, monkeypatch):
    calls = fake_kaggle(monkeypatch)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    (tmp_path / "input" / "test").mkdir(parents=True)
    (tmp_path / "input" / "test" / "abc_01.jpg").write_bytes(b"")
    (tmp_path / "input" / "metadata.csv").write_text("id\n")
    downloaded = fetch_kaggle(tmp_path / "input", hq=True)
    expected = [
        "train_hq.zip",
        "train_masks.zip",
        "train_masks.csv.zip",
        "sample_submission.csv.zip",
    ]
    assert [name for _, name, _ in calls] == expected
    assert {competition for competition, _, _ in calls} == {"carvana-image-masking-challenge"}
    assert downloaded == [tmp_path / "input" / name for name in expected]
    assert fetch_kaggle(tmp_path / "input", hq=True) == []


# Splitting by car


def image_ids(car_count: int) -> list[str]:
    return [f"{car:012x}_{view:02d}" for car in range(car_count) for view in range(1, 17)]


def test_split_puts_every_car_on_one_side_only():
    ids = image_ids(20)
    train_ids, valid_ids = split_by_car(ids, valid_size=0.2, seed=3)
    train_cars = {image_id[:12] for image_id in train_ids}
    valid_cars = {image_id[:12] for image_id in valid_ids}
    assert not train_cars & valid_cars
    assert (len(train_cars), len(valid_cars)) == (16, 4)
    assert sorted(train_ids + valid_ids) == ids


def test_split_is_seeded():
    ids = image_ids(20)
    assert split_by_car(ids, 0.2, seed=1) == split_by_car(list(reversed(ids)), 0.2, seed=1)
    assert split_by_car(ids, 0.2, seed=1) != split_by_car(ids, 0.2, seed=2)


def test_split_counts_images_in_whole_cars():
    ids = image_ids(20)
    train_ids, valid_ids = split_by_car(ids, valid_size=40, seed=0)
    assert len(valid_ids) == 32  # two cars of 16 fit in 40 images, a third does not
    train_ids, valid_ids = split_by_car(ids, valid_size=5, seed=0)
    assert len(valid_ids) == 16  # at least one car
    train_ids, valid_ids = split_by_car(ids, valid_size=0.25, sample_size=100, seed=0)
    assert (len(train_ids), len(valid_ids)) == (64, 32)  # 6 whole cars of the sample
    assert split_by_car(ids, valid_size=0, seed=0) == (ids, [])
    assert len(split_by_car(image_ids(3), valid_size=0.1, seed=0)[1]) == 16  # one car at least


def test_split_rejects_a_valid_size_that_leaves_no_training_car():
    with pytest.raises(UsageError, match="valid_size 32 leaves no car for training out of 2"):
        split_by_car(image_ids(2), valid_size=32)
    with pytest.raises(UsageError, match=r"valid_size 1.5 must be a fraction in \[0, 1\)"):
        split_by_car(image_ids(2), valid_size=1.5)


# The dataset


def test_validation_photos_are_ordered_so_the_first_show_different_cars_and_sides():
    ids = [f"car{car}_{view:02d}" for car in "abcd" for view in range(1, 17)]
    ordered = varied_order(ids)
    assert sorted(ordered) == ids
    assert ordered[:4] == ["cara_01", "carb_06", "carc_11", "card_16"]


def test_the_recipes_split_reads_valid_size_as_a_fraction_or_a_number_of_images():
    ids = image_ids(5)
    train_ids, valid_ids = train_valid_ids(ids, 0.4, seed=0)  # 2 of the 5 cars
    assert (train_ids, sorted(valid_ids)) == split_by_car(ids, 0.4, seed=0)
    assert valid_ids == varied_order(valid_ids) != sorted(valid_ids)  # pictured first
    train_ids, valid_ids = train_valid_ids(ids, 16.0, seed=0)  # 16 images: one car
    assert (train_ids, sorted(valid_ids)) == split_by_car(ids, 16, seed=0)
    assert (len(train_ids), len(valid_ids)) == (64, 16)


def write_sample(
    input_dir: Path, image: np.ndarray, mask: np.ndarray, image_id: str = "abc_01"
) -> None:
    """One training photo and mask; 4:4:4 JPEG so that colour edges stay sharp."""
    for folder in ("train", "train_masks"):
        (input_dir / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(input_dir / "train" / f"{image_id}.jpg", quality=98, subsampling=0)
    mask_image = Image.fromarray(mask.astype(np.uint8))
    mask_image.putpalette([0, 0, 0, 255, 255, 255])
    mask_image.save(input_dir / "train_masks" / f"{image_id}_mask.gif")


def red_region_sample(width: int = 96, height: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A red L-shape on black, in the top left corner: any flip or shift shows."""
    mask = np.zeros((height, width), dtype=bool)
    mask[6:30, 8:40] = True
    mask[6:42, 8:18] = True
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[mask] = (210, 25, 25)
    return image, mask


def test_resize_to_a_non_square_size_keeps_width_and_height(tmp_path):
    image, mask = red_region_sample(width=96, height=48)
    write_sample(tmp_path, image, mask)
    dataset = CarvanaDataset(tmp_path, ["abc_01"], size=(48, 24))
    resized_image, resized_mask = dataset[0]
    assert resized_image.shape == (3, 24, 48) and resized_image.dtype == torch.float32
    assert resized_mask.shape == (1, 24, 48) and resized_mask.dtype == torch.float32
    assert set(resized_mask.unique().tolist()) == {0.0, 1.0}
    expected = torch.from_numpy(mask[::2, ::2]).float()
    assert (resized_mask[0] == expected).float().mean() > 0.97
    assert 0.0 <= resized_image.min() and resized_image.max() <= 1.0


def test_augmentation_moves_image_and_mask_together(tmp_path):
    image, mask = red_region_sample()
    write_sample(tmp_path, image, mask)
    dataset = CarvanaDataset(tmp_path, ["abc_01"], augment=True)
    plain_mask = torch.from_numpy(mask).float()
    changed = 0
    for seed in range(12):
        torch.manual_seed(seed)
        augmented_image, augmented_mask = dataset[0]
        red = augmented_image[0] - torch.maximum(augmented_image[1], augmented_image[2]) > 0.3
        car = augmented_mask[0].bool()
        overlap = ((red & car).sum() / (red | car).sum()).item()
        assert overlap > 0.95, f"seed {seed}: red region and mask overlap only {overlap:.1%}"
        assert augmented_mask.sum() > 0.5 * mask.sum()
        changed += (augmented_mask[0] != plain_mask).float().mean().item() > 0.05
    assert changed >= 6  # the augmentation did move things, most of the time


def test_shared_grid_affine_matches_torchvision_random_affine():
    photo = tv_tensors.Image(torch.rand(3, 37, 52))
    mask = tv_tensors.Mask((photo[:1] > 0.5).float())
    options = dict(degrees=5.0, translate=(0.04, 0.04), scale=(0.95, 1.05))
    reference, shared = v2.RandomAffine(**options), SharedGridAffine(**options)
    for seed in range(5):
        torch.manual_seed(seed)
        expected_photo, expected_mask = reference(photo, mask)
        torch.manual_seed(seed)
        shared_photo, shared_mask = shared(photo, mask)
        assert isinstance(shared_photo, tv_tensors.Image) and isinstance(
            shared_mask, tv_tensors.Mask
        )
        # Only pixels sampled exactly half-way between two neighbours may round differently.
        assert (shared_photo != expected_photo).float().mean() < 0.002
        assert (shared_mask != expected_mask).float().mean() < 0.002
        torch.testing.assert_close(shared_mask, (shared_photo[:1] > 0.5).float())


def test_uint8_items_are_the_float_items_times_255(generated):
    ids = check_layout(generated).train_ids[:3]
    as_float = CarvanaDataset(generated, ids, size=(48, 32))
    as_uint8 = CarvanaDataset(generated, ids, size=(48, 32), dtype=torch.uint8)
    for index in range(3):
        (float_image, float_mask), (uint8_image, uint8_mask) = as_float[index], as_uint8[index]
        assert uint8_image.dtype == uint8_mask.dtype == torch.uint8
        torch.testing.assert_close(uint8_image.float() / 255, float_image)
        torch.testing.assert_close(uint8_mask.float(), float_mask)
    torch.manual_seed(0)
    image, mask = CarvanaDataset(generated, ids, augment=True, dtype=torch.uint8)[0]
    assert image.dtype == torch.uint8 and image.float().mean() > 50
    assert set(mask.unique().tolist()) == {0, 1}


def test_test_split_gives_index_name_and_original_size(generated):
    dataset = CarvanaDataset(generated, split="test", size=(32, 16))
    image, index = dataset[3]
    assert image.shape == (3, 16, 32) and index == 3
    assert dataset.names[3].endswith("_04.jpg")
    assert dataset.original_size(3) == SIZE


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: b"\xff\xd8\xff broken", "Unsupported marker"),
        (lambda data: data[: len(data) // 2], "incomplete or truncated"),
    ],
    ids=["garbage", "truncated download"],
)
def test_dataset_names_a_corrupt_jpeg(input_dir, damage, reason):
    dataset = CarvanaDataset(input_dir, check_layout(input_dir).train_ids)
    path = dataset.image_path(2)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UsageError) as error:
        dataset[2]
    message = str(error.value)
    assert message.startswith(f"{path} is not a readable JPEG image (") and reason in message
    assert message.endswith("): replace it with the original from the Kaggle zip file")


def test_dataset_names_an_unreadable_gif(input_dir):
    dataset = CarvanaDataset(input_dir, check_layout(input_dir).train_ids)
    dataset.mask_path(1).write_bytes(b"nonsense")
    with pytest.raises(
        UsageError, match=f"^{re.escape(str(dataset.mask_path(1)))} is not a readable mask"
    ):
        dataset[1]


def test_dataset_rejects_an_empty_test_folder(input_dir):
    shutil.rmtree(input_dir / "test")
    (input_dir / "test").mkdir()
    with pytest.raises(UsageError, match="test has no .jpg images to load"):
        CarvanaDataset(input_dir, split="test")


def test_mask_grey_values_count_as_foreground(tmp_path):
    image, mask = red_region_sample()
    write_sample(tmp_path, image, mask)
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "train_masks" / "abc_01_mask.gif")
    _, loaded = CarvanaDataset(tmp_path, ["abc_01"])[0]
    np.testing.assert_array_equal(loaded[0].numpy(), mask.astype(np.float32))


def test_loader_batches_images_and_masks_with_workers(generated):
    dataset = CarvanaDataset(
        generated, check_layout(generated).train_ids[:8], size=(32, 16), augment=True
    )
    images, masks = next(iter(make_loader(dataset, batch_size=4, shuffle=True, workers=2)))
    assert images.shape == (4, 3, 16, 32)
    assert masks.shape == (4, 1, 16, 32)


def test_training_loaders_give_uint8_batches_shuffled_for_training_only(generated):
    ids = check_layout(generated).train_ids
    train_data, valid_data = training_loaders(
        generated, ids[:16], ids[16:24], (32, 16), batch_size=8, augment=False
    )
    images, masks = next(iter(train_data))
    assert (images.dtype, masks.dtype) == (torch.uint8, torch.uint8)
    assert images.shape == (8, 3, 16, 32) and masks.shape == (8, 1, 16, 32)
    in_order = CarvanaDataset(generated, ids[:16], (32, 16), dtype=torch.uint8)
    assert not torch.equal(images, torch.stack([in_order[i][0] for i in range(8)]))
    valid_images, _ = next(iter(valid_data))
    valid_set = CarvanaDataset(generated, ids[16:24], (32, 16), dtype=torch.uint8)
    assert torch.equal(valid_images, torch.stack([valid_set[i][0] for i in range(8)]))
    assert training_loaders(generated, ids, [], (32, 16), batch_size=8)[1] is None


def test_check_size_names_the_nearest_valid_sizes():
    check_size((256, 176), depth=4)
    with pytest.raises(UsageError) as error:
        check_size((250, 170), depth=4)
    assert (
        str(error.value) == "image size 250x170 is not divisible by 2^4=16: use 256x176 or 240x160"
    )
    with pytest.raises(UsageError, match="use 16x16$"):
        check_size((10, 12), depth=4)


def test_check_size_of_zero_or_negative_sides_suggests_a_positive_size():
    with pytest.raises(UsageError) as error:
        check_size((0, 0), depth=4)
    assert str(error.value) == (
        "image size 0x0: each side must be a positive multiple of 2^4=16: use 16x16 or larger"
    )
    with pytest.raises(UsageError, match="use 48x16 or larger$"):
        check_size((40, -3), depth=4)


def test_float_images_turns_uint8_batches_into_the_float32_dataset_values(generated):
    import functools

    from trainloop import Learner
    from trainloop.tasks.carvana.dataset import FloatImages

    ids = check_layout(generated).train_ids[:4]
    as_float = CarvanaDataset(generated, ids, size=(96, 64))
    as_uint8 = CarvanaDataset(generated, ids, size=(96, 64), dtype=torch.uint8)
    learner = Learner(
        torch.nn.Conv2d(3, 1, 1),
        [],
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        plugins=[FloatImages()],
    )
    image8, mask8 = (torch.stack(items) for items in zip(*(as_uint8[i] for i in range(4))))
    image, mask = learner.hook.transfer_batch(learner=learner, batch=(image8, mask8))
    expected_image, expected_mask = (
        torch.stack(items) for items in zip(*(as_float[i] for i in range(4)))
    )
    assert image.dtype == mask.dtype == torch.float32
    assert torch.allclose(image, expected_image, atol=2 / 255)  # uint8 rounding in the resize
    assert (mask != expected_mask).float().mean() < 0.01
    test_batch = (image8, torch.arange(4))
    _, indices = learner.hook.transfer_batch(learner=learner, batch=test_batch)
    assert torch.equal(indices, torch.arange(4))  # a test batch's indices stay as they are
