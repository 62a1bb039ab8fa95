"""device: put the model and every batch on a device; channels_last; torch.compile.

* ``--device auto`` (the default) picks CUDA when it is available, else Apple's MPS, else
  the CPU; ``--device cpu``, ``--device cuda``, ``--device cuda:1`` or ``--device mps``
  choose one. A device this machine does not have is a one-line usage error.
* The model is moved once, when ``fit`` starts, before any plugin restores a
  checkpoint (a ``wrapper=True`` ``on_fit_begin`` that runs before every plain one), and
  before ``predict`` or ``validate`` if ``fit`` has not run.
* Each batch is moved through the ``transfer_batch`` hook: tensors anywhere inside
  tuples, lists, dicts, named tuples and dataclasses (rebuilt with the same type);
  other values are left as they are. A copy from pinned memory to CUDA is
  ``non_blocking``.
* ``--channels-last`` (for conv nets): the model and every 4-D tensor of a batch use
  the ``channels_last`` memory format, which is faster for convolutions on recent GPUs,
  above all under mixed precision.
* ``--compile`` runs the forward pass through ``torch.compile(model)``. ``learner.model``
  stays the original module, so checkpoints keep their plain keys. Under the
  distributed plugin DDP wraps the compiled model. When this platform cannot compile,
  one line says so and training goes on without it.

On the CPU with none of these options the plugin registers nothing, so batches take
the core's direct path: no per-batch hook at all.

Data loading: a recipe passes ``pin_memory=pin_memory_default()`` to its DataLoader;
it is ``True`` when this run's batches go to a CUDA device.

Python API: ``Learner(..., plugins=[Device("cuda", channels_last=True), Compile()])``;
:func:`move_batch` is the function that moves a batch. Writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import torch

from trainloop import Learner, RunConfig, UsageError, hookimpl

_run_device: torch.device | None = None  # the device of the current CLI run, if any


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("device")
    group.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps (default: auto)",
    )
    group.add_argument(
        "--channels-last",
        action="store_true",
        help="channels_last memory format for the model and 4-D batches (conv nets)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="run the forward pass through torch.compile (falls back when it cannot)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    global _run_device
    options = config.options
    device = resolve_device(options.device)
    _run_device = device
    if device.type != "cpu" or options.channels_last:
        plugin = Device(device, channels_last=options.channels_last)
        config.plugin_manager.register(plugin, "device.placement")
    if options.compile:
        config.plugin_manager.register(Compile(), "device.compile")


@hookimpl
def unconfigure() -> None:
    global _run_device
    _run_device = None


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` that ``--device NAME`` means on this machine.

    ``"auto"`` is CUDA when available (the current CUDA device), else MPS, else CPU.
    Raises :class:`~trainloop.UsageError`, naming ``--device``, for a value that is
    not a device or a device this machine does not have.
    """
    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(
            f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UsageError(
            f"--device {name}: this machine has no {device.type} device "
            f"(torch {torch.__version__}); use --device cpu or --device auto"
        )
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        if device.index >= count:
            raise UsageError(
                f"--device {name}: this machine has {count} CUDA device(s), "
                f"numbered 0 to {count - 1}"
            )
    return device


def pin_memory_default() -> bool:
    """Whether a DataLoader should pin memory: batches go to a CUDA device.

    Under ``trainloop run`` this follows ``--device``; elsewhere it is
    ``torch.cuda.is_available()``. Recipes pass it on:
    ``DataLoader(..., pin_memory=pin_memory_default())``.
    """
    if _run_device is not None:
        return _run_device.type == "cuda"
    return torch.cuda.is_available()


def move_batch(
    batch: Any,
    device: torch.device | str,
    channels_last: bool = False,
) -> Any:
    """Return ``batch`` with every tensor in it on ``device``.

    Walks tuples, lists, dicts, named tuples and dataclasses, rebuilding each with its
    own type; values that are not tensors are returned as they are. A tensor in pinned
    memory goes to CUDA with ``non_blocking=True``. With ``channels_last``, 4-D tensors
    also take the ``channels_last`` memory format.
    """
    device = torch.device(device)
    return _move(batch, device, device.type == "cuda", channels_last)


def _move(value: Any, device: torch.device, to_cuda: bool, channels_last: bool) -> Any:
    if isinstance(value, torch.Tensor):
        non_blocking = to_cuda and value.is_pinned()
        if channels_last and value.dim() == 4:
            return value.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, (list, tuple)):
        items = [_move(item, device, to_cuda, channels_last) for item in value]
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*items)
        try:
            return type(value)(items)
        except TypeError:  # a sequence subclass whose constructor wants something else
            return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        moved = {key: _move(item, device, to_cuda, channels_last) for key, item in value.items()}
        try:
            rebuilt = type(value)()  # keeps OrderedDict, defaultdict's factory is lost
            rebuilt.update(moved)
            return rebuilt
        except TypeError:
            return moved
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            field.name: _move(getattr(value, field.name), device, to_cuda, channels_last)
            for field in dataclasses.fields(value)
            if field.init
        }
        return dataclasses.replace(value, **changes)
    return value


