"""The Carvana data on disk: fetch it from Kaggle, unpack the zip files, check the layout.

The Kaggle layout, relative to an input folder::

    train/<carid>_<NN>.jpg             training photos, 16 views (NN = 01..16) per car
    train_masks/<carid>_<NN>_mask.gif  one mask per training photo (0 background, 1 car)
    test/<carid>_<NN>.jpg              photos to predict
    train_masks.csv                    img,rle_mask (the training masks, run-length encoded)
    metadata.csv                       id,year,make,model,trim1,trim2 (one row per car)
    sample_submission.csv              img,rle_mask (every test photo)

Kaggle ships the folders as ``train.zip``, ``train_masks.zip`` and ``test.zip`` (or the
higher-quality JPEGs ``train_hq.zip`` and ``test_hq.zip``, same 1918x1280 size) and the
tables as ``<name>.csv.zip``.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from trainloop.errors import UsageError

__all__ = [
    "COMPETITION",
    "Layout",
    "car_id_of",
    "check_layout",
    "fetch_kaggle",
    "has_carvana_files",
    "kaggle_file_names",
    "unpack",
]

COMPETITION = "carvana-image-masking-challenge"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"

IMAGE_ID_PATTERN = re.compile(r"^(?P<car>.+)_(?P<view>\d{2})$")

# Each zip file Kaggle ships and the folder its contents belong in ("" is the input folder).
ZIP_DESTINATIONS = {
    "train.zip": "train",
    "train_hq.zip": "train",
    "test.zip": "test",
    "test_hq.zip": "test",
    "train_masks.zip": "train_masks",
    "train_masks.csv.zip": "",
    "metadata.csv.zip": "",
    "sample_submission.csv.zip": "",
}


def car_id_of(image_id: str) -> str:
    """The car of an image id: ``"00087a6bd4dc_01"`` -> ``"00087a6bd4dc"``."""
    return image_id.rsplit("_", 1)[0]


def kaggle_file_names(hq: bool = False, include_test: bool = True) -> list[str]:
    """The names of the competition files to download (see ``fetch_kaggle``)."""
    quality = "_hq" if hq else ""
    names = [f"train{quality}.zip", "train_masks.zip"]
    if include_test:
        names.append(f"test{quality}.zip")
    names += ["train_masks.csv.zip", "metadata.csv.zip", "sample_submission.csv.zip"]
    return names


def _kaggle_credentials_found() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    folders = [Path("~/.kaggle").expanduser(), Path("~/.config/kaggle").expanduser()]
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        folders.insert(0, Path(os.environ["KAGGLE_CONFIG_DIR"]))
    return any(
        (folder / name).is_file() for folder in folders for name in ("kaggle.json", "access_token")
    )


def _is_present(input_dir: Path, zip_name: str) -> bool:
    """Whether a competition file is already there, zipped or unpacked."""
    if (input_dir / zip_name).exists():
        return True
    destination = ZIP_DESTINATIONS[zip_name]
    if destination:
        folder = input_dir / destination
        return folder.is_dir() and any(folder.iterdir())
    return (input_dir / zip_name.removesuffix(".zip")).exists()


def fetch_kaggle(
    input_dir: str | os.PathLike, hq: bool = False, include_test: bool = True
) -> list[Path]:
    """Download the Carvana competition files into ``input_dir`` with the Kaggle API.

    Needs the ``kaggle`` package (``pip install 'trainloop[kaggle]'``), an API token
    (``~/.kaggle/kaggle.json`` or ``KAGGLE_USERNAME``/``KAGGLE_KEY``) and the competition
    rules accepted on the Kaggle website. Files already there, zipped or unpacked, are not
    downloaded again. ``hq=True`` takes the higher-quality JPEGs; ``include_test=False``
    leaves out the 100,064 test photos. Returns the paths of the files it downloaded; run
    ``unpack`` next.
    """
    input_dir = Path(input_dir)
    how_to = (
        f"install it with pip install 'trainloop[kaggle]', put your API token in "
        f"~/.kaggle/kaggle.json and accept the rules at {RULES_URL}, or download the "
        f"files by hand into {input_dir}"
    )
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise UsageError(
            f"cannot download the Carvana data: the kaggle package is missing; {how_to}"
        ) from None
    except (Exception, SystemExit) as error:
        # Some kaggle versions authenticate on import and raise, or exit, without a token.
        raise UsageError(
            f"cannot download the Carvana data: kaggle says {error}; {how_to}"
        ) from None
    if not _kaggle_credentials_found():
        raise UsageError(f"cannot download the Carvana data: no Kaggle API token found; {how_to}")
    api = KaggleApi()
    try:
        api.authenticate()
    except (Exception, SystemExit) as error:
        raise UsageError(f"Kaggle refused the API token ({error}); {how_to}") from None
    input_dir.mkdir(parents=True, exist_ok=True)
    downloaded = []
    for name in kaggle_file_names(hq, include_test):
        if _is_present(input_dir, name):
            continue
        try:
            api.competition_download_file(COMPETITION, name, path=str(input_dir), quiet=False)
        except Exception as error:
            raise UsageError(
                f"Kaggle did not send {name} ({error}): accept the competition rules at "
                f"{RULES_URL} and run again"
            ) from None
        downloaded.append(input_dir / name)
    return downloaded


def _member_target(zip_path: Path, member: str, destination: Path) -> Path | None:
    """Where one zip member goes, or None for folders and macOS metadata."""
    if member.endswith("/") or member.startswith("__MACOSX/"):
        return None
    parts = Path(member).parts
    if Path(member).is_absolute() or ".." in parts:
        raise UsageError(f"{zip_path} holds an unsafe path {member!r}: download it again")
    # train.zip holds train/<id>.jpg; train_hq.zip holds train_hq/<id>.jpg: both go in train/.
    folder_name = zip_path.name.removesuffix(".zip")
    if len(parts) > 1 and parts[0] in (folder_name, destination.name):
        parts = parts[1:]
    return destination.joinpath(*parts)


def unpack(input_dir: str | os.PathLike) -> list[str]:
    """Unzip whichever Kaggle zip files are in ``input_dir`` into the Kaggle layout.

    Safe to run again: a file already unpacked with the right size is skipped, so an
    interrupted run resumes. Returns the names of the zip files it wrote files from.
    """
    input_dir = Path(input_dir)
    for folder in ("train", "test"):
        if (input_dir / f"{folder}.zip").exists() and (input_dir / f"{folder}_hq.zip").exists():
            raise UsageError(
                f"{input_dir} holds both {folder}.zip and {folder}_hq.zip, which unpack into "
                f"the same {folder}/ folder: delete one of them"
            )
    unpacked = []
    for zip_name, destination_name in ZIP_DESTINATIONS.items():
        zip_path = input_dir / zip_name
        if not zip_path.exists():
            continue
        destination = input_dir / destination_name
        written = 0
        try:
            with zipfile.ZipFile(zip_path) as archive:
                for info in archive.infolist():
                    target = _member_target(zip_path, info.filename, destination)
                    if target is None:
                        continue
                    if target.exists() and target.stat().st_size == info.file_size:
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    # Written aside and renamed, so a failed read leaves no full-size stub.
                    partial = target.with_name(target.name + ".part")
                    with archive.open(info) as source, open(partial, "wb") as sink:
                        shutil.copyfileobj(source, sink)
                    os.replace(partial, target)
                    written += 1
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
            raise UsageError(
                f"{zip_path} is not a readable zip file ({error}): delete it and download it again"
            ) from None
        if written:
            unpacked.append(zip_name)
    return unpacked


@dataclass(frozen=True)
class Layout:
    """What ``check_layout`` found in a Carvana input folder.

    ``train_ids`` and ``test_ids`` are image ids without extension (``"00087a6bd4dc_01"``),
    sorted; ``image_sizes`` lists the distinct ``(width, height)`` of the photos, sorted.
    """

    input_dir: Path
    train_ids: list[str]
    test_ids: list[str]
    image_sizes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def car_ids(self) -> list[str]:
        """The distinct cars of the training photos, sorted."""
        return sorted({car_id_of(image_id) for image_id in self.train_ids})


def _files_with_suffix(folder: Path, suffix: str) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(
            entry.name
            for entry in entries
            if entry.name.endswith(suffix) and not entry.name.startswith(".") and entry.is_file()
        )


def _image_ids(folder: Path) -> list[str]:
    ids = []
    for name in _files_with_suffix(folder, ".jpg"):
        image_id = name.removesuffix(".jpg")
        if not IMAGE_ID_PATTERN.match(image_id):
            raise UsageError(
                f"{folder / name} is not named <carid>_<NN>.jpg like the Kaggle photos: "
                f"rename or remove it"
            )
        ids.append(image_id)
    return ids


def _image_size(
    path: Path, kind: str, expected_format: str | None, decode: bool
) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            if expected_format and image.format != expected_format:
                raise UsageError(
                    f"{path} is a {image.format} file, not a {kind}: "
                    f"replace it with the original from the Kaggle zip file"
                )
            if decode:
                image.load()
            return image.size
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(
            f"{path} is not a readable {kind} ({error}): replace it with the original from "
            f"the Kaggle zip file or delete it"
        ) from None


def _count_more(count: int, what: str) -> str:
    return f" (and {count} more {what})" if count else ""


def check_layout(
    input_dir: str | os.PathLike, require_test: bool = True, decode: bool = False
) -> Layout:
    """Check that ``input_dir`` holds the Carvana data in the Kaggle layout.

    Every training photo ``train/<id>.jpg`` must have its mask ``train_masks/<id>_mask.gif``
    of the same size, every mask its photo, and every file must be readable (the header is
    read; ``decode=True`` decodes every file in full, which takes minutes on the real
    data). With ``require_test`` the ``test/`` folder must hold photos too. Raises
    ``UsageError`` naming the first thing wrong.
    """
    input_dir = Path(input_dir)
    get_data = (
        "unzip train.zip there (trainloop.tasks.carvana.files.unpack) or generate a synthetic set"
    )
    if not input_dir.is_dir():
        raise UsageError(
            f"{input_dir} does not exist: download the Carvana data there or {get_data}"
        )
    train_dir = input_dir / "train"
    masks_dir = input_dir / "train_masks"
    test_dir = input_dir / "test"
    if not train_dir.is_dir():
        raise UsageError(f"{train_dir} does not exist: {get_data}")
    train_ids = _image_ids(train_dir)
    if not train_ids:
        raise UsageError(f"{train_dir} has no .jpg images: {get_data}")
    mask_names = _files_with_suffix(masks_dir, ".gif") if masks_dir.is_dir() else []
    if not mask_names:
        raise UsageError(
            f"{train_dir} has {len(train_ids)} images but {masks_dir} has no masks: "
            f"unzip train_masks.zip into {input_dir} (trainloop.tasks.carvana.files.unpack)"
        )
    mask_ids = []
    for name in mask_names:
        if not name.endswith("_mask.gif") or not IMAGE_ID_PATTERN.match(name[: -len("_mask.gif")]):
            raise UsageError(
                f"{masks_dir / name} is not named <carid>_<NN>_mask.gif like the Kaggle masks: "
                f"rename or remove it"
            )
        mask_ids.append(name[: -len("_mask.gif")])
    train_set, mask_set = set(train_ids), set(mask_ids)
    orphans = sorted(mask_set - train_set)
    if orphans:
        raise UsageError(
            f"{masks_dir / (orphans[0] + '_mask.gif')} has no image {train_dir / (orphans[0] + '.jpg')}"
            f"{_count_more(len(orphans) - 1, 'masks without images')}: "
            f"unzip the whole train.zip or remove the mask"
        )
    unmasked = sorted(train_set - mask_set)
    if unmasked:
        raise UsageError(
            f"{train_dir / (unmasked[0] + '.jpg')} has no mask {masks_dir / (unmasked[0] + '_mask.gif')}"
            f"{_count_more(len(unmasked) - 1, 'images without masks')}: "
            f"unzip the whole train_masks.zip or remove the image"
        )
    sizes = set()
    for image_id in train_ids:
        image_path = train_dir / f"{image_id}.jpg"
        mask_path = masks_dir / f"{image_id}_mask.gif"
        image_size = _image_size(image_path, "JPEG image", "JPEG", decode)
        mask_size = _image_size(mask_path, "mask", None, decode)
        if image_size != mask_size:
            raise UsageError(
                f"{mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
                f"{image_size[0]}x{image_size[1]}: replace them with the originals from the "
                f"Kaggle zip files"
            )
        sizes.add(image_size)
    test_ids: list[str] = []
    if test_dir.is_dir():
        test_ids = _image_ids(test_dir)
    if require_test and not test_ids:
        raise UsageError(
            f"{test_dir} has no .jpg images: unzip test.zip into {input_dir} "
            f"(trainloop.tasks.carvana.files.unpack)"
        )
    for image_id in test_ids:
        sizes.add(_image_size(test_dir / f"{image_id}.jpg", "JPEG image", "JPEG", decode))
    return Layout(input_dir, train_ids, test_ids, sorted(sizes))


def has_carvana_files(input_dir: str | os.PathLike) -> bool:
    """Whether ``input_dir`` holds any Carvana data: a Kaggle zip file or photos in train/."""
    input_dir = Path(input_dir)
    if any((input_dir / name).exists() for name in ZIP_DESTINATIONS):
        return True
    train_dir = input_dir / "train"
    return train_dir.is_dir() and any(name.endswith(".jpg") for name in os.listdir(train_dir))
