"""The step table in docs/concepts.md gives each step hook's real arguments."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from trainloop import hookspecs

CONCEPTS = Path(__file__).resolve().parents[1] / "docs" / "concepts.md"


def step_rows() -> dict[str, list[str]]:
    """The step table's rows: step name -> its other cells, without backticks."""
    section = CONCEPTS.read_text().split("<!-- step-table -->", 1)[1]
    rows = {}
    for line in section.strip().splitlines():
        if not line.startswith("|"):
            break
        cells = [cell.strip().replace("`", "") for cell in line.strip("|").split("|")]
        if not re.fullmatch(r"[\s:-]*", cells[0]):
            rows[cells[0]] = cells[1:]
    rows.pop("step")  # the header
    return rows


def test_each_step_row_lists_the_arguments_of_its_hook():
    rows = step_rows()

    for name, cells in rows.items():
        parameters = list(inspect.signature(getattr(hookspecs, name)).parameters)
        assert cells[0] == ", ".join(parameters), name


def test_the_loss_step_is_shown_with_the_batch_it_receives():
    default = step_rows()["compute_loss"][1]

    assert "get_target(learner, batch)" in default