class Device:
    """Places the model on ``device`` when ``fit`` starts and moves every batch there.

    Args:
        device: a ``torch.device`` or its name; ``"auto"`` picks CUDA, else MPS, else CPU.
        channels_last: use the ``channels_last`` memory format for the model and for
            4-D batch tensors.
    """

    def __init__(self, device: torch.device | str = "auto", channels_last: bool = False) -> None:
        self.device = resolve_device(device)
        self.channels_last = channels_last
        self._to_cuda = self.device.type == "cuda"
        self._placed: torch.nn.Module | None = None

    def place_model(self, learner: Learner) -> None:
        """Move ``learner.model`` to the device (once per model)."""
        if self._placed is learner.model:
            return
        if self._to_cuda:
            torch.cuda.set_device(self.device)
        # Module.to moves the parameters in place, so the optimizer keeps working on them.
        if self.channels_last:
            learner.model.to(self.device, memory_format=torch.channels_last)
        else:
            learner.model.to(self.device)
        self._placed = learner.model

    @hookimpl(wrapper=True, tryfirst=True)  # before any plugin restores a checkpoint
    def on_fit_begin(self, learner: Learner) -> Any:
        self.place_model(learner)
        return (yield)

    def on_valid_begin(self, learner: Learner) -> None:
        self.place_model(learner)  # validate() without fit

    def on_predict_begin(self, learner: Learner) -> None:
        self.place_model(learner)

    @hookimpl
    def transfer_batch(self, batch: Any) -> Any:
        return _move(batch, self.device, self._to_cuda, self.channels_last)


class Compile:
    """Runs the forward pass through ``torch.compile(learner.model)``.

    ``learner.model`` stays the original module (clean checkpoint keys); this plugin's
    ``forward`` step calls the compiled one. Under the distributed plugin, DDP wraps the
    compiled model (``DDP(torch.compile(model))``, the order torch compiles) through
    :meth:`compile_for_wrapper`, and training batches go through DDP.

    If this platform cannot compile, one line on stderr says why and the plain forward
    pass is used from then on. Only the first compiled calls are guarded: once one has
    succeeded, an error is the model's own and is raised.

    Args:
        **options: passed to ``torch.compile`` (``mode="max-autotune"``,
            ``backend="eager"``, ...).
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.compiled: Any = None
        self.failed: str | None = None  # why compiling failed, once it has
        self.wrapped = False  # a wrapper (DDP) runs the compiled model for training
        self._proven = False  # a compiled call has succeeded: errors are the model's own
        self._source: torch.nn.Module | None = None

    @hookimpl(tryfirst=True)  # a plain one, so after the device plugin placed the model
    def on_fit_begin(self, learner: Learner) -> None:
        self.prepare(learner)

    def on_predict_begin(self, learner: Learner) -> None:
        self.prepare(learner)

    def prepare(self, learner: Learner) -> None:
        """Compile ``learner.model`` (once per model; torch compiles at the first call)."""
        if self.failed is not None or learner.model is self._source:
            return
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            self._give_up("torch.compile is not supported on this platform")
            return
        self._source = learner.model
        self._proven = False
        self.compiled = torch.compile(learner.model, **self.options)

    def compile_for_wrapper(self, learner: Learner) -> torch.nn.Module:
        """The module a wrapper such as DDP should wrap: the compiled model if any.

        The wrapper's owner then runs training batches (guarding the first calls with
        :meth:`fall_back`); this plugin runs validation and prediction.
        """
        self.prepare(learner)
        self.wrapped = self.compiled is not None
        return self.compiled if self.compiled is not None else learner.model

    def fall_back(self, error: BaseException) -> bool:
        """A compiled call raised ``error``: return whether to go on without compiling.

        ``True`` (after one line on stderr) until a compiled call has succeeded;
        ``False`` after, when the error is the model's own.
        """
        if self._proven:
            return False
        self._give_up(_first_cause(error))
        return True

    def succeeded(self) -> None:
        """A compiled call has succeeded: later errors are the model's own."""
        self._proven = True

    @hookimpl(tryfirst=True)  # before the core's forward step
    def forward(self, learner: Learner, batch: Any) -> Any:
        if self.compiled is None or (self.wrapped and learner.training):
            return None  # the next forward step (the core's, or DDP's) runs
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if self._proven:
            return self.compiled(inputs)
        try:
            pred = self.compiled(inputs)
        except Exception as error:
            if not self.fall_back(error):
                raise
            return None
        self._proven = True
        return pred

    def _give_up(self, reason: str) -> None:
        self.failed = reason
        self.compiled = None
        self.wrapped = False
        print(
            f"trainloop: --compile: cannot compile here ({reason}); running without torch.compile",
            file=sys.stderr,
            flush=True,
        )


def _first_cause(error: BaseException) -> str:
    """``Type: first line`` of the exception at the root of ``error``'s chain."""
    while (cause := error.__cause__ or getattr(error, "inner_exception", None)) is not None:
        error = cause  # torch._dynamo's BackendCompilerFailed keeps it as inner_exception
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
