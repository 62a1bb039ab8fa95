"""The rule that compares the docs' output blocks with what the code prints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from docs_output import mismatch, strip_tolerances

ROOT = Path(__file__).resolve().parents[1]


def test_a_number_matches_within_its_tolerance_and_not_beyond():
    assert mismatch("loss 0.93±0.02", "loss 0.9412") is None
    assert mismatch("loss 0.93±0.02", "loss 0.91") is None
    assert "does not match" in mismatch("loss 0.93±0.02", "loss 0.96")
    assert "does not match" in mismatch("loss 0.93±0.02", "loss nan")
    assert mismatch("error 3.5e-11±4e-12", "error 3.2e-11") is None


def test_columns_may_widen_and_a_star_stands_for_a_timing():
    assert mismatch("     1   0.0238±1e-4   *s", "         1  0.023812     0.05s") is None
    assert "does not match" in mismatch("epoch 1", "epoch 2")


def test_the_whole_output_is_compared_and_elisions_say_why():
    assert "not on the page" in mismatch("a", "a\nb")
    assert "no more lines" in mismatch("a\nb", "a")
    assert mismatch("a\n... (timings vary)\nz", "a\n1\n2\nz") is None
    assert mismatch("a\n... (none here)\nz", "a\nz") is None
    assert "must say why" in mismatch("a\n...\nz", "a\n1\nz")
    assert mismatch("\na  \n\n", "a\n") is None  # blank lines at the ends, trailing spaces


def test_the_site_shows_the_value_without_its_tolerance():
    assert strip_tolerances("loss 0.93±0.02, dice 1±0.1") == "loss 0.93, dice 1"
    spec = importlib.util.spec_from_file_location(
        "hooks", ROOT / "docs" / "_ext" / "mkdocs_hooks.py"
    )
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = "x 1±2 in prose\n\n```text\nloss 0.93±0.02\n```\n\n```python\nprint(1±2)\n```\n"
    assert hooks.show_values(page) == page.replace("0.93±0.02", "0.93")
