"""The hook contract: every event the Learner fires and every step a plugin may own.

Read this module top to bottom to know what a plugin can do. Rules that hold for all
hooks:

* Every hook receives the learner as the keyword argument ``learner``. An
  implementation declares only the arguments it uses (pluggy's rule), so
  ``def on_epoch_end(self, learner): ...`` and ``def on_epoch_end(self): ...`` are
  both valid.
* A function or method whose name starts with ``on_`` is a hook implementation even
  without the ``@hookimpl`` marker; every other hook (``forward``, ``backward``, ...)
  needs ``@hookimpl``. A name that matches no hook below is an error at registration.
* Events (``on_*``) return nothing; their order between plugins is set with
  ``@hookimpl(tryfirst=True)`` / ``@hookimpl(trylast=True)``.
* Steps (``transfer_batch``, ``forward``, ``get_target``, ``compute_loss``, ``backward``,
  ``should_step``, ``optimizer_step``, ``zero_grad``, ``iter_train_data``,
  ``reduce_tensor``, ``render_batch``) are ``firstresult`` hooks: the first
  implementation that returns something other than ``None`` owns the step. The core's
  defaults are ``trylast`` implementations, so any plugin's implementation runs before
  them. Wrap a step with ``@hookimpl(wrapper=True)`` to run code around whoever owns
  it (autocast around ``forward`` and ``compute_loss`` is done this way).
* Control flow: raise :class:`~trainloop.CancelBatch`, :class:`~trainloop.CancelEpoch`
  or :class:`~trainloop.StopFit` from any event; never return magic values.

State on the learner while ``fit`` runs: ``learner.epoch`` (0-based),
``learner.epochs`` (how many ``fit`` was asked for), ``learner.iteration`` (during a
batch, its 0-based index within the phase; once a training batch is over, the number
of this epoch's batches done), ``learner.step`` (training batches done since the start
of the run), ``learner.batch``, ``learner.pred``, ``learner.loss``,
``learner.training``, ``learner.metrics`` (the current epoch's values),
``learner.history`` (one dict per finished epoch), ``learner.run_dir`` (the run
folder, or ``None``), ``learner.config`` (the recipe's Config under the CLI),
``learner.context`` (the run's device, rank, world size and ``is_main_process``: a
:class:`~trainloop.context.RunContext`), ``learner.model`` (the bare module) and
``learner.module`` (what the forward step calls: the model as the set-up hooks placed,
compiled and wrapped it).

To end ``fit`` from a plugin, set ``learner.should_stop = True`` (checked after each
training batch and after each epoch) or raise StopFit. In ``on_epoch_end`` prefer the
flag, so that the other plugins still see the epoch end.

The order of events in ``fit`` (``[...]`` repeats, ``?`` only with validation data)::

    on_fit_begin
      [ on_epoch_begin
          on_train_begin
            [ on_batch_begin  on_backward_end  (on_step_begin  on_step_end)  on_batch_end ]
          on_train_end
          on_valid_begin?  [ on_batch_begin  on_batch_end ]?  on_valid_end?
        on_epoch_end ]
    on_fit_end

``on_step_begin``/``on_step_end`` fire only when ``should_step`` says the optimizer
steps on this batch (always, unless a plugin such as gradient accumulation says no).
``on_exception`` fires before ``on_fit_end`` when ``fit`` ends with an error.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from trainloop.context import RunContext
    from trainloop.learner import Learner
    from trainloop.manager import PluginManager
    from trainloop.run import RunConfig

PROJECT = "trainloop"
"""pluggy's project name: the prefix of the hook markers' attributes."""

hookspec: pluggy.HookspecMarker = pluggy.HookspecMarker(PROJECT)
"""Marks a hook specification (used in this module; plugins don't need it)."""

hookimpl: pluggy.HookimplMarker = pluggy.HookimplMarker(PROJECT)
"""Marks a hook implementation: ``@hookimpl``, ``@hookimpl(tryfirst=True)``,
``@hookimpl(trylast=True)`` or ``@hookimpl(wrapper=True)``. Optional on ``on_*`` events."""


# --- Command line: pytest's addoption / configure pattern ------------------------------


@hookspec
def add_options(parser: argparse.ArgumentParser, plugin_manager: PluginManager) -> None:
    """Add command-line options for ``trainloop run``.

    Called once, before the command line is parsed. Add a group named after your
    plugin so ``trainloop run RECIPE --help`` shows where each option comes from::

        group = parser.add_argument_group("tensorboard")
        group.add_argument("--tensorboard-every", type=int, default=0, metavar="N")

    Options are read back in :func:`configure` as ``config.options.tensorboard_every``.
    """


@hookspec
def configure(config: RunConfig) -> None:
    """Read your options and set up for the run; called after the command line is parsed.

    ``config.options`` holds every option, ``config.run_dir`` the run folder (created
    once the recipe has built its Learner, before ``fit``), ``config.recipe_config``
    the recipe's ``Config``, ``config.context`` the run context (filled in by
    :func:`configure_context`) and ``config.is_main_process`` whether this process
    writes files (rank 0; plugins that write files, print or log check it). This is the
    place to register a stateful plugin object that does the per-run work, only when it
    is needed::

        if config.options.tensorboard:
            config.plugin_manager.register(TensorBoardLogger(config.run_dir), "tb-logger")

    Raise :class:`~trainloop.UsageError` for a bad option value.
    """


@hookspec
def configure_context(context: RunContext, options: argparse.Namespace) -> None:
    """Fill in the run context: the first hook of ``trainloop run``, once options are parsed.

    ``context`` (a :class:`~trainloop.context.RunContext`) holds the rank, world size and
    local rank that torchrun set. The device plugin chooses ``context.device`` here from
    ``--device``; the distributed plugin, ``trylast`` because it needs the device, joins
    the process group. Everything later (the run folder, :func:`configure`, the recipe's
    ``build``, the learner) reads the context instead of another plugin's options.
    Raise :class:`~trainloop.UsageError` for a bad option value.
    """


@hookspec(firstresult=True)
def make_run_dir(
    options: argparse.Namespace, recipe_path: Path, context: RunContext
) -> Path | None:
    """Return the run folder to use when ``--out`` is not given, or ``None`` for the default.

    The default is a new ``runs/<recipe>/<timestamp>`` made with
    :func:`trainloop.run_folder.new_run_dir`, unique even for runs started in the same
    second. The distributed plugin implements this so that every process agrees on one
    folder (rank 0 makes it and tells the others). A folder made here that the run never
    uses is removed again.
    """


@hookspec
def check_run(config: RunConfig, learner: Learner) -> None:
    """The recipe has built its Learner; nothing of the run has been written yet.

    Check here everything that can fail on the user's input and needs the Learner
    (does the ``--resume`` checkpoint fit this model, may the options that changed since
    it apply): raise :class:`~trainloop.UsageError` to stop the run with the run folder
    as it was. After this hook the CLI takes the run folder's lock, creates it and
    writes ``config.json``.
    """


@hookspec
def unconfigure(config: RunConfig) -> None:
    """The run is over (whatever happened); release what :func:`configure` set up."""


# --- Setup: the model and the data, before the loop needs them -----------------------
#
# The learner runs these in this declared order, before ``on_fit_begin`` (and before
# ``validate`` or ``predict`` when ``fit`` has not run), once per model::
#
#     place_model(model)                  every plugin: move or convert it, in place
#     module = compile_model(model)       one owner: torch.compile, or nothing
#     module = wrap_model(module)         one owner: DDP or FSDP, or nothing
#     learner.module = module             what the forward step calls
#
# and at the start of each ``fit``: ``setup_data`` (split the data between processes).


@hookspec
def place_model(learner: Learner, model: torch.nn.Module) -> None:
    """Move or convert ``model`` (``learner.model``, the bare module) in place.

    The device plugin moves it to ``learner.context.device`` (and to ``channels_last``).
    Parameters keep their identity, so an optimizer made from them keeps working.
    """


@hookspec(firstresult=True)
def compile_model(learner: Learner, module: torch.nn.Module) -> torch.nn.Module | None:
    """Return a compiled version of the placed ``module``, or ``None`` to keep it.

    The device plugin's ``--compile`` returns ``torch.compile(module)`` behind a guard
    that falls back to ``module`` when this platform cannot compile.
    """


@hookspec(firstresult=True)
def wrap_model(learner: Learner, module: torch.nn.Module) -> torch.nn.Module | None:
    """Return a wrapper around ``module`` (the compiled one, if any), or ``None``.

    The distributed plugin returns DistributedDataParallel here, or, with ``--strategy
    fsdp``, the module itself sharded in place by FSDP2's ``fully_shard``. The learner
    calls the result for every forward pass (``learner.module``) and keeps
    ``learner.model`` the bare module, whose ``state_dict`` checkpoints hold (under FSDP
    its parameters are shards: :mod:`trainloop.sharded` gives the ordinary state dict).
    A wrapper that replaces the model's parameters (FSDP) makes the learner build its
    optimizer again from the optimizer factory it was given.
    """


@hookspec
def setup_data(learner: Learner) -> None:
    """``fit`` starts: replace ``learner.train_data`` or ``learner.valid_data`` for this fit.

    The distributed plugin gives each process its share here. The learner puts the
    original data back when ``fit`` ends, whatever happened. Fires before
    ``on_fit_begin``, so a resuming plugin sees the data the loop will run on.
    """


# --- Events of fit, validate and predict ----------------------------------------------


@hookspec
def on_fit_begin(learner: Learner) -> None:
    """``fit`` starts. ``learner.epoch`` is 0, ``learner.epochs`` is set.

    The model is set up by now (placed, compiled, wrapped: see :func:`place_model`) and
    the data is this process's (:func:`setup_data`). A plugin that resumes a run
    restores ``learner.epoch``, ``learner.iteration`` and ``learner.step`` here (the
    checkpoint plugin, with ``learner.load_state_dict``); ``fit`` continues from there.
    Plugins that read the restored state use ``trylast``.
    """


@hookspec
def on_fit_end(learner: Learner) -> None:
    """``fit`` is over, whatever happened: finished, stopped, or failed.

    ``learner.exception`` is the exception that ended it, or ``None`` (a
    :class:`~trainloop.StopFit` counts as a normal end).
    """


@hookspec
def on_exception(learner: Learner, exception: BaseException) -> None:
    """``fit`` is ending with ``exception`` (not a StopFit); fires before ``on_fit_end``."""


@hookspec
def on_epoch_begin(learner: Learner) -> None:
    """An epoch starts; ``learner.metrics`` is a fresh empty dict."""


@hookspec
def on_epoch_end(learner: Learner) -> None:
    """An epoch is over; ``learner.metrics`` holds ``train_loss`` and, with validation
    data, ``valid_loss`` and ``valid_<metric>``. Plugins may add keys (the lr scheduler
    adds ``lr``); implement with ``trylast`` to see every other plugin's keys. After
    this event the learner appends ``{"epoch": learner.epoch, **learner.metrics}`` to
    ``learner.history``.
    """


@hookspec
def on_train_begin(learner: Learner) -> None:
    """The training phase of an epoch starts; the model is in train mode."""


@hookspec
def on_train_end(learner: Learner) -> None:
    """The training phase is over; ``learner.metrics["train_loss"]`` is set."""


@hookspec
def on_valid_begin(learner: Learner) -> None:
    """The validation phase starts; the model is in eval mode and grads are off."""


@hookspec
def on_valid_end(learner: Learner) -> None:
    """Validation is over; ``valid_loss`` and ``valid_<metric>`` are in ``learner.metrics``."""


@hookspec
def on_batch_begin(learner: Learner) -> None:
    """A batch (training or validation) starts; ``learner.batch`` is on the device.

    ``learner.training`` tells the phases apart; ``learner.iteration`` is the batch
    index within the phase. Raise CancelBatch to skip it.
    """


@hookspec
def on_backward_end(learner: Learner) -> None:
    """Gradients of this training batch are computed; the optimizer has not stepped."""


@hookspec
def on_step_begin(learner: Learner) -> None:
    """The optimizer is about to step: the place to unscale, clip or inspect gradients.

    Fires only on batches where the optimizer steps (see :func:`should_step`).
    """


@hookspec
def on_step_end(learner: Learner) -> None:
    """The optimizer has stepped; gradients are not yet zeroed.

    ``learner.step`` still counts the batches done before this one: it goes up once the
    batch is over, after ``on_batch_end``.
    """


@hookspec
def on_batch_end(learner: Learner) -> None:
    """A batch is over (also after CancelBatch). ``learner.pred`` and ``learner.loss``
    hold this batch's values (``learner.loss`` is a tensor: call ``.item()`` only when
    you need the number, since that waits for the device)."""


@hookspec
def on_predict_begin(learner: Learner) -> None:
    """``predict`` starts; the model is in eval mode and grads are off."""


@hookspec
def on_predict_batch_end(learner: Learner, batch: Any, pred: Any) -> None:
    """One batch of ``predict`` is done: ``pred`` is the model output for ``batch``.

    Stream it to disk here (the predictions plugin does) so that predictions never
    accumulate in memory.
    """


@hookspec
def on_predict_end(learner: Learner) -> None:
    """``predict`` is over (also when it failed: check ``learner.exception``)."""


# --- Checkpoints: each plugin puts its own state in and takes it out -------------------


@hookspec
def on_save_checkpoint(learner: Learner, checkpoint: dict[str, Any]) -> None:
    """A checkpoint is being written: add your state under a key of your own.

    Values must load with ``torch.load(weights_only=True)``: tensors, numbers,
    strings, lists, tuples and dicts of them.
    """


@hookspec
def on_load_checkpoint(learner: Learner, checkpoint: dict[str, Any]) -> None:
    """A checkpoint was read (on resume): restore your state from your own key."""


@hookspec(firstresult=True)
def save_checkpoint(learner: Learner, name: str) -> Any:
    """Write a checkpoint called ``name`` now (for example ``"interrupt"``); return its path.

    The checkpoint plugin implements it; the Ctrl-C plugin calls it. Returns ``None``
    when no plugin writes checkpoints.
    """


# --- Steps with one owner (firstresult; the core's defaults run last) -----------------


@hookspec(firstresult=True)
def transfer_batch(learner: Learner, batch: Any) -> Any:
    """Return ``batch`` moved to where the model is. The core's default returns it as is."""


@hookspec(firstresult=True)
def iter_train_data(learner: Learner) -> Iterator[Any] | None:
    """Return the iterator of this epoch's training batches.

    The default is ``iter(learner.train_data)``. When ``fit`` starts mid-epoch
    (``learner.iteration > 0`` after a resume), the returned iterator must already
    be past the first ``learner.iteration`` batches. Return ``None`` to leave it to
    the next implementation.
    """


@hookspec(firstresult=True)
def forward(learner: Learner, batch: Any) -> Any:
    """Return the model's output for ``batch``.

    The default calls ``learner.model(inputs)`` where ``inputs`` is ``batch[0]`` for a
    tuple or list batch and ``batch`` itself otherwise.
    """


@hookspec(firstresult=True)
def get_target(learner: Learner, batch: Any) -> Any:
    """Return the target in ``batch``, for the default loss and for the metrics.

    The default is ``batch[1]`` for a tuple or list batch and ``None`` otherwise;
    implement it for batches of another shape (``return batch["label"]``).
    """


@hookspec(firstresult=True)
def compute_loss(learner: Learner, pred: Any, batch: Any) -> torch.Tensor:
    """Return the loss for ``pred``: by default ``learner.loss_func(pred, target)`` with the
    target from :func:`get_target`."""


@hookspec(firstresult=True)
def backward(learner: Learner, loss: torch.Tensor) -> bool:
    """Compute gradients of ``loss``; return ``True`` when done. Default: ``loss.backward()``."""


@hookspec(firstresult=True)
def should_step(learner: Learner) -> bool:
    """Return whether the optimizer steps after this batch. Default: ``True``.

    Gradient accumulation answers ``False`` on all but every N-th batch.
    """


@hookspec(firstresult=True)
def optimizer_step(learner: Learner) -> bool:
    """Step the optimizer; return ``True`` when done. Default: ``learner.optimizer.step()``."""


@hookspec(firstresult=True)
def zero_grad(learner: Learner) -> bool:
    """Reset the gradients; return ``True`` when done.

    Default: ``learner.optimizer.zero_grad(set_to_none=True)``.
    """


@hookspec(firstresult=True)
def reduce_tensor(learner: Learner, tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` summed over all processes. The default returns it as is.

    The learner sums its validation totals through this hook, so metrics are global
    under distributed training.
    """


@hookspec(firstresult=True)
def render_batch(learner: Learner, batch: Any, pred: Any) -> dict[str, torch.Tensor] | None:
    """Turn a validation batch and its prediction into pictures, for image loggers.

    Return ``{"name": image}`` with each image a ``3 x H x W`` float tensor in
    ``[0, 1]`` (for instance image | truth | prediction side by side), or ``None`` if
    your task has nothing to show. The tensorboard plugin calls this; it knows nothing
    about the task.
    """


def event_names() -> Iterable[str]:
    """Names of the events (hooks starting with ``on_``), in the order they are defined."""
    return [name for name in globals() if name.startswith("on_")]
