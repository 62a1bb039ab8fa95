"""trainloop-mlflow: a run's params, metrics, tags and files, logged to MLflow."""

from __future__ import annotations

import argparse
import inspect
import os
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trainloop
from trainloop import Learner, RunConfig, UsageError, hookimpl
from trainloop.tracking import flat_params, git_commit, metric_value, run_params

CHECKPOINT_KEY = "mlflow"
STEP_LOSS = "batch/train_loss"
INSTALL = "pip install mlflow-skinny (or pip install mlflow, which adds the server and UI)"
SERVER_SCHEMES = ("http", "https")
# Stores that MLflow reaches through SQLAlchemy or a plugin: passed on as they are.
OTHER_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
MAX_METRICS_PER_CALL = 1000  # MLflow's limits for one log_batch call
MAX_PARAMS_PER_CALL = 100
MAX_PARAM_LENGTH = 6000
STEP_FLUSH_SECONDS = 30.0  # per-step values are sent at epoch ends, or this often


@hookimpl
def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mlflow")
    group.add_argument(
        "--mlflow",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log the run to MLflow (default: on when --mlflow-uri or "
        "MLFLOW_TRACKING_URI gives a tracking URI)",
    )
    group.add_argument(
        "--mlflow-uri",
        default=None,
        metavar="URI",
        help="tracking URI: http(s)://HOST:PORT, sqlite:///FILE or a folder "
        "(default: $MLFLOW_TRACKING_URI)",
    )
    group.add_argument(
        "--mlflow-experiment",
        default=None,
        metavar="NAME",
        help="experiment name (default: $MLFLOW_EXPERIMENT_NAME, else the recipe's name)",
    )
    group.add_argument(
        "--mlflow-run-name",
        default=None,
        metavar="NAME",
        help="run name (default: the run folder's name)",
    )
    group.add_argument(
        "--mlflow-every",
        type=int,
        default=0,
        metavar="N",
        help="also log the training loss every N batches as batch/train_loss; each "
        "costs a device sync (default: 0, off)",
    )
    group.add_argument(
        "--mlflow-model-file",
        action="store_true",
        help="upload model.pt with the run folder's files at the end",
    )
    group.add_argument(
        "--mlflow-log-model",
        action="store_true",
        help="log the trained model with mlflow.pytorch (artifact 'model')",
    )
    group.add_argument(
        "--mlflow-images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="upload the TensorBoard sample pictures as PNG files (default: on)",
    )
    group.add_argument(
        "--mlflow-required",
        action="store_true",
        help="stop at start when the tracking server cannot be reached "
        "(default: warn, train, and retry at each epoch end)",
    )
    group.add_argument(
        "--mlflow-timeout",
        type=int,
        default=5,
        metavar="SECONDS",
        help="how long one call to the server may wait (default: 5)",
    )


@hookimpl
def configure(config: RunConfig) -> None:
    options = config.options
    if options.mlflow_every < 0:
        raise UsageError(f"--mlflow-every {options.mlflow_every}: give 0 (off) or more")
    if options.mlflow_timeout < 1:
        raise UsageError(f"--mlflow-timeout {options.mlflow_timeout}: give 1 second or more")
    uri = options.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    enabled = options.mlflow if options.mlflow is not None else uri is not None
    if not enabled:
        return
    try:
        import mlflow  # noqa: F401  (checked now: the run must not fail at its first epoch)
    except ImportError:
        raise UsageError(f"the mlflow plugin needs the mlflow package: {INSTALL}") from None
    where = "--mlflow-uri" if options.mlflow_uri else "MLFLOW_TRACKING_URI"
    if uri is not None:
        check_uri(uri, where)
        problem = unreachable(uri, options.mlflow_timeout)
        if problem and options.mlflow_required:
            raise UsageError(
                f"{where} {uri}: cannot reach the tracking server ({problem}); start it or "
                "fix the URI (without --mlflow-required the run trains and retries)"
            )
        if problem and config.is_main_process:
            _warn(
                f"cannot reach the tracking server at {uri} ({problem}); training goes on "
                "and logging is retried at each epoch end"
            )
    if not config.is_main_process:  # one run in MLflow, logged by rank 0
        return
    logger = MLflowLogger(
        tracking_uri=uri,
        experiment=options.mlflow_experiment
        or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        or config.recipe_name,
        run_name=options.mlflow_run_name or config.run_dir.name,
        every=options.mlflow_every,
        params=run_params(config),
        tags=run_tags(config),
        model_file=options.mlflow_model_file,
        log_model=options.mlflow_log_model,
        images=options.mlflow_images,
        timeout=options.mlflow_timeout,
    )
    config.plugin_manager.register(logger, "mlflow.logger")


class MLflowLogger:
    """Logs ``fit`` to one MLflow run: params, tags, each epoch's metrics, the run's files.

    Every call to the tracking store happens at the start of ``fit``, at epoch ends and
    at the end (plus every ``STEP_FLUSH_SECONDS`` with ``every``). A call that fails is
    a warning line: its data stays queued and is sent at the next epoch end, and the
    count of failed calls is printed when ``fit`` ends. Training never stops for it.

    Args:
        tracking_uri: where to log (``None``: MLflow's default, ``MLFLOW_TRACKING_URI``).
        experiment: the experiment's name (created if missing).
        run_name: the run's name in MLflow.
        every: also log ``batch/train_loss`` every ``every`` training batches (0: off).
        params: the run's params (default: ``learner.config``, flattened).
        tags: extra tags (``trainloop.version`` and ``trainloop.run_dir`` are added).
        model_file: also upload ``model.pt`` from the run folder.
        log_model: log ``learner.model`` with ``mlflow.pytorch`` as artifact ``model``.
        images: upload the pictures of the run folder's TensorBoard files.
        timeout: seconds one HTTP call may wait (one more try follows a failure).

    Attributes:
        run_id: the MLflow run's id, once it exists.
        failures: how many calls to the tracking store failed.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "trainloop",
        run_name: str | None = None,
        every: int = 0,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        model_file: bool = False,
        log_model: bool = False,
        images: bool = True,
        timeout: int = 5,
    ) -> None:
        if every < 0:
            raise ValueError(f"MLflowLogger(every={every}): use 0 or more")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.every = every
        self.params = params
        self.tags = dict(tags or {})
        self.model_file = model_file
        self.log_model = log_model
        self.images = images
        self.timeout = timeout
        self.run_id: str | None = None
        self.failures = 0
        self._client: Any = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._resume_id: str | None = None
        self._pending_params: dict[str, str] = {}
        self._pending_metrics: list[tuple[str, float, int, int]] = []
        self._uploaded: dict[Path, tuple[int, int]] = {}
        self._last_flush = 0.0
        self._last_flush_ok = True
        self._images_sent = False
        self._run_dir: Path | None = None
        self._step_logger = _StepLoss(self) if every else None

    # --- fit ---------------------------------------------------------------------------

    @hookimpl(trylast=True)  # after the checkpoint plugin has restored the run id
    def on_fit_begin(self, learner: Learner) -> None:
        self._run_dir = learner.run_dir
        self._setup_client()
        params = self.params if self.params is not None else flat_params(learner.config)
        self._pending_params = {key: _param_value(value) for key, value in params.items()}
        if self._step_logger is not None:
            learner.add_plugin(self._step_logger, "mlflow.steps")
        self._flush()

    @hookimpl(trylast=True)  # after every plugin has added its metrics
    def on_epoch_end(self, learner: Learner) -> None:
        now = _milliseconds()
        for key, value in learner.metrics.items():
            number = metric_value(value)
            if number is not None:
                self._pending_metrics.append((key, number, learner.epoch, now))
        self._flush()

    def on_fit_end(self, learner: Learner) -> None:
        if self._step_logger is not None and learner.plugin_manager.is_registered(
            self._step_logger
        ):
            learner.plugin_manager.unregister(self._step_logger)
        if self._client is None:  # fit failed before this plugin's on_fit_begin
            return
        if self._flush():
            self._upload_files(learner)
            if self.log_model and learner.exception is None:
                self._call(self._log_pytorch_model, learner, retry=False)
            status = "FINISHED"
            if isinstance(learner.exception, KeyboardInterrupt):
                status = "KILLED"
            elif learner.exception is not None:
                status = "FAILED"
            self._call(self._client.set_terminated, self.run_id, status, retry=False)
        self._summary()

    def on_predict_end(self, learner: Learner) -> None:
        """Upload what ``predict`` wrote into the run folder (a submission file)."""
        if self._client is not None and self._flush():
            self._upload_files(learner)

    # --- resume ------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "run_id": self.run_id,
            "pending": [list(item) for item in self._pending_metrics],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY) or {}
        self._resume_id = state.get("run_id")
        self._pending_metrics = [
            (str(key), float(value), int(step), int(stamp))
            for key, value, step, stamp in state.get("pending", [])
        ]

    # --- talking to the tracking store -------------------------------------------------

    def _setup_client(self) -> None:
        # Bounded waits: MLflow's defaults retry a dead server for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(self.timeout)))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
        import requests
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self._errors = (MlflowException, requests.RequestException, OSError)

    def _flush(self) -> bool:
        """Create the run if needed and send what is queued; ``False`` if a call failed."""
        self._last_flush = time.monotonic()
        self._last_flush_ok = self._call(self._send)
        return self._last_flush_ok

    def _send(self) -> None:
        if self.run_id is None:
            self._start_run()
        if self._pending_params:
            items = list(self._pending_params.items())
            for start in range(0, len(items), MAX_PARAMS_PER_CALL):
                self._client.log_batch(
                    self.run_id,
                    params=[_param(*item) for item in items[start : start + MAX_PARAMS_PER_CALL]],
                )
            self._pending_params = {}
        while self._pending_metrics:
            chunk = self._pending_metrics[:MAX_METRICS_PER_CALL]
            self._client.log_batch(self.run_id, metrics=[_metric(*item) for item in chunk])
            del self._pending_metrics[: len(chunk)]

    def _start_run(self) -> None:
        from mlflow.exceptions import MlflowException

        client = self._client
        if self._resume_id is not None:
            try:
                run = client.get_run(self._resume_id)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                _warn(f"run {self._resume_id} is not in {self._where()}: starting a new run")
                self._resume_id = None
            else:
                client.update_run(run.info.run_id, status="RUNNING")
                resumes = int(run.data.tags.get("trainloop.resumes", "0")) + 1
                client.set_tag(run.info.run_id, "trainloop.resumes", str(resumes))
                # MLflow params are write-once: a resumed run keeps its first values.
                self._pending_params = {
                    key: value
                    for key, value in self._pending_params.items()
                    if key not in run.data.params
                }
                self.run_id = run.info.run_id
                _say(f"continuing run {self.run_id} in {self._where()}")
                return
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(self.experiment)
        )
        tags = {**self.tags, "trainloop.version": trainloop.__version__}
        if self._run_dir is not None:
            tags.setdefault("trainloop.run_dir", str(Path(self._run_dir).resolve()))
        run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        _say(f"logging to run {self.run_id} in {self._where(experiment_id)}")

    def _call(self, function: Any, *args: Any, retry: bool = True) -> bool:
        """Call ``function``; a failure of the tracking store is one warning line."""
        try:
            function(*args)
        except self._errors as error:
            self.failures += 1
            then = "retried at the next epoch end" if retry else "not retried"
            where = self.tracking_uri or "the tracking store"
            _warn(f"call to {where} failed ({_one_line(error)}); {then}")
            return False
        return True

    def _where(self, experiment_id: str | None = None) -> str:
        uri = self.tracking_uri or "the default tracking store"
        if experiment_id is not None and uri.startswith(SERVER_SCHEMES):
            return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"
        return uri

    def _summary(self) -> None:
        if not self.failures:
            return
        if self.run_id is not None and not self._pending_metrics:
            outcome = "every metric was sent on a later try"
        else:
            outcome = f"{len(self._pending_metrics)} metric values were not sent"
        _warn(f"{self.failures} call(s) to the tracking store failed during fit; {outcome}")

    # --- files -------------------------------------------------------------------------

    def log_step(self, key: str, value: float, step: int) -> None:
        """Queue a per-step value; it goes with the epoch's metrics, or sooner when
        ``STEP_FLUSH_SECONDS`` have passed or a call's worth is queued (and the last
        call worked: a dead server costs its timeout at epoch ends only)."""
        self._pending_metrics.append((key, value, step, _milliseconds()))
        due = (
            len(self._pending_metrics) >= MAX_METRICS_PER_CALL
            or time.monotonic() - self._last_flush > STEP_FLUSH_SECONDS
        )
        if due and self._last_flush_ok:
            self._flush()

    def _upload_files(self, learner: Learner) -> None:
        run_dir = learner.run_dir
        if run_dir is None or not Path(run_dir).is_dir():
            return
        for path in sorted(Path(run_dir).iterdir()):
            if not path.is_file() or not self._wanted(path):
                continue
            stat = path.stat()
            if self._uploaded.get(path) == (stat.st_size, stat.st_mtime_ns):
                continue
            if not self._call(self._client.log_artifact, self.run_id, str(path), retry=False):
                return
            self._uploaded[path] = (stat.st_size, stat.st_mtime_ns)
        if self.images and not self._images_sent:
            with tempfile.TemporaryDirectory(prefix="trainloop-mlflow-") as folder:
                if write_event_images(Path(run_dir), Path(folder)) and self._call(
                    self._client.log_artifacts, self.run_id, folder, retry=False
                ):
                    self._images_sent = True

    def _wanted(self, path: Path) -> bool:
        name = path.name
        if name.startswith(".") or name.endswith(".partial") or "tfevents" in name:
            return False
        return self.model_file or name != "model.pt"

    def _log_pytorch_model(self, learner: Learner) -> None:
        import mlflow.pytorch
        import torch

        code = []
        recipe = getattr(learner.config, "__module__", None)
        module = sys.modules.get(recipe) if recipe else None
        if module is not None and getattr(module, "__file__", None):
            code.append(module.__file__)  # the model's class lives in the recipe
        with tempfile.TemporaryDirectory(prefix="trainloop-mlflow-") as folder:
            path = Path(folder) / "model"
            # Pickled, not MLflow 3's default 'pt2' export, which needs an input example.
            pickled = (
                {"serialization_format": "pickle"}
                if "serialization_format" in inspect.signature(mlflow.pytorch.save_model).parameters
                else {}
            )
            mlflow.pytorch.save_model(
                learner.model,
                str(path),
                code_paths=code or None,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                **pickled,
            )
            self._client.log_artifacts(self.run_id, str(path), "model")


class _StepLoss:
    """The per-batch part, registered only with ``every > 0``: the training loss."""

    def __init__(self, logger: MLflowLogger) -> None:
        self.logger = logger

    def on_batch_end(self, learner: Learner) -> None:
        logger = self.logger
        if not learner.training or learner.loss is None or learner.step % logger.every:
            return
        logger.log_step(STEP_LOSS, float(learner.loss.item()), learner.step)


# --- what a CLI run logs ----------------------------------------------------------------


def run_tags(config: RunConfig) -> dict[str, str]:
    """Tags of a CLI run: the recipe, its file, the git commit when there is one."""
    tags = {
        "trainloop.recipe": config.recipe_name,
        "trainloop.run_dir": str(config.run_dir.resolve()),
        "mlflow.source.name": str(config.recipe_path),
        "mlflow.source.type": "LOCAL",
    }
    commit = git_commit(config.recipe_path.resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


# --- the tracking URI -------------------------------------------------------------------


def check_uri(uri: str, where: str = "--mlflow-uri") -> None:
    """Raise UsageError for a URI MLflow cannot use; a plain path is a local store."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower().split("+")[0]
    hint = "use http(s)://HOST:PORT, sqlite:///FILE.db or a folder"
    if len(scheme) <= 1:  # a path (a Windows drive letter looks like a scheme)
        if uri.lower().startswith(("http:", "https:", "http/", "https/")):
            raise UsageError(f"{where} {uri}: not a valid URL; {hint}")
        return
    if scheme in SERVER_SCHEMES:
        try:
            port = parts.port
        except ValueError:
            raise UsageError(f"{where} {uri}: the port is not a number; {hint}") from None
        if not parts.hostname or (port is not None and not 0 < port < 65536):
            raise UsageError(f"{where} {uri}: give a host (and port), as in {hint}")
        return
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise UsageError(f"{where} {uri}: write sqlite:///relative.db or sqlite:////abs.db")
    if scheme not in OTHER_SCHEMES:
        raise UsageError(f"{where} {uri}: unknown scheme {parts.scheme!r}; {hint}")


