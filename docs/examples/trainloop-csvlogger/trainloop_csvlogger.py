"""trainloop-csvlogger: one CSV row per epoch, with the epoch and every metric.

Installed, it is found through the entry point group ``trainloop`` and adds the option
``--csv-path FILE`` to ``trainloop run`` (default: ``metrics.csv`` in the run folder).
With the Python API, pass ``CSVLogger(path)`` to the Learner's ``plugins``.

The header comes from the first epoch. A metric that first appears in a later epoch
gets a new column at the end: the file is rewritten once with the wider header, and
earlier rows leave that cell empty. An epoch without some metric leaves its cell empty.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from trainloop import Learner, RunConfig, hookimpl

FILE_NAME = "metrics.csv"


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("csvlogger")
    group.add_argument(
        "--csv-path",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"where to write one row per epoch (default: RUN_DIR/{FILE_NAME})",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    if not config.is_main_process:  # one writer in a distributed run
        return
    path = config.options.csv_path or config.run_dir / FILE_NAME
    config.plugin_manager.register(CSVLogger(path), "csvlogger.writer")


class CSVLogger:
    """Writes ``epoch`` and every key of ``learner.metrics`` to ``path``, a row per epoch.

    Args:
        path: the CSV file; its folder is created if needed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []

    @hookimpl(trylast=True)  # after a resuming plugin has set learner.epoch
    def on_fit_begin(self, learner: Learner) -> None:
        self.columns, self.rows = [], []
        if learner.epoch > 0 and self.path.exists():  # a resumed run: keep earlier epochs
            with open(self.path, newline="") as file:
                reader = csv.DictReader(file)
                self.columns = list(reader.fieldnames or [])
                self.rows = [row for row in reader if int(row["epoch"]) < learner.epoch]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rewrite()

    @hookimpl(trylast=True)  # after every plugin has added its metrics
    def on_epoch_end(self, learner: Learner) -> None:
        row = {"epoch": learner.epoch, **learner.metrics}
        self.rows.append(row)
        new_columns = [key for key in row if key not in self.columns]
        if new_columns:
            self.columns += new_columns
            self._rewrite()
            return
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, self.columns, restval="").writerow(row)

    def _rewrite(self) -> None:
        with open(self.path, "w", newline="") as file:
            if not self.columns:
                return
            writer = csv.DictWriter(file, self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
