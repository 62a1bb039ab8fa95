"""Helpers that experiment-tracker plugins share: a run's parameters, its commit, metric values."""

from __future__ import annotations

import dataclasses
import numbers
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainloop.run import RunConfig


def run_params(config: RunConfig) -> dict[str, Any]:
    """The recipe's Config fields, then the run's other options as ``option.<name>``.

    Options that are ``None`` (not given, no default) are left out; a Config field that
    is also an option appears once, under its own name.
    """
    params = flat_params(config.recipe_config)
    for key, value in sorted(vars(config.options).items()):
        if key not in params and value is not None:
            params[f"option.{key}"] = value
    return params


def flat_params(config: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass or dict as one flat dict; nested ones become ``outer.inner`` keys."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    if not isinstance(config, dict):
        return {}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) or (
            dataclasses.is_dataclass(value) and not isinstance(value, type)
        ):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def git_commit(folder: str | Path) -> str | None:
    """The commit checked out in ``folder``'s git repository, or ``None``."""
    try:
        result = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def metric_value(value: Any) -> float | None:
    """``value`` as a float to log as a metric, or ``None`` when it is not a number.

    Booleans are not metrics; one-element tensors and NumPy scalars are.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "numel") and value.numel() == 1:  # a one-element tensor
        return float(value)
    return None
