"""The third-party plugin story, end to end, with the example package in the docs.

``docs/examples/trainloop-csvlogger`` is installed offline with pip into a temporary
folder (conftest's ``example_packages``), and ``trainloop`` runs in fresh processes that
see it on ``PYTHONPATH``: exactly what a user gets after ``pip install
trainloop-csvlogger``. The commands run concurrently (each spends most of its time
importing torch); the tests then read their results.
"""

from __future__ import annotations

import concurrent.futures
import csv
import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES, ROOT

PACKAGE = EXAMPLES / "trainloop-csvlogger"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """Where the runs write their folders."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def runs(example_packages, out) -> dict[str, subprocess.CompletedProcess]:
    """The commands of a user who installed the plugin, by name, with their results."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.pop("TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD", None)
    env["PYTHONPATH"] = str(example_packages)
    single_node = ["run", "recipes/single_node.py", "--epochs"]
    commands = {
        "plugins": (["plugins"], env),
        "run": ([*single_node, "2", "--out", str(out / "csv")], env),
        "run without csvlogger": (
            [
                *single_node,
                "1",
                "--steps-per-epoch",
                "2",
                "--out",
                str(out / "no-csv"),
                "-p",
                "no:csvlogger",
            ],
            env,
        ),  # fmt: skip
        "plugins without autoload": (
            ["plugins"],
            {**env, "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"},
        ),
    }

    def trainloop(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "trainloop", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = {name: pool.submit(trainloop, *command) for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def plugin_rows(listing: str) -> dict[str, str]:
    """``trainloop plugins`` table rows as {name: the rest of the row}."""
    rows = {}
    for line in listing.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if len(cells) >= 2 and cells[0]:
            rows[cells[0]] = " ".join(cells[1:])
    return rows


def test_trainloop_plugins_lists_csvlogger_from_its_entry_point(runs):
    listing = runs["plugins"]
    assert listing.returncode == 0, listing.stderr
    rows = plugin_rows(listing.stdout)
    assert "csvlogger" in rows
    assert "entry point (trainloop-csvlogger 0.1.0)" in rows["csvlogger"]
    assert "add_options" in rows["csvlogger"] and "configure" in rows["csvlogger"]


def test_a_run_writes_one_csv_row_per_epoch_matching_metrics_jsonl(runs, out):
    result = runs["run"]
    assert result.returncode == 0, result.stderr
    folder = out / "csv"
    with open(folder / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(records) == 2
    assert list(rows[0]) == list(records[0])  # epoch, train_loss, output, error
    for row, record in zip(rows, records):
        assert {key: float(value) for key, value in row.items()} == pytest.approx(record, rel=0)


def test_p_no_csvlogger_turns_it_off(runs, out):
    result = runs["run without csvlogger"]
    assert result.returncode == 0, result.stderr
    assert (out / "no-csv" / "metrics.jsonl").exists()
    assert not (out / "no-csv" / "metrics.csv").exists()


def test_disabling_autoload_stops_it_loading(runs):
    listing = runs["plugins without autoload"]
    assert listing.returncode == 0, listing.stderr
    rows = plugin_rows(listing.stdout)
    assert "progress" in rows and "csvlogger" not in rows


def package_tests() -> list[str]:
    source = (PACKAGE / "tests" / "test_csvlogger.py").read_text()
    return [line[4:].split("(")[0] for line in source.splitlines() if line.startswith("def test_")]


@pytest.mark.parametrize("name", package_tests())
def test_the_packages_own_tests_pass_against_the_installed_plugin(
    name, example_packages, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(example_packages))
    monkeypatch.syspath_prepend(str(PACKAGE / "tests"))
    for module_name in ("test_csvlogger", "trainloop_csvlogger"):  # this install's copies
        monkeypatch.delitem(sys.modules, module_name, raising=False)
    module = importlib.import_module("test_csvlogger")
    import trainloop_csvlogger

    assert Path(trainloop_csvlogger.__file__).parent == example_packages  # the installed copy
    test = getattr(module, name)
    assert list(inspect.signature(test).parameters) in ([], ["tmp_path"]), name
    test(tmp_path) if inspect.signature(test).parameters else test()
