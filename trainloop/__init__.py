"""trainloop: a plugin-based training micro-framework for PyTorch.

A minimal :class:`Learner` runs the loop and fires hook events; progress bars,
TensorBoard, checkpoints, devices and the rest are pluggy plugins.
"""

from importlib.metadata import PackageNotFoundError, version

from trainloop.errors import CancelBatch, CancelEpoch, StopFit, TrainingError, UsageError
from trainloop.hookspecs import hookimpl, hookspec
from trainloop.learner import Learner, batch_size, target_of
from trainloop.manager import PluginManager
from trainloop.monitor import Monitor
from trainloop.run import RunConfig

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
