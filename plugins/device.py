"""device: put the model and every batch on a device; channels_last; torch.compile.

See docs/plugins/device.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import torch

from trainloop import Learner, RunConfig, UsageError, hookimpl
from trainloop.context import RunContext, gpu_of_local_rank


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
def configure_context(context: RunContext, options: argparse.Namespace) -> None:
    local_rank = context.local_rank if context.distributed else None
    context.device = resolve_device(options.device, local_rank=local_rank)


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    device = config.context.device
    if device.type != "cpu" or options.channels_last:
        plugin = Device(device, channels_last=options.channels_last)
        config.plugin_manager.register(plugin, "device.placement")
    if options.compile:
        config.plugin_manager.register(Compile(), "device.compile")


def resolve_device(
    name: str | torch.device = "auto", local_rank: int | None = None
) -> torch.device:
    """The ``torch.device`` that ``--device NAME`` means on this machine.

    ``"auto"`` is CUDA when available (the current CUDA device), else MPS, else CPU.
    With ``local_rank`` (one process of several on this machine, under torchrun),
    ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``: one GPU per process. Raises
    :class:`~trainloop.UsageError`, naming ``--device``, for a value that is not a
    device or a device this machine does not have.
    """
    if local_rank is not None and (gpu := gpu_of_local_rank(str(name), local_rank)) is not None:
        return gpu
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
    """Places the model on ``device`` when it is set up and moves every batch there.

    Args:
        device: a ``torch.device`` or its name; ``"auto"`` picks CUDA, else MPS, else CPU.
        channels_last: use the ``channels_last`` memory format for the model and for
            4-D batch tensors.
    """

    def __init__(self, device: torch.device | str = "auto", channels_last: bool = False) -> None:
        self.device = resolve_device(device)
        self.channels_last = channels_last
        self._to_cuda = self.device.type == "cuda"

    @hookimpl
    def place_model(self, learner: Learner, model: torch.nn.Module) -> None:
        learner.context.device = self.device
        if self._to_cuda:
            torch.cuda.set_device(self.device)
        # Module.to moves the parameters in place, so the optimizer keeps working on them.
        if self.channels_last:
            model.to(self.device, memory_format=torch.channels_last)
        else:
            model.to(self.device)

    @hookimpl
    def transfer_batch(self, batch: Any) -> Any:
        return _move(batch, self.device, self._to_cuda, self.channels_last)


class Compile:
    """Runs the forward pass through ``torch.compile``: the ``compile_model`` set-up step.

    ``learner.model`` stays the original module (clean checkpoint keys); the learner
    calls the :class:`CompiledModule` this returns (or the wrapper around it, such as
    DDP). If this platform cannot compile, one line on stderr says why and the plain
    forward pass is used from then on.

    Args:
        **options: passed to ``torch.compile`` (``mode="max-autotune"``,
            ``backend="eager"``, ...).
    """

    def __init__(self, **options: Any) -> None:
        self.options = options

    @hookimpl
    def compile_model(self, module: torch.nn.Module) -> torch.nn.Module | None:
        import torch._dynamo  # only when asked: it takes a second to import

        if not torch._dynamo.is_dynamo_supported():
            _say_cannot_compile("torch.compile is not supported on this platform")
            return None
        return CompiledModule(module, **self.options)


class CompiledModule(torch.nn.Module):
    """``torch.compile(module)``, falling back to ``module`` if its first calls fail.

    Only the first compiled calls are guarded: once one has succeeded, an error is the
    model's own and is raised. Holds ``module`` itself as ``self.module``, so its
    parameters are this module's (a wrapper such as DDP finds them).

    Attributes:
        failed: why compiling failed, once it has; ``None`` while it works.
    """

    def __init__(self, module: torch.nn.Module, **options: Any) -> None:
        super().__init__()
        self.module = module
        self.failed: str | None = None
        self._proven = False  # a compiled call has succeeded: errors are the model's own
        # Kept out of the submodules: its parameters are ``module``'s, found once.
        self.__dict__["compiled"] = torch.compile(module, **options)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            return self.module(*args, **kwargs)
        if self._proven:
            return self.compiled(*args, **kwargs)
        try:
            result = self.compiled(*args, **kwargs)
        except Exception as error:
            self.failed = _first_cause(error)
            _say_cannot_compile(self.failed)
            return self.module(*args, **kwargs)
        self._proven = True
        return result


def _say_cannot_compile(reason: str) -> None:
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
