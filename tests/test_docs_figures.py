"""The docs' pictures are what their code draws today, from the runs the pages execute.

Each test runs the code that drew a committed picture (``docs/_ext/figures.py``, or
TensorBoard in headless Chromium) on the same inputs and compares the result with the
PNG under ``docs/``. After a change meant to change a picture, rewrite them with
``TRAINLOOP_UPDATE_FIGURES=1 python -m pytest tests/test_docs_figures.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_learn_pages import page_run  # noqa: F401  (the fixture: each page runs once)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
UPDATE = os.environ.get("TRAINLOOP_UPDATE_FIGURES") == "1"


def load_figures():
    spec = importlib.util.spec_from_file_location("figures", DOCS / "_ext" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = load_figures()


def assert_same_picture(
    drawn: Image.Image, committed: Path, mean: float = 4.0, share: float = 0.05
) -> None:
    """``drawn`` is the committed picture, give or take font rendering: same size, and
    most pixels (all but ``share`` of them) within 40 of each other."""
    if UPDATE:
        drawn.convert("RGB").save(committed)
    assert committed.is_file(), f"{committed} is missing: TRAINLOOP_UPDATE_FIGURES=1 draws it"
    picture = Image.open(committed).convert("RGB")
    assert picture.size == drawn.size, f"{committed.name}: {picture.size} != {drawn.size}"
    difference = np.abs(np.asarray(picture, float) - np.asarray(drawn.convert("RGB"), float))
    assert difference.mean() < mean, f"{committed.name}: mean difference {difference.mean():.2f}"
    assert (difference.max(axis=2) > 40).mean() < share, committed.name


def assert_shown(page: Path, picture: str) -> None:
    assert f"]({picture})" in page.read_text(), f"{page.name} does not show {picture}"


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- pictures drawn from the Learn pages' runs --------------------------------------------


def test_the_unet_page_loss_curves_are_those_of_its_run(page_run):  # noqa: F811
    result = page_run("unet")
    drawn = figures.loss_curves(
        history(result.workdir / "runs" / "carvana-quick"),
        "valid_dice",
        "U-Net on the tiny synthetic Carvana set (runs/carvana-quick)",
    )
    assert_same_picture(drawn, DOCS / "learn" / "carvana_quick_curves.png")
    assert_shown(DOCS / "learn" / "unet.md", "carvana_quick_curves.png")


def test_the_mnist_page_loss_curves_are_those_of_its_run(page_run):  # noqa: F811
    result = page_run("mnist")
    drawn = figures.loss_curves(
        history(result.workdir / "runs" / "mnist"),
        "valid_accuracy",
        "784-200-200-10 on the stand-in digits (runs/mnist)",
    )
    assert_same_picture(drawn, DOCS / "learn" / "mnist_curves.png")
    assert_shown(DOCS / "learn" / "mnist.md", "mnist_curves.png")


# --- pictures drawn from code and fixed numbers ---------------------------------------------


def test_the_unet_diagram_has_the_shapes_of_the_recipes_default_unet():
    from trainloop.recipe import load_recipe
    from trainloop.tasks.carvana.unet import UNet

    config = load_recipe(ROOT / "recipes" / "unet_carvana.py").Config()
    model = UNet(base_width=config.base_width, depth=config.depth)
    drawn = figures.unet_diagram(model, tuple(config.image_size))
    assert_same_picture(drawn, DOCS / "learn" / "unet_diagram.png")
    assert_shown(DOCS / "learn" / "unet.md", "unet_diagram.png")


def test_the_convolution_and_pooling_picture_shows_pytorchs_numbers():
    drawn, feature_map, pooled = figures.convolution_and_pooling()
    assert feature_map.shape == (4, 4) and pooled.shape == (2, 2)
    assert pooled[0, 0] == feature_map[:2, :2].max()
    assert_same_picture(drawn, DOCS / "learn" / "conv_pool.png")
    assert_shown(DOCS / "learn" / "unet.md", "conv_pool.png")


def test_the_carvana_samples_have_their_columns_labelled():
    raw = Image.open(DOCS / "learn" / "carvana_samples.png")
    drawn = figures.labelled_columns(raw, ["photo", "truth (green)", "prediction (magenta)"])
    assert drawn.size == (raw.width, raw.height + 26)
    assert_same_picture(drawn, DOCS / "learn" / "carvana_samples_labelled.png")
    assert_shown(DOCS / "learn" / "unet.md", "carvana_samples_labelled.png")


# --- TensorBoard, in a real browser ------------------------------------------------------------


def chromium() -> str | None:
    return next(
        (
            path
            for name in ("chromium", "chromium-browser", "google-chrome")
            if (path := shutil.which(name))
        ),
        None,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def tensorboard_url(page_run, tmp_path):  # noqa: F811
    """TensorBoard on 127.0.0.1, showing the run of the U-Net page (8 epochs, images)."""
    if chromium() is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium); .ci/run installs it")
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (the dev extra installs it)")
    result = page_run("unet")
    (tmp_path / "runs").mkdir()  # as `tensorboard --logdir runs` shows it, wherever it ran
    (tmp_path / "runs" / "carvana-quick").symlink_to(result.workdir / "runs" / "carvana-quick")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", "runs",
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "0"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/data/runs", timeout=2) as response:
                    if json.load(response):  # the run is loaded
                        break
            except OSError:
                pass
            assert server.poll() is None, "tensorboard exited at start"
            assert time.monotonic() < deadline, "tensorboard did not answer within 60 s"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def screenshot(url: str, path: Path) -> Image.Image:
    subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader", "--hide-scrollbars",
         "--window-size=1280,800", "--virtual-time-budget=15000", f"--screenshot={path}", url],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    return Image.open(path).convert("RGB")


def colour_share(picture: Image.Image, colour: tuple[int, int, int], tolerance: int = 30) -> float:
    pixels = np.asarray(picture, int)
    return float((np.abs(pixels - np.array(colour)).max(axis=2) <= tolerance).mean())


def test_tensorboard_shows_the_runs_curves_and_pictures(tensorboard_url, tmp_path):
    scalars = screenshot(f"{tensorboard_url}/#scalars", tmp_path / "scalars.png")
    images = screenshot(f"{tensorboard_url}/#images", tmp_path / "images.png")
    for picture in (scalars, images):
        assert picture.size == (1280, 800)
        assert colour_share(picture.crop((0, 0, 1280, 60)), (245, 124, 0)) > 0.5  # its header
    # the curves: TensorBoard's orange lines in the charts' area
    assert colour_share(scalars.crop((330, 170, 1280, 800)), (255, 112, 67), 40) > 0.0007
    # the samples picture: the true masks tinted green, the predicted ones magenta
    pixels = np.asarray(images, int)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((green > red + 40) & (green > blue + 40)).mean() > 0.005
    assert ((red > green + 60) & (blue > green + 60)).mean() > 0.005
    assert_same_picture(scalars, DOCS / "plugins" / "tensorboard_scalars.png", mean=12, share=0.15)
    assert_same_picture(images, DOCS / "plugins" / "tensorboard_images.png", mean=12, share=0.15)
    for picture in ("tensorboard_scalars.png", "tensorboard_images.png"):
        assert_shown(DOCS / "plugins" / "tensorboard.md", picture)


# --- the default Carvana run, recorded -------------------------------------------------------

DEFAULT_RUN = DOCS / "learn" / "carvana_default_run.jsonl"  # its metrics.jsonl, as it wrote it


def test_the_default_carvana_runs_curves_are_its_recorded_metrics():
    drawn = figures.loss_curves(
        _recorded(),
        "valid_dice",
        "The default Carvana run: 20 epochs at 144x96 on the synthetic set",
    )
    assert_same_picture(drawn, DOCS / "learn" / "carvana_default_curves.png")
    assert_shown(DOCS / "learn" / "unet.md", "carvana_default_curves.png")


def _recorded() -> list[dict]:
    return [json.loads(line) for line in DEFAULT_RUN.read_text().splitlines()]


def test_the_carvana_page_prints_the_recorded_runs_numbers():
    # The default run takes minutes, so the page shows its recorded output (not run by
    # the tests): each epoch's line must be that epoch of the recorded metrics.
    text = (DOCS / "carvana.md").read_text()
    block = text.split("generated a synthetic set there (20 training", 1)[1].split("```", 1)[0]
    lines = [line.split() for line in block.splitlines() if line.split()]
    (header,) = [line for line in lines if line[0] == "epoch"]
    rows = [line for line in lines if line[0].isdigit()]
    recorded = _recorded()
    assert [int(row[0]) for row in rows] == [entry["epoch"] + 1 for entry in recorded]
    columns = [name for name in header[1:] if name != "time"]
    for row, entry in zip(rows, recorded):
        shown = [float(value) for value in row[1 : len(columns) + 1]]
        wanted = [entry[name] for name in columns]
        assert shown == pytest.approx(wanted, rel=1e-5), row
