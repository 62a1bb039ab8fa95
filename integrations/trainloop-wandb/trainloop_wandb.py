"""trainloop-wandb: a run's config, metrics and files, logged to Weights & Biases."""

from __future__ import annotations

import argparse
import netrc
import os
import shutil
import sys
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import trainloop
from trainloop import Learner, RunConfig, UsageError, hookimpl
from trainloop.tracking import flat_params, git_commit, metric_value, run_params

CHECKPOINT_KEY = "wandb"
LOGGER_NAME = "wandb.logger"
STEP = "batch/step"
STEP_LOSS = "batch/train_loss"
MODES = ("online", "offline", "disabled")
INSTALL = "pip install wandb"


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("wandb")
    group.add_argument(
        "--wandb",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log the run to Weights & Biases (default: on when --wandb-project or "
        "WANDB_PROJECT names a project)",
    )
    group.add_argument(
        "--wandb-project", default=None, metavar="NAME", help="project (default: $WANDB_PROJECT)"
    )
    group.add_argument(
        "--wandb-entity",
        default=None,
        metavar="NAME",
        help="team or user (default: $WANDB_ENTITY, else your default entity)",
    )
    group.add_argument(
        "--wandb-mode",
        choices=MODES,
        default=None,
        help="online: sync as it runs; offline: write RUN_DIR/wandb/ for 'wandb sync' "
        "later; disabled: log nothing (default: $WANDB_MODE, else online)",
    )
    group.add_argument(
        "--wandb-run-name",
        default=None,
        metavar="NAME",
        help="run name (default: the run folder's name)",
    )
    group.add_argument(
        "--wandb-every",
        type=int,
        default=0,
        metavar="N",
        help="also log the training loss every N batches as batch/train_loss; each "
        "costs a device sync (default: 0, off)",
    )
    group.add_argument(
        "--wandb-model-file",
        action="store_true",
        help="upload model.pt with the run folder's files at the end",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    if options.wandb_every < 0:
        raise UsageError(f"--wandb-every {options.wandb_every}: give 0 (off) or more")
    project = options.wandb_project or os.environ.get("WANDB_PROJECT") or None
    enabled = options.wandb if options.wandb is not None else project is not None
    if not enabled:
        return
    mode = options.wandb_mode or os.environ.get("WANDB_MODE") or "online"
    if mode == "dryrun":  # W&B's old name for offline
        mode = "offline"
    if mode not in MODES:
        raise UsageError(f"WANDB_MODE={mode}: use one of {', '.join(MODES)}")
    try:
        import wandb  # noqa: F401  (checked now: the run must not fail at its first epoch)
    except ImportError:
        raise UsageError(f"the wandb plugin needs the wandb package: {INSTALL}") from None
    if mode == "online" and not has_credentials():
        raise UsageError(
            "--wandb-mode online needs W&B credentials: set WANDB_API_KEY or run "
            "'wandb login' (or log with --wandb-mode offline and 'wandb sync' later)"
        )
    if not config.is_main_process:  # one W&B run, logged by rank 0
        return
    logger = WandbLogger(
        project=project or config.recipe_name,
        entity=options.wandb_entity or os.environ.get("WANDB_ENTITY") or None,
        mode=mode,
        run_name=options.wandb_run_name or config.run_dir.name,
        every=options.wandb_every,
        params={**run_params(config), "recipe": str(config.recipe_path)},
        tags=[config.recipe_name],
        model_file=options.wandb_model_file,
        finish_at_fit_end=False,  # after predict, in unconfigure: the submission goes too
    )
    config.plugin_manager.register(logger, LOGGER_NAME)


@hookimpl
def unconfigure(config: RunConfig) -> None:
    logger = config.plugin_manager.get_plugin(LOGGER_NAME)
    if logger is not None:
        logger.finish()


class WandbLogger:
    """Logs ``fit`` to one W&B run: the config, each epoch's metrics, the run's files.

    ``wandb`` sends in a background process, so logging an epoch does not wait for the
    network. If the run cannot be started (``wandb.init`` fails), that is one warning
    line; the start is retried at each epoch end with everything logged so far, and the
    count of failures is printed when ``fit`` ends. Training never stops for it.

    Args:
        project: the W&B project.
        entity: the team or user (``None``: your default entity).
        mode: ``"online"``, ``"offline"`` (files in ``RUN_DIR/wandb/`` for ``wandb
            sync``) or ``"disabled"``.
        run_name: the run's display name.
        every: also log ``batch/train_loss`` every ``every`` training batches (0: off).
        params: the run's config (default: ``learner.config``, flattened).
        tags: the run's tags.
        model_file: also upload ``model.pt`` from the run folder.
        finish_at_fit_end: end the W&B run when ``fit`` ends; with ``False``, call
            :meth:`finish` (the command line does, after ``predict``).

    Attributes:
        run_id: the W&B run id (chosen up front; a resumed run keeps it).
        run: the ``wandb`` run while it is open, else ``None``.
        failures: how many times starting or writing to the run failed.
    """

    def __init__(
        self,
        project: str = "trainloop",
        entity: str | None = None,
        mode: str = "online",
        run_name: str | None = None,
        every: int = 0,
        params: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        model_file: bool = False,
        finish_at_fit_end: bool = True,
    ) -> None:
        if every < 0:
            raise ValueError(f"WandbLogger(every={every}): use 0 or more")
        if mode not in MODES:
            raise ValueError(f"WandbLogger(mode={mode!r}): use one of {', '.join(MODES)}")
        self.project = project
        self.entity = entity
        self.mode = mode
        self.run_name = run_name
        self.every = every
        self.params = params
        self.tags = list(tags or [])
        self.model_file = model_file
        self.finish_at_fit_end = finish_at_fit_end
        self.run_id = uuid.uuid4().hex[:8]
        self.run: Any = None
        self.failures = 0
        self._resumed = False
        self._errors: tuple[type[BaseException], ...] = ()
        self._pending: list[dict[str, Any]] = []
        self._saved: dict[Path, tuple[int, int]] = {}
        self._run_dir: Path | None = None
        self._config: dict[str, Any] = {}
        self._exit_code = 0
        self._step_logger = _StepLoss(self) if every else None

    # --- fit ---------------------------------------------------------------------------

    @hookimpl(trylast=True)  # after the checkpoint plugin has restored the run id
    def on_fit_begin(self, learner: Learner) -> None:
        import wandb

        self._errors = (wandb.errors.Error, OSError)
        self._run_dir = learner.run_dir
        params = self.params if self.params is not None else flat_params(learner.config)
        self._config = {key: _config_value(value) for key, value in params.items()}
        self._config.setdefault("trainloop_version", trainloop.__version__)
        if self._step_logger is not None:
            learner.add_plugin(self._step_logger, "wandb.steps")
        self._send()

    @hookimpl(trylast=True)  # after every plugin has added its metrics
    def on_epoch_end(self, learner: Learner) -> None:
        record: dict[str, Any] = {"epoch": learner.epoch}
        for key, value in learner.metrics.items():
            number = metric_value(value)
            if number is not None:
                record[key] = number
        self._pending.append(record)
        self._send()

    def on_fit_end(self, learner: Learner) -> None:
        if self._step_logger is not None and learner.plugin_manager.is_registered(
            self._step_logger
        ):
            learner.plugin_manager.unregister(self._step_logger)
        if not self._errors:  # fit failed before this plugin's on_fit_begin
            return
        self._exit_code = 0 if learner.exception is None else 1
        if self._send():
            self._save_files(learner.run_dir)
        if self.failures:
            outcome = (
                "everything was sent on a later try"
                if self.run is not None and not self._pending
                else f"{len(self._pending)} records were not logged"
            )
            _warn(f"{self.failures} attempt(s) to log to W&B failed during fit; {outcome}")
        if self.finish_at_fit_end:
            self.finish()

    def on_predict_end(self, learner: Learner) -> None:
        """Save what ``predict`` wrote into the run folder (a submission file)."""
        if self.run is not None:
            self._save_files(learner.run_dir)

    def log_step(self, record: dict[str, Any]) -> None:
        """Log a per-step record now (wandb sends it in the background), or with the
        next epoch end if the run could not be started yet."""
        if self.run is not None:
            self.run.log(record)
        else:
            self._pending.append(record)

    def finish(self) -> None:
        """Save the run folder's new files and end the W&B run (once)."""
        if self.run is None:
            return
        run, self.run = self.run, None
        self._save_files(self._run_dir, run)
        run.finish(exit_code=self._exit_code)

    # --- resume ------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"run_id": self.run_id, "pending": list(self._pending)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY) or {}
        if state.get("run_id"):
            self.run_id = str(state["run_id"])
            self._resumed = True
        self._pending = [dict(record) for record in state.get("pending", [])]

    # --- talking to W&B ----------------------------------------------------------------

    def _send(self) -> bool:
        """Start the run if needed and log what is queued; ``False`` if that failed."""
        try:
            if self.run is None:
                self._start_run()
            while self._pending:
                self.run.log(self._pending[0])
                del self._pending[0]
        except self._errors as error:
            self.failures += 1
            _warn(f"W&B failed ({_one_line(error)}); retried at the next epoch end")
            return False
        return True

    def _start_run(self) -> None:
        import wandb

        run_dir = self._run_dir
        run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.run_name,
            id=self.run_id,
            resume="allow" if self._resumed else None,
            mode=self.mode,
            dir=str(run_dir) if run_dir is not None else None,
            config=self._config,
            tags=self.tags,
            allow_val_change=self._resumed,
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )
        # Epoch metrics against the epoch, per-batch ones against the batch step.
        run.define_metric("epoch")
        run.define_metric(STEP)
        run.define_metric("batch/*", step_metric=STEP)
        run.define_metric("*", step_metric="epoch")
        if run_dir is not None:
            commit = git_commit(Path(run_dir).resolve())
            run.config.update({"run_dir": str(Path(run_dir).resolve())}, allow_val_change=True)
            if commit:
                run.config.update({"git_commit": commit}, allow_val_change=True)
        self.run = run

    def _save_files(self, run_dir: Path | None, run: Any = None) -> None:
        run = run or self.run
        if run is None or run_dir is None or not Path(run_dir).is_dir():
            return
        for path in sorted(Path(run_dir).iterdir()):
            if not path.is_file() or not self._wanted(path):
                continue
            stat = path.stat()
            if self._saved.get(path) == (stat.st_size, stat.st_mtime_ns):
                continue
            try:
                # A copy in the W&B run's own folder: what it syncs is what the file
                # held now, and wandb does not warn about symlinks.
                copy = Path(shutil.copy2(path, Path(run.dir) / path.name))
                run.save(str(copy), base_path=run.dir, policy="now")
            except self._errors as error:
                self.failures += 1
                _warn(f"W&B could not save {path.name} ({_one_line(error)})")
                return
            self._saved[path] = (stat.st_size, stat.st_mtime_ns)

    def _wanted(self, path: Path) -> bool:
        name = path.name
        if name.startswith(".") or name.endswith(".partial") or "tfevents" in name:
            return False
        return self.model_file or name != "model.pt"


class _StepLoss:
    """The per-batch part, registered only with ``every > 0``: the training loss."""

    def __init__(self, logger: WandbLogger) -> None:
        self.logger = logger

    def on_batch_end(self, learner: Learner) -> None:
        logger = self.logger
        if not learner.training or learner.loss is None or learner.step % logger.every:
            return
        logger.log_step({STEP: learner.step, STEP_LOSS: float(learner.loss.item())})


# --- what a CLI run logs ----------------------------------------------------------------


def has_credentials() -> bool:
    """Whether W&B has an API key: ``WANDB_API_KEY`` or a ``wandb login`` netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host.hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _config_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_config_value(item) for item in value]
    return str(value)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _warn(message: str) -> None:
    print(f"wandb: warning: {message}", file=sys.stderr, flush=True)
