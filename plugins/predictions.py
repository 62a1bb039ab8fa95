"""predictions: stream predictions into a CSV file, one row per item, in order, while predicting."""

from __future__ import annotations

import csv
import gzip
import io
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainloop import Learner

PARTIAL_SUFFIX = ".partial"


class PredictionWriter:
    """Writes one CSV row per item during ``predict``: ``key, value, ...``, in key order.

    A subclass says what the rows of a batch are (:meth:`rows`) and, as class
    attributes, the CSV's :attr:`header` and the :attr:`file_name` it gets in the run
    folder. Each row is written as soon as the rows before it are; the file is
    ``<path>.partial`` until ``predict`` ends without an error, then renamed to ``path``.

    Args:
        path: the file to write, gzipped when its name ends in ``.gz``; ``None``:
            ``learner.run_dir / file_name``.
        keys: the first column of each row, by index: row ``i`` is item ``i``'s, and
            every item gets exactly one row.
        write: whether this process writes; ``None``: the run's main process only
            (``learner.context.is_main_process``).
        compresslevel: gzip's level, 1 (fast) to 9 (small); 6 is gzip's own default.

    Attributes:
        count: the rows written by the current or last ``predict``.
        path: the final file (known once ``predict`` has begun).
    """

    header: Sequence[str] = ()
    """The CSV's first line; none when empty."""
    file_name: str = "predictions.csv.gz"
    """The file's name in the run folder when ``path`` is ``None``."""

    def __init__(
        self,
        path: str | os.PathLike | None,
        keys: Sequence[str],
        *,
        write: bool | None = None,
        compresslevel: int = 6,
    ) -> None:
        if len(keys) == 0:
            raise ValueError(f"{type(self).__name__} has no items to write rows for")
        self.path = Path(path) if path is not None else None
        self.keys = keys
        self.write = write
        self.compresslevel = compresslevel
        self.count = 0
        self._file: Any = None
        self._csv: Any = None
        self._partial: Path | None = None
        self._pending: dict[int, tuple[str, ...]] = {}
        self._writes = False

    @property
    def partial_path(self) -> Path | None:
        """Where the rows go until ``predict`` is over: ``<path>.partial``."""
        return self._partial

    def rows(self, batch: Any, pred: Any) -> Iterable[tuple[int, Sequence[str]]]:
        """The rows of one predicted batch: ``(index, values)`` for each of its items, the
        row being ``keys[index]`` followed by ``values``. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement rows(batch, pred)")

    # --- predict -----------------------------------------------------------------------

    def on_predict_begin(self, learner: Learner) -> None:
        self._writes = learner.context.is_main_process if self.write is None else self.write
        self.count = 0
        self._pending = {}
        if not self._writes:
            return
        if self.path is None:
            if learner.run_dir is None:
                raise ValueError(f"{type(self).__name__} needs a path or a learner with run_dir")
            self.path = Path(learner.run_dir) / self.file_name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        raw = open(self._partial, "wb")  # closed in on_predict_end
        self._raw = raw
        text: Any = raw
        if self.path.suffix == ".gz":
            # The name inside the gzip header is the final one, without .gz. mtime 0: the
            # same predictions make the same bytes (`trainloop predict` reproduces them).
            text = gzip.GzipFile(
                filename=self.path.name,
                mode="wb",
                fileobj=raw,
                compresslevel=self.compresslevel,
                mtime=0,
            )
        self._file = io.TextIOWrapper(text, encoding="utf-8", newline="")
        self._csv = csv.writer(self._file, lineterminator="\n")
        if self.header:
            self._csv.writerow(self.header)

    def on_predict_batch_end(self, batch: Any, pred: Any) -> None:
        if not self._writes:
            return
        for index, values in self.rows(batch, pred):
            self._add(index, values)

    def _add(self, index: int, values: Sequence[str]) -> None:
        name = type(self).__name__
        if not 0 <= index < len(self.keys):
            raise ValueError(
                f"{name} got index {index}, but it has {len(self.keys)} items "
                f"(0 to {len(self.keys) - 1})"
            )
        if index < self.count or index in self._pending:
            raise ValueError(f"{name} got item {index} ({self.keys[index]}) twice")
        self._pending[index] = (self.keys[index], *values)
        # In order: write every row whose predecessors are all written.
        while self.count in self._pending:
            self._csv.writerow(self._pending.pop(self.count))
            self.count += 1

    def on_predict_end(self, learner: Learner) -> None:
        if self._file is None:
            return
        failed = learner.exception is not None
        complete = not failed and self.count == len(self.keys)
        file, self._file = self._file, None
        try:
            inner = file.detach()  # flushed, as close() would
            if inner is not self._raw:
                inner.close()  # ends the gzip stream; the raw file stays open
            if complete:
                self._raw.flush()
                os.fsync(self._raw.fileno())
        finally:
            self._raw.close()
        if complete:
            os.replace(self._partial, self.path)
            return
        if failed:
            print(
                f"trainloop: predictions: predict failed after {self.count} of "
                f"{len(self.keys)} rows; the rows so far are in {self._partial} "
                f"(not complete: {self.path.name} was not written)",
                file=sys.stderr,
                flush=True,
            )
            return
        raise ValueError(
            f"{type(self).__name__}: predict gave rows for {self.count + len(self._pending)} "
            f"of {len(self.keys)} items (the first missing is {self.keys[self.count]}): "
            f"predict every item once, with a loader that drops none; the rows so far are in "
            f"{self._partial}"
        )
