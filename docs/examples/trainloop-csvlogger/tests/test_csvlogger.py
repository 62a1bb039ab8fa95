"""Tests of the csvlogger plugin through trainloop's public API."""

from __future__ import annotations

import argparse
import csv
import functools
from pathlib import Path

import torch
from trainloop_csvlogger import CSVLogger, add_options, configure

from trainloop import Learner, PluginManager, RunConfig
from trainloop.check_resume import check_resume


def tiny_learner(*plugins: object) -> Learner:
    torch.manual_seed(0)
    inputs = torch.randn(32, 3)
    target = inputs.sum(dim=1, keepdim=True)
    batches = [(inputs[:16], target[:16]), (inputs[16:], target[16:])]
    return Learner(
        torch.nn.Linear(3, 1),
        batches,
        valid_data=batches[:1],
        loss_func=torch.nn.functional.mse_loss,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        plugins=plugins,
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_one_row_per_epoch_with_the_learners_values(tmp_path):
    path = tmp_path / "out" / "metrics.csv"
    learner = tiny_learner(CSVLogger(path))
    history = learner.fit(3)
    rows = read_rows(path)
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    assert list(rows[0]) == ["epoch", "train_loss", "valid_loss"]
    for row, epoch in zip(rows, history):
        assert float(row["train_loss"]) == epoch["train_loss"]
        assert float(row["valid_loss"]) == epoch["valid_loss"]


class LearningRateFromEpochOne:
    """Adds a metric only from the second epoch on."""

    def on_epoch_end(self, learner: Learner) -> None:
        if learner.epoch >= 1:
            learner.metrics["lr"] = 0.1


def test_a_metric_that_appears_later_gets_a_column_and_empty_earlier_cells(tmp_path):
    path = tmp_path / "metrics.csv"
    tiny_learner(LearningRateFromEpochOne(), CSVLogger(path)).fit(3)
    rows = read_rows(path)
    assert list(rows[0]) == ["epoch", "train_loss", "valid_loss", "lr"]
    assert [row["lr"] for row in rows] == ["", "0.1", "0.1"]


class ResumeAtEpochTwo:
    def on_fit_begin(self, learner: Learner) -> None:
        learner.epoch = 2


def test_a_resumed_run_keeps_the_rows_of_earlier_epochs_only(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,train_loss\n0,1.5\n1,1.25\n2,9.0\n")
    tiny_learner(ResumeAtEpochTwo(), CSVLogger(path)).fit(3)
    rows = read_rows(path)
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    assert rows[1]["train_loss"] == "1.25"
    assert rows[2]["train_loss"] != "9.0"
    assert rows[0]["valid_loss"] == ""


def run_config(tmp_path: Path, argv: list[str]) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_options(parser)
    options = parser.parse_args(argv)
    return RunConfig(options, tmp_path, Path("recipe.py"), None, PluginManager())


def test_csv_path_defaults_to_metrics_csv_in_the_run_folder(tmp_path):
    config = run_config(tmp_path, [])
    configure(config)
    assert config.plugin_manager.get_plugin("csvlogger.writer").path == tmp_path / "metrics.csv"


def test_csv_path_option_chooses_the_file(tmp_path):
    config = run_config(tmp_path, ["--csv-path", str(tmp_path / "elsewhere.csv")])
    configure(config)
    assert config.plugin_manager.get_plugin("csvlogger.writer").path == tmp_path / "elsewhere.csv"


def test_processes_that_do_not_write_files_register_no_writer(tmp_path):
    config = run_config(tmp_path, [])
    config.context.rank = 1  # a process other than the first of a distributed run
    configure(config)
    assert config.plugin_manager.get_plugin("csvlogger.writer") is None


def test_a_run_killed_and_resumed_writes_the_csv_of_a_run_never_stopped(tmp_path):
    # Real runs of tiny_learner with the installed plugin: one never stopped, one killed
    # with SIGKILL after the first epoch and resumed; metrics.csv must be the same bytes.
    report = check_resume(
        tiny_learner,
        ["-p", "csvlogger", "--epochs", "3"],
        kills=1,
        compare_files=["metrics.csv"],
        work_dir=tmp_path / "check",
    )
    assert report.identical, report.format()
    rows = read_rows(tmp_path / "check" / "kill-1" / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["0", "1"]  # the check's 4 steps: two epochs
