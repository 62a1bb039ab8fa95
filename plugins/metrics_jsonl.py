"""metrics_jsonl: one JSON object per epoch in ``metrics.jsonl`` in the run folder.

Each line holds ``epoch`` and every key of ``learner.metrics`` (``train_loss``,
``valid_loss``, ``valid_<metric>``, and what plugins add, such as ``lr``). Non-finite
values are written as ``null``, so every line is strict JSON. On a resumed run, lines
for epochs that are run again are dropped first, so each epoch appears once, and a line
that is not JSON (the last one cut off by a full disk or a kill during the append) is
dropped with a warning (:func:`trainloop.run_folder.read_jsonl` reads the file the same
way).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from trainloop import Learner, RunConfig, hookimpl
from trainloop.run_folder import atomic_write_text, is_environment_error, read_jsonl, write_error

FILE_NAME = "metrics.jsonl"


@hookimpl
def configure(config: RunConfig) -> None:
    if not config.is_main_process:  # one file per run, written by rank 0
        return
    config.plugin_manager.register(MetricsFile(config.run_dir / FILE_NAME), "metrics_jsonl.writer")


class MetricsFile:
    """Appends ``{"epoch": ..., **learner.metrics}`` to ``path`` at each epoch end.

    Args:
        path: the file; ``None`` means ``learner.run_dir / "metrics.jsonl"``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None

    @hookimpl(trylast=True)  # after a resuming plugin has set learner.epoch
    def on_fit_begin(self, learner: Learner) -> None:
        if self.path is None:
            if learner.run_dir is None:
                raise ValueError("MetricsFile needs a path or a learner with run_dir")
            self.path = learner.run_dir / FILE_NAME
        kept = []
        if learner.epoch > 0 and self.path.exists():
            records, skipped = read_jsonl(self.path)
            for message in skipped:
                print(f"trainloop: warning: {message}", file=sys.stderr, flush=True)
            kept = [record for record in records if record.get("epoch", math.inf) < learner.epoch]
        # Through a temporary file and a rename: a kill here leaves the old file whole.
        text = "".join(json.dumps(record) + "\n" for record in kept)
        atomic_write_text(self.path, text)

    @hookimpl(trylast=True)  # after every plugin has added its keys
    def on_epoch_end(self, learner: Learner) -> None:
        record = {"epoch": learner.epoch, **learner.metrics}
        line = json.dumps({key: _finite(value) for key, value in record.items()}) + "\n"
        try:
            with open(self.path, "a") as file:
                file.write(line)
        except OSError as error:
            if is_environment_error(error):
                raise write_error(self.path, error) from None
            raise


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
