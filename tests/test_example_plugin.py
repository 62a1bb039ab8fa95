"""The third-party plugin story, end to end, with the example package in the docs.

``docs/examples/trainloop-csvlogger`` is installed offline with pip into a temporary
folder, and ``trainloop`` runs in subprocesses that see it on ``PYTHONPATH``: exactly
what a user gets after ``pip install trainloop-csvlogger``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "docs" / "examples" / "trainloop-csvlogger"


def trainloop(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainloop", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a user who installed trainloop-csvlogger."""
    work = tmp_path_factory.mktemp("csvlogger")
    source = work / "source"  # build from a copy: pip builds in place and leaves build/
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.pop("TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD", None)
    env["PYTHONPATH"] = str(target)
    return env


def plugin_rows(listing: str) -> dict[str, str]:
    """``trainloop plugins`` table rows as {name: the rest of the row}."""
    rows = {}
    for line in listing.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if len(cells) >= 2 and cells[0]:
            rows[cells[0]] = " ".join(cells[1:])
    return rows


def test_trainloop_plugins_lists_csvlogger_from_its_entry_point(plugin_env):
    listing = trainloop("plugins", env=plugin_env)
    assert listing.returncode == 0, listing.stderr
    rows = plugin_rows(listing.stdout)
    assert "csvlogger" in rows
    assert "entry point (trainloop-csvlogger 0.1.0)" in rows["csvlogger"]
    assert "add_options" in rows["csvlogger"] and "configure" in rows["csvlogger"]


def test_a_run_writes_one_csv_row_per_epoch_matching_metrics_jsonl(plugin_env, tmp_path):
    out = tmp_path / "run"
    result = trainloop(
        "run", "recipes/single_node.py", "--epochs", "2", "--out", str(out), env=plugin_env
    )
    assert result.returncode == 0, result.stderr
    with open(out / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(records) == 2
    assert list(rows[0]) == list(records[0])  # epoch, train_loss, output, error
    for row, record in zip(rows, records):
        assert {key: float(value) for key, value in row.items()} == pytest.approx(record, rel=0)


def test_p_no_csvlogger_turns_it_off(plugin_env, tmp_path):
    out = tmp_path / "run"
    result = trainloop(
        "run", "recipes/single_node.py", "--epochs", "1", "--steps-per-epoch", "2",
        "--out", str(out), "-p", "no:csvlogger", env=plugin_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (out / "metrics.jsonl").exists()
    assert not (out / "metrics.csv").exists()


def test_disabling_autoload_stops_it_loading_unless_named_with_p(plugin_env):
    env = {**plugin_env, "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"}
    listing = trainloop("plugins", env=env)
    assert listing.returncode == 0, listing.stderr
    rows = plugin_rows(listing.stdout)
    assert "progress" in rows and "csvlogger" not in rows

    named = plugin_rows(trainloop("plugins", "-p", "trainloop_csvlogger", env=env).stdout)
    assert named["trainloop_csvlogger"].startswith("-p")


def test_the_packages_own_tests_pass_against_the_installed_plugin(plugin_env):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PACKAGE / "tests")],
        cwd=ROOT,
        env=plugin_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout
