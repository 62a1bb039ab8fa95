"""Bad input on the command line: one line naming the thing, status 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from trainloop.cli import main

SINGLE_NODE = ROOT / "recipes" / "single_node.py"


def trainloop(*args, capsys) -> tuple[int, list[str]]:
    """Run the command in this process; return its status and stderr's lines."""
    status = main([str(arg) for arg in args])
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty current folder, where a default run folder would appear."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_recipe_path_that_is_a_folder_says_so_and_names_its_recipes(workdir, capsys):
    (workdir / "recipes").mkdir()
    (workdir / "recipes" / "tiny.py").write_text("")
    (workdir / "recipes" / "_helpers.py").write_text("")

    status, err = trainloop("run", "recipes", "--epochs", "1", capsys=capsys)

    assert status == 2
    assert err == [
        "trainloop: error: recipe recipes is a folder, not a file: give a recipe .py file"
        " (recipes/tiny.py)"
    ]
    assert sorted(path.name for path in workdir.iterdir()) == ["recipes"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--lr", "-1"], "--lr -1.0: use a positive step size"),
        (["--lr", "0"], "--lr 0.0: use a positive step size"),
        (["--lr", "nan"], "--lr nan: use a positive step size"),
        (["--steps-per-epoch", "0"], "--steps-per-epoch 0: use 1 or more"),
        (["--target", "1.5"], "--target 1.5: use a number between 0 and 1"),
        (["--x", "inf"], "--x inf: use a finite number"),
    ],
)
def test_a_bad_single_node_option_is_one_line_and_leaves_no_run_folder(
    option, message, workdir, capsys
):
    out = workdir / "run"

    status, err = trainloop("run", SINGLE_NODE, *option, "--out", out, capsys=capsys)

    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"trainloop: error: {message}")
    assert not out.exists()
    assert list(workdir.iterdir()) == []


def test_a_bad_single_node_option_in_the_default_folder_writes_nothing(workdir, capsys):
    status, err = trainloop("run", SINGLE_NODE, "--steps-per-epoch", "0", capsys=capsys)

    assert status == 2 and len(err) == 1
    assert list(workdir.iterdir()) == []


def test_the_single_node_recipe_still_runs_with_good_options(workdir, capsys):
    status, err = trainloop(
        "run", SINGLE_NODE, "--epochs", "1", "--steps-per-epoch", "3", "--lr", "0.1",
        "--out", workdir / "run", capsys=capsys,
    )  # fmt: skip

    assert status == 0, err
    assert (workdir / "run" / "metrics.jsonl").is_file()


def test_a_module_without_hooks_is_not_taken_as_a_plugin(workdir, capsys):
    status, lines = trainloop(
        "run", ROOT / "recipes" / "single_node.py", "-p", "json", capsys=capsys
    )
    assert status == 2
    assert lines == [
        "trainloop: error: -p json: 'json' implements no trainloop hook, so it is not a plugin"
    ]
    assert not (workdir / "runs").exists()
