"""trainloop: a plugin-based training micro-framework for PyTorch.

A minimal :class:`Learner` runs the loop and fires hook events; progress bars,
TensorBoard, checkpoints, devices and the rest are pluggy plugins.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from trainloop.errors import CancelBatch, CancelEpoch, StopFit, TrainingError, UsageError
from trainloop.hookspecs import hookimpl, hookspec
from trainloop.manager import PluginManager
from trainloop.monitor import Monitor
from trainloop.run import RunConfig

if TYPE_CHECKING:
    from trainloop.learner import Learner, batch_size, target_of

# Imported on first use (PEP 562), so that `import trainloop` (and with it the console
# script, `trainloop --version`, a Ctrl-C while it starts) does not wait for torch.
_LAZY = dict.fromkeys(("Learner", "batch_size", "target_of"), "trainloop.learner")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'trainloop' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


try:
    __version__ = version("trainloop")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
__version__: str
"""The installed version of trainloop (``trainloop --version`` prints it)."""

__all__ = [
    "CancelBatch",
    "CancelEpoch",
    "Learner",
    "Monitor",
    "PluginManager",
    "RunConfig",
    "StopFit",
    "TrainingError",
    "UsageError",
    "__version__",
    "batch_size",
    "hookimpl",
    "hookspec",
    "target_of",
]