def unreachable(uri: str, timeout: float) -> str | None:
    """Why the server at ``uri`` does not answer, or ``None`` (also for local stores)."""
    if not uri.lower().startswith(SERVER_SCHEMES):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError as error:
        if error.code < 500:  # it answers (behind a proxy or auth that hides /health)
            return None
        return f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return str(getattr(reason, "strerror", None) or reason)


# --- small helpers ----------------------------------------------------------------------


def write_event_images(run_dir: Path, folder: Path) -> int:
    """Write the images of ``run_dir``'s TensorBoard event files as PNG files into
    ``folder`` (``<tag>/epoch_<step>.png``); return how many."""
    count = 0
    for tag, step, png in event_images(run_dir):
        path = folder / Path(*tag.split("/")) / f"epoch_{step:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        count += 1
    return count


def event_images(run_dir: Path) -> Iterator[tuple[str, int, bytes]]:
    """(tag, step, PNG bytes) of each image in the TensorBoard event files of ``run_dir``."""
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):  # TFRecord: length, its crc, the record, its crc
            (length,) = struct.unpack_from("<Q", data, offset)
            record = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            if len(record) < length:  # a file still being written
                break
            event = Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("image"):
                    yield value.tag, event.step, value.image.encoded_image_string


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value)


def _metric(key: str, value: float, step: int, timestamp: int) -> Any:
    from mlflow.entities import Metric

    return Metric(key, value, timestamp, step)


def _param_value(value: Any) -> str:
    return str(value)[:MAX_PARAM_LENGTH]


def _milliseconds() -> int:
    return int(time.time() * 1000)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _say(message: str) -> None:
    print(f"mlflow: {message}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"mlflow: warning: {message}", file=sys.stderr, flush=True)
