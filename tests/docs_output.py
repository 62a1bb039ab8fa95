"""How the docs' output blocks are compared with what the code prints.

One rule for every page (tests/test_docs.py and tests/test_learn_pages.py use it):
the whole output is compared, line by line, after trailing spaces and the blank lines
at either end are dropped. In an expected line:

* ``0.93±0.02`` matches a printed number between 0.91 and 0.95 (training losses and
  accuracies differ a little from one CPU or library version to another); the site
  shows only ``0.93``;
* ``*`` matches any text within the line (a path, a timing);
* a run of spaces matches any run of spaces (a table's columns widen with its numbers);
* anything else is compared exactly.

A line ``... (why)`` matches any number of lines, and must say why they are left out:
only output that is genuinely variable (timings, paths) is elided. A bare ``...`` line
is an error, so no elision goes unexplained.
"""

from __future__ import annotations

import math
import re

NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
TOLERANCE = re.compile(rf"(?P<value>{NUMBER})±(?P<tolerance>{NUMBER})")
ELISION = re.compile(r"\.\.\. \((?P<why>.+)\)")
_TOKEN = re.compile(rf"{TOLERANCE.pattern}|(?P<star>\*)|(?P<space> +)")


def _tidy(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def _line_pattern(pattern: str) -> tuple[re.Pattern, list[tuple[float, float]]]:
    """A regex for one expected line, and the (value, tolerance) of each of its groups."""
    parts, bounds, position = [], [], 0
    for token in _TOKEN.finditer(pattern):
        parts.append(re.escape(pattern[position : token.start()]))
        if token["star"]:
            parts.append(".*")
        elif token["space"]:
            parts.append(" +")
        else:
            parts.append(f"({NUMBER}|nan|inf)")
            bounds.append((float(token["value"]), float(token["tolerance"])))
        position = token.end()
    parts.append(re.escape(pattern[position:]))
    return re.compile("".join(parts)), bounds


def line_matches(pattern: str, line: str) -> bool:
    """Whether one printed line matches one expected line (not an elision)."""
    regex, bounds = _line_pattern(pattern)
    match = regex.fullmatch(line)
    if match is None:
        return False
    for group, (value, tolerance) in zip(match.groups(), bounds):
        printed = float(group)
        if math.isnan(printed) or abs(printed - value) > tolerance * (1 + 1e-9):
            return False
    return True


def mismatch(want: str, got: str) -> str | None:
    """``None`` if ``got`` is what ``want`` shows; else a message saying where it differs."""
    expected, printed = _tidy(want), _tidy(got)
    for line in expected:
        if line.strip() == "..." or (line.startswith("...") and not ELISION.fullmatch(line)):
            return f"the elision {line!r} must say why lines are left out: '... (why)'"
    # the longest prefix of `expected` that matched, to name the first line that did not
    best = [0, 0]

    def match_from(i: int, j: int) -> bool:
        while i < len(expected):
            if ELISION.fullmatch(expected[i]):
                return any(match_from(i + 1, k) for k in range(j, len(printed) + 1))
            if j >= len(printed) or not line_matches(expected[i], printed[j]):
                if i > best[0]:
                    best[:] = [i, j]
                return False
            i, j = i + 1, j + 1
        if j < len(printed) and i >= best[0]:
            best[:] = [i, j]
        return j == len(printed)

    if match_from(0, 0):
        return None
    i, j = best
    if i < len(expected):
        where = f"expected line {i + 1}, {expected[i]!r}, does not match"
        where += (
            f" printed line {j + 1}, {printed[j]!r}" if j < len(printed) else " (no more lines)"
        )
    else:
        where = f"printed line {j + 1} and those after it, {printed[j]!r}, are not on the page"
    return where


def strip_tolerances(text: str) -> str:
    """``0.93±0.02`` -> ``0.93``: what the site shows of an expected line."""
    return TOLERANCE.sub(lambda match: match["value"], text)
