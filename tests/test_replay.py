"""Replayable configs: ``--config`` takes a run's config.json (or a TOML file) as defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import without_timings

from trainloop.cli import main
from trainloop.run_folder import read_jsonl

RECIPE = """
from dataclasses import dataclass
from typing import Literal
import functools, torch
from trainloop import Learner

@dataclass
class Config:
    lr: float = 0.1
    batch_size: int = 8
    sizes: tuple[int, int] = (4, 2)
    kind: Literal["sgd", "adam"] = "sgd"

def build(cfg):
    inputs = torch.randn(32, cfg.sizes[0])
    target = (inputs.sum(1) > 0).long() % cfg.sizes[1]
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, target), batch_size=cfg.batch_size, shuffle=True
    )
    model = torch.nn.Sequential(torch.nn.Linear(cfg.sizes[0], cfg.sizes[1]), torch.nn.LogSoftmax(1))
    optimizer = torch.optim.SGD if cfg.kind == "sgd" else torch.optim.Adam
    return Learner(model, data, data, optimizer=functools.partial(optimizer, lr=cfg.lr))
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "replay.py"
    path.write_text(RECIPE)
    return path


def run(*args) -> int:
    return main([str(arg) for arg in args])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_runs_config_json_reproduces_its_metrics(recipe, tmp_path):
    first = tmp_path / "first"
    options = ("--lr", 0.05, "--batch-size", 4, "--sizes", 4, 3, "--kind", "adam", "--seed", 7)
    assert (
        run("run", recipe, *options, "--epochs", 3, "--lr-schedule", "cosine", "--out", first) == 0
    )

    again = tmp_path / "again"
    assert run("run", recipe, "--config", first / "config.json", "--out", again) == 0

    replayed = without_timings(read_jsonl(again / "metrics.jsonl")[0])
    assert replayed == without_timings(read_jsonl(first / "metrics.jsonl")[0])
    replayed = json.loads((again / "config.json").read_text())
    assert replayed["config"] == json.loads((first / "config.json").read_text())["config"]
    assert replayed["options"]["lr_schedule"] == "cosine" and replayed["options"]["seed"] == 7


def test_options_on_the_command_line_win_over_the_file(recipe, tmp_path):
    first = tmp_path / "first"
    assert run("run", recipe, "--lr", 0.05, "--epochs", 2, "--out", first) == 0
    again = tmp_path / "again"
    assert run("run", recipe, "--config", first / "config.json", "--epochs", 3, "--out", again) == 0
    config = json.loads((again / "config.json").read_text())
    assert config["config"]["lr"] == 0.05 and config["options"]["epochs"] == 3
    assert len(read_jsonl(again / "metrics.jsonl")[0]) == 3


def test_a_toml_file_gives_options_spelt_as_on_the_command_line(recipe, tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text('lr = 0.2\nbatch-size = 16\nsizes = [4, 3]\nkind = "adam"\nepochs = 2\n')
    out = tmp_path / "run"
    assert run("run", recipe, "--config", settings, "--out", out) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config == {"lr": 0.2, "batch_size": 16, "sizes": [4, 3], "kind": "adam"}
    assert len(read_jsonl(out / "metrics.jsonl")[0]) == 2


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        ("missing.toml", None, "no such file"),
        ("broken.json", '{"config": {"lr": 0.1,}', "not valid JSON (Expecting property name"),
        ("other.json", '{"lr": 0.1}', "not a run's config.json"),
        ("broken.toml", "lr = 0.1\nepochs = \n", "not valid TOML (Invalid value (at line 2"),
        ("unknown.toml", "lr = 0.1\nwidth = 3\n", "--width: not an option of this recipe"),
        ("wrong.toml", 'lr = "fast"\n', "--lr 'fast': could not convert string to float"),
        ("choice.toml", 'kind = "rmsprop"\n', "--kind 'rmsprop': use one of sgd, adam"),
        ("table.toml", "[model]\nlr = 0.1\n", "'model' is a table"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_it_and_nothing_is_written(
    recipe, tmp_path, capsys, name, text, said
):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert run("run", recipe, "--config", path, "--out", tmp_path / "run") == 2
    line = error_line(capsys)
    assert said in line and ("--config" in line)
    assert not (tmp_path / "run").exists()


def test_deterministic_asks_torch_for_deterministic_algorithms(recipe, tmp_path):
    try:
        assert run("run", recipe, "--deterministic", "--out", tmp_path / "run") == 0
        assert torch.are_deterministic_algorithms_enabled()
        assert json.loads((tmp_path / "run" / "config.json").read_text())["options"][
            "deterministic"
        ]
    finally:
        torch.use_deterministic_algorithms(False)
