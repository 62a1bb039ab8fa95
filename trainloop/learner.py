"""The Learner: the training loop, and the events it fires. Everything else is a plugin."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from trainloop import context as run_context
from trainloop.context import RunContext
from trainloop.errors import CancelBatch, CancelEpoch, StopFit, UsageError
from trainloop.hookspecs import event_names, hookimpl
from trainloop.manager import PluginManager

Metric = Callable[[Any, Any], Any]
_STEP_HOOKS = (
    "transfer_batch",
    "iter_train_data",
    "forward",
    "get_target",
    "compute_loss",
    "backward",
    "should_step",
    "optimizer_step",
    "zero_grad",
    "reduce_tensor",
)
_NO_CANCEL = ()  # an except clause with an empty tuple catches nothing
_BEGIN_END = {  # built once: no string formatting on the per-batch path
    level: (f"on_{level}_begin", f"on_{level}_end")
    for level in ("epoch", "train", "valid", "batch")
}


class Learner:
    """Trains ``model`` on ``train_data`` and fires a hook event at every step.

    Example::

        learn = Learner(model, train_data, valid_data, loss_func=F.nll_loss,
                        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
                        metrics=(accuracy,), plugins=(MyPlugin(),))
        history = learn.fit(3)        # one dict per epoch
        learn.validate()              # {"valid_loss": ..., "valid_accuracy": ...}

    Args:
        model: the module to train.
        train_data: an iterable of batches, e.g. a DataLoader of ``(inputs, target)``.
        valid_data: batches to compute ``valid_loss`` and the metrics on each epoch.
        loss_func: ``loss_func(pred, target) -> scalar tensor``.
        optimizer: an Optimizer, or a callable that makes one from the model's
            parameters (such as ``functools.partial(torch.optim.SGD, lr=0.01)``).
        metrics: callables ``metric(pred, target) -> scalar`` giving the batch mean;
            each is reported as ``valid_<name>`` with ``name = metric.__name__``; the
            target comes from the ``get_target`` step (``batch[1]`` by default),
            averaged over samples (so an uneven last batch counts for what it holds).
        plugins: plugin objects (instances, or modules with hook functions).
        run_dir: the run folder plugins write into, if any (the CLI sets it).
        plugin_manager: a :class:`~trainloop.PluginManager` to use instead of a new one.
            Under ``trainloop run`` the default is the run's own manager, so the
            recipe's plugins and the run's are registered in one place.
        context: the run context (device, rank, world size); the default is the
            run's under ``trainloop run``, else one made from torchrun's variables.

    Attributes:
        epoch: the current epoch, from 0. ``epochs``: how many ``fit`` was asked for.
        iteration: during a batch, its index in the phase; after a training batch,
            how many of the epoch's batches are done.
        step: training batches done since the run started.
        batch, pred, loss: the current batch (on the device), the model's output, the
            loss tensor.
        training: whether the current phase trains.
        metrics: the current epoch's values (``train_loss``, ``valid_loss``, ...).
        history: one dict per finished epoch, ``{"epoch": ..., **metrics}``.
        should_stop: set it to end ``fit`` after the current batch or epoch.
        exception: what ended the last ``fit`` or ``predict``, or ``None``.
        run_dir, config: the run folder and the recipe's Config (set by the CLI).
        context: the run context: ``context.device``, ``context.rank``,
            ``context.world_size``, ``context.is_main_process``.
        model: the bare module, as given: checkpoints hold its ``state_dict``.
        module: what the forward step calls: ``model`` as the set-up hooks placed,
            compiled and wrapped it (see :meth:`setup`); ``model`` until then.
        hook: the plugin manager's hook relay, to call hooks from a plugin.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_data: Iterable[Any],
        valid_data: Iterable[Any] | None = None,
        loss_func: Callable[..., torch.Tensor] = torch.nn.functional.nll_loss,
        optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] = (
            functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
        ),
        metrics: Sequence[Metric] = (),
        plugins: Iterable[Any] = (),
        run_dir: str | Path | None = None,
        plugin_manager: PluginManager | None = None,
        context: RunContext | None = None,
    ) -> None:
        run = run_context.current()  # the CLI's run, while the recipe builds its Learner
        self.model = model
        self.module: torch.nn.Module = model
        self.train_data = train_data
        self.valid_data = valid_data
        self.loss_func = loss_func
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
            self._make_optimizer = None
        else:
            self.optimizer = optimizer(model.parameters())
            self._make_optimizer = optimizer
        self.context = context or (run[0] if run else RunContext.from_environment())
        self._set_up_for: torch.nn.Module | None = None
        self.metric_funcs = tuple(metrics)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config: Any = None  # the recipe's Config when run from the CLI

        self.epoch = 0
        self.epochs = 0
        self.iteration = 0
        self.step = 0
        self.training = False
        self.batch: Any = None
        self.pred: Any = None
        self.loss: torch.Tensor | None = None
        self.metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.exception: BaseException | None = None
        self.should_stop = False  # set it from a plugin to end fit after the current batch
        self._train_losses: list[tuple[torch.Tensor, int]] = []
        self._shared_losses: tuple[float, float] | None = None  # see share_train_losses
        self._ending: str | None = None  # the level whose end event is firing

        self.plugin_manager = plugin_manager or (run[1] if run else PluginManager())
        self.hook = self.plugin_manager.hook
        if not self.plugin_manager.has_plugin("core"):  # one for every learner of a manager
            self.plugin_manager.register(_CoreSteps(), "core", origin="core")
        self._core = self.plugin_manager.get_plugin("core")
        for plugin in plugins:
            self.add_plugin(plugin)
        self.plugin_manager.add_listener(self._refresh_hooks)
        self._refresh_hooks()

    # --- plugins -----------------------------------------------------------------------

    def add_plugin(self, plugin: Any, name: str | None = None, origin: str = "api") -> str | None:
        """Register ``plugin`` with this learner's plugin manager; return its name."""
        return self.plugin_manager.register(plugin, name, origin=origin)

    def _refresh_hooks(self) -> None:
        # The per-batch path must cost nothing for events nobody implements, and a step
        # only the core implements is called directly rather than through pluggy.
        hook = self.plugin_manager.hook
        self._events = {
            name: caller
            for name in event_names()
            if (caller := getattr(hook, name)).get_hookimpls()
        }
        for step in _STEP_HOOKS:
            caller = getattr(hook, step)
            only_core = all(impl.plugin is self._core for impl in caller.get_hookimpls())
            setattr(self, f"_{step}", getattr(self._core, step) if only_core else caller)

    def _fire(self, event: str) -> None:
        caller = self._events.get(event)
        if caller is not None:
            caller(learner=self)

    def _with_events(
        self,
        body: Callable[[], None],
        event: str,
        cancel: type[BaseException] | tuple[()],
        final: Callable[[], None] | None = None,
    ) -> None:
        """Fire ``on_<event>_begin``, run ``body``, fire ``on_<event>_end``.

        A ``cancel`` exception skips the rest of ``body`` only. ``final`` runs once the
        end event has fired, even when that event raised (StopFit, say); any other
        exception from ``body`` skips both.
        """
        begin, end = _BEGIN_END[event]
        self._fire(begin)
        try:
            body()
        except cancel:
            pass
        self._ending = event  # for state_dict: the batch or epoch counts as done now
        try:
            self._fire(end)
        finally:
            self._ending = None
            if final is not None:
                final()

    # --- set-up ------------------------------------------------------------------------

    def setup(self) -> torch.nn.Module:
        """Place, compile and wrap the model, once per model; return ``learner.module``.

        Runs the set-up hooks in their declared order (``place_model``, then
        ``compile_model``, then ``wrap_model``, each given what the one before
        produced). ``fit``, ``validate`` and ``predict`` call it; call it yourself to
        set up before them. When a wrapper replaced the model's parameters (FSDP), the
        optimizer is made again from the factory the learner was given.
        """
        if self._set_up_for is self.model:
            return self.module
        before = [id(parameter) for parameter in self.model.parameters()]
        self.hook.place_model(learner=self, model=self.model)
        module = self.model
        module = self.hook.compile_model(learner=self, module=module) or module
        module = self.hook.wrap_model(learner=self, module=module) or module
        self.module = module
        self._set_up_for = self.model
        if [id(parameter) for parameter in self.model.parameters()] != before:
            if self._make_optimizer is None:
                raise UsageError(
                    "the model's parameters were replaced while it was set up (FSDP does "
                    "this): give the Learner an optimizer factory, such as "
                    "functools.partial(torch.optim.SGD, lr=0.01), not an Optimizer"
                )
            self.optimizer = self._make_optimizer(self.model.parameters())
        return module

    # --- fit ---------------------------------------------------------------------------

    def fit(self, epochs: int) -> list[dict[str, float]]:
        """Train for ``epochs`` epochs (counted from 0; a resuming plugin may start later).

        Returns ``learner.history``: one dict per epoch with ``epoch`` and the metrics.
        ``on_fit_end`` fires whatever happens; errors are re-raised after it.
        """
        self.epochs = epochs
        self.epoch = self.iteration = self.step = 0
        self.history = []
        self.exception = None
        self.should_stop = False
        self._train_losses, self._shared_losses = [], None
        data = (self.train_data, self.valid_data)
        try:
            self.setup()
            self.hook.setup_data(learner=self)
            self._fire("on_fit_begin")
            while self.epoch < self.epochs:
                self.metrics = {}
                self._with_events(self._run_epoch, "epoch", CancelEpoch, self._record_epoch)
                self.epoch += 1
                self.iteration = 0
                if self.should_stop:
                    break
        except StopFit:
            # Every process stops after the same batch (the interrupt plugin agrees on
            # it): the checkpoint of the stop, which one process writes, gets the run's
            # losses of the epoch so far.
            if self.iteration:
                self.share_train_losses()
        except BaseException as error:
            self.exception = error
            self._report_plugin(error)
            self._fire_exception(error)
            raise
        finally:
            try:
                self._fire("on_fit_end")
            finally:
                self.train_data, self.valid_data = data  # what setup_data replaced
        return self.history

    def _record_epoch(self) -> None:
        self.history.append({"epoch": self.epoch, **self.metrics})

    def _run_epoch(self) -> None:
        self._with_events(self._run_train, "train", _NO_CANCEL)
        if self.valid_data is not None:
            self._run_valid(self.valid_data)

    def _run_train(self) -> None:
        self.training = True
        self.module.train()
        batches = self._iter_train_data(learner=self)
        first = self.iteration
        try:
            for batch in batches:
                self.batch = self._transfer_batch(learner=self, batch=batch)
                try:
                    self._with_events(self._train_batch, "batch", CancelBatch)
                except StopFit:  # the batch is over, like a CancelBatch, and so is fit
                    self.should_stop = True
                # From here on ``iteration`` counts this epoch's finished batches, which
                # is where a run stopped now (StopFit, Ctrl-C) must resume.
                self.iteration += 1
                self.step += 1
                if self.should_stop:
                    raise StopFit
        except CancelEpoch:
            self._finish_train()
            raise
        finally:
            # A traceback kept on learner.exception must not keep a DataLoader iterator
            # (and its worker processes) alive.
            batches = None
        if self.iteration == first == 0:
            raise UsageError("the training data yielded no batches: is the dataset empty?")
        self._finish_train()

    def _finish_train(self) -> None:
        self.iteration = 0
        self.metrics["train_loss"] = self._mean_train_loss()

    def _train_batch(self) -> None:
        batch = self.batch
        self.pred = self._forward(learner=self, batch=batch)
        self.loss = self._compute_loss(learner=self, pred=self.pred, batch=batch)
        # Kept on the device and reduced once per epoch: no per-batch sync.
        self._train_losses.append((self.loss.detach(), batch_size(batch)))
        self._backward(learner=self, loss=self.loss)
        self._fire("on_backward_end")
        if self._should_step(learner=self):
            self._fire("on_step_begin")
            self._optimizer_step(learner=self)
            self._fire("on_step_end")
            self._zero_grad(learner=self)

    def _mean_train_loss(self) -> float:
        shared, self._shared_losses = self._shared_losses, None
        total, count = self._train_loss_totals()
        if shared is not None:
            total, count = total + shared[0], count + shared[1]
        return total / count if count else float("nan")

    def _train_loss_totals(self) -> tuple[float, float]:
        """The sum of this epoch's kept training losses (each times its batch size) and
        of their batch sizes, over all the processes; the kept losses are consumed."""
        losses, self._train_losses = self._train_losses, []
        if not losses:
            if self.context.distributed:  # every process takes part in the reduction
                zero = torch.zeros(2, device=self.context.device)
                return tuple(self._reduce_tensor(learner=self, tensor=zero).tolist())
            return 0.0, 0.0
        values = torch.stack([loss for loss, _ in losses]).float()  # one op, not one per batch
        sizes = torch.tensor([size for _, size in losses], device=values.device)
        totals = torch.stack([(values * sizes).sum(), sizes.sum().float()])
        total, count = self._reduce_tensor(learner=self, tensor=totals).tolist()
        return total, count

    def share_train_losses(self) -> None:
        """Under distributed training, replace each process's training losses of the
        epoch so far with the run's: their sum over all the processes, kept alike by
        every process (and in :meth:`state_dict`).

        A collective: every process must call it after the same batch. A plugin that
        writes a mid-epoch checkpoint from one process calls it on all of them first, so
        that a resume's ``train_loss`` counts every process's batches before the stop,
        not only the writer's. Nothing to do in a single process.
        """
        if not self.context.distributed:
            return
        total, count = self._train_loss_totals()
        if self._shared_losses is not None:
            total, count = total + self._shared_losses[0], count + self._shared_losses[1]
        self._shared_losses = (total, count) if count else None

    # --- validate ----------------------------------------------------------------------

    def validate(self, data: Iterable[Any] | None = None) -> dict[str, float]:
        """Compute ``valid_loss`` and the metrics on ``data`` (default: ``valid_data``).

        Fires ``on_valid_begin``, ``on_batch_begin``/``on_batch_end`` per batch and
        ``on_valid_end``; returns the ``valid_*`` values (also put in
        ``learner.metrics``).
        """
        data = self.valid_data if data is None else data
        if data is None:
            raise ValueError("validate() needs data: pass it, or give the Learner valid_data")
        self._run_valid(data)
        return {key: value for key, value in self.metrics.items() if key.startswith("valid_")}

    def _run_valid(self, data: Iterable[Any]) -> None:
        self.setup()  # validate() without fit
        self.training = False
        self.module.eval()
        totals: list[torch.Tensor] = []
        sizes: list[int] = []

        def run_batches() -> None:
            seen = 0
            with torch.no_grad():
                for seen, batch in enumerate(data, start=1):
                    self.iteration = seen - 1
                    self.batch = self._transfer_batch(learner=self, batch=batch)
                    self._with_events(
                        functools.partial(self._valid_batch, totals, sizes), "batch", CancelBatch
                    )
            if seen == 0:
                raise UsageError("the validation data yielded no batches: is the dataset empty?")
            self.iteration = 0
            # the metrics are in learner.metrics before on_valid_end fires
            self.metrics.update(self._summarise_valid(totals, sizes))

        self._with_events(run_batches, "valid", _NO_CANCEL)

    def _summarise_valid(self, totals: list[torch.Tensor], sizes: list[int]) -> dict[str, float]:
        names = ["valid_loss"] + [f"valid_{metric.__name__}" for metric in self.metric_funcs]
        if totals:
            weights = torch.tensor(sizes, device=totals[0].device, dtype=torch.float32)
            weighted = (torch.stack(totals) * weights[:, None]).sum(dim=0)
            local = torch.cat([weighted, weights.sum()[None]])
        else:  # every batch cancelled here; the sum over processes must still happen
            local = torch.zeros(len(names) + 1)
        summed = self._reduce_tensor(learner=self, tensor=local).tolist()
        count = summed[-1]
        if count == 0:
            return dict.fromkeys(names, float("nan"))
        return {name: value / count for name, value in zip(names, summed)}

    def _valid_batch(self, totals: list[torch.Tensor], sizes: list[int]) -> None:
        batch = self.batch
        self.pred = self._forward(learner=self, batch=batch)
        self.loss = self._compute_loss(learner=self, pred=self.pred, batch=batch)
        target = self._get_target(learner=self, batch=batch)
        values = [self.loss.detach().float().reshape(())]
        for metric in self.metric_funcs:
            value = torch.as_tensor(metric(self.pred, target), device=values[0].device)
            values.append(value.detach().float().reshape(()))
        totals.append(torch.stack(values))
        sizes.append(batch_size(batch))

    # --- predict -----------------------------------------------------------------------

    def predict(self, data: Iterable[Any], keep: bool = True) -> Any:
        """Run the model over ``data`` and fire the predict events.

        ``on_predict_batch_end(batch, pred)`` fires for each batch, so a plugin can
        stream predictions to disk. With ``keep=True`` the predictions are also
        returned (concatenated when they are tensors); use ``keep=False`` to hold none
        in memory.
        """
        self.setup()
        self.training = False
        self.module.eval()
        self.exception = None
        kept: list[Any] = []
        caller = self._events.get("on_predict_batch_end")
        try:
            self._fire("on_predict_begin")
            with torch.no_grad():
                for self.iteration, batch in enumerate(data):
                    self.batch = self._transfer_batch(learner=self, batch=batch)
                    self.pred = self._forward(learner=self, batch=self.batch)
                    if caller is not None:
                        caller(learner=self, batch=self.batch, pred=self.pred)
                    if keep:
                        kept.append(self.pred)
        except BaseException as error:
            self.exception = error
            self._report_plugin(error)
            raise
        finally:
            self.iteration = 0
            self._fire("on_predict_end")
        if not keep:
            return None
        if kept and all(isinstance(pred, torch.Tensor) for pred in kept):
            return torch.cat(kept)
        return kept

    # --- state for checkpoints ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loop's own state as a point to resume from: where ``fit`` would go on.

        Counters, history and the epoch's partial train loss. Called from
        ``on_batch_end`` of a training batch, that batch counts as done; from
        ``on_epoch_end``, the epoch counts as done (its record is in ``history``); once
        ``fit`` stopped after recording an epoch, the next epoch is where it goes on.
        So a plugin can save a resume point from any event without knowing how the
        loop counts.
        """
        epoch, iteration, step = self.epoch, self.iteration, self.step
        history = list(self.history)
        losses = self._train_losses
        if self._ending == "batch" and self.training:
            iteration, step = iteration + 1, step + 1
        elif self._ending == "epoch":
            history.append({"epoch": epoch, **self.metrics})
            epoch, iteration, losses = epoch + 1, 0, []
        elif iteration == 0 and history and history[-1].get("epoch") == epoch:
            epoch += 1  # stopped in on_epoch_end: that epoch is over and recorded
        return {
            "epoch": epoch,
            "iteration": iteration,
            "step": step,
            "history": history,
            "train_losses": torch.stack([loss.float() for loss, _ in losses]).cpu()
            if losses
            else torch.zeros(0),
            "train_sizes": [size for _, size in losses],
            # The run's losses so far over all the processes (share_train_losses).
            "shared_train_loss": None if self._ending == "epoch" else self._shared_losses,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a resuming plugin calls this)."""
        self.epoch = int(state["epoch"])
        self.iteration = int(state["iteration"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        # Beside the losses still to come, which are computed where the model is: the
        # epoch end stacks them all (a checkpoint holds them on the CPU).
        device = next(self.model.parameters(), torch.empty(0)).device
        losses = state["train_losses"].to(device)
        self._train_losses = list(zip(losses, state["train_sizes"]))
        shared = state.get("shared_train_loss")
        self._shared_losses = None if shared is None else (float(shared[0]), float(shared[1]))

    # --- errors ------------------------------------------------------------------------

    def _fire_exception(self, error: BaseException) -> None:
        caller = self._events.get("on_exception")
        if caller is not None:
            caller(learner=self, exception=error)

    def _report_plugin(self, error: BaseException) -> None:
        where = self.plugin_manager.describe_exception(error)
        if where and hasattr(error, "add_note"):
            notes = getattr(error, "__notes__", ())
            if where not in notes:
                error.add_note(where)


class _CoreSteps:
    """The core's default steps, registered as the plugin ``core``.

    Each is ``trylast``, so any plugin that implements the same hook runs first.
    """

    @hookimpl(trylast=True)
    def transfer_batch(self, learner: Learner, batch: Any) -> Any:
        return batch

    @hookimpl(trylast=True)
    def iter_train_data(self, learner: Learner) -> Iterator[Any]:
        batches = iter(learner.train_data)
        if learner.iteration:
            batches = itertools.islice(batches, learner.iteration, None)
        return batches

    @hookimpl(trylast=True)
    def forward(self, learner: Learner, batch: Any) -> Any:
        return learner.module(batch[0] if isinstance(batch, (tuple, list)) else batch)

    @hookimpl(trylast=True)
    def get_target(self, learner: Learner, batch: Any) -> Any:
        return target_of(batch)

    @hookimpl(trylast=True)
    def compute_loss(self, learner: Learner, pred: Any, batch: Any) -> torch.Tensor:
        return learner.loss_func(pred, learner._get_target(learner=learner, batch=batch))

    @hookimpl(trylast=True)
    def backward(self, learner: Learner, loss: torch.Tensor) -> bool:
        loss.backward()
        return True

    @hookimpl(trylast=True)
    def should_step(self, learner: Learner) -> bool:
        return True

    @hookimpl(trylast=True)
    def optimizer_step(self, learner: Learner) -> bool:
        learner.optimizer.step()
        return True

    @hookimpl(trylast=True)
    def zero_grad(self, learner: Learner) -> bool:
        learner.optimizer.zero_grad(set_to_none=True)
        return True

    @hookimpl(trylast=True)
    def reduce_tensor(self, learner: Learner, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def target_of(batch: Any) -> Any:
    """The target of a batch: ``batch[1]`` for ``(inputs, target, ...)``, else ``None``."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    return None


def batch_size(batch: Any) -> int:
    """How many samples ``batch`` holds: the length of its first tensor."""
    if type(batch) is tuple and batch and type(batch[0]) is torch.Tensor and batch[0].dim():
        return len(batch[0])  # the common ``(inputs, target)`` case, on the per-batch path
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.dim() else 1
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size(next(iter(batch.values())))
    return 1
