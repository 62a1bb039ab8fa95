"""trainloop-mlflow against a real ``mlflow server`` on 127.0.0.1, started by the tests.

The package is installed as users install it (``pip install ./integrations/trainloop-mlflow``,
which ``.ci/run`` does) and found through its entry point. Two servers start at once, in
the background, each with its own sqlite database and artefact folder: one for the
runs read back here, one that a test kills in the middle of a run. The runs go through
``trainloop.cli.main`` in this process, on tiny MNIST files and tiny Carvana photos.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import ROOT, options_named_on_page, write_tiny_recipe

from trainloop import hookimpl
from trainloop.cli import DISABLE_AUTOLOAD, main
from trainloop.tasks.mnist.data import write_idx_files

mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed: pip install mlflow")
if not any(entry.name == "mlflow" for entry in entry_points(group="trainloop")):
    pytest.skip(
        "trainloop-mlflow is not installed: pip install ./integrations/trainloop-mlflow",
        allow_module_level=True,
    )
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
MNIST = str(ROOT / "recipes" / "mnist_mlp.py")
CARVANA = str(ROOT / "recipes" / "unet_carvana.py")
SCREENSHOT = ROOT / "docs" / "trackers" / "mlflow-ui.png"
SERVER_START_SECONDS = 180  # a busy machine: the server imports a lot before it listens


# --- the servers --------------------------------------------------------------------------


class Server:
    """An ``mlflow server`` process on 127.0.0.1 with its own store; stopped by the fixture."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(folder / "server.log", "wb")  # noqa: SIM115  (closed in stop)
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                   "--artifacts-destination", str(folder / "artifacts")]  # fmt: skip
        # A session of its own, so that stopping it stops its workers too.
        # No job runner (seven more processes, for GenAI jobs) and no telemetry.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
        self.process = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited: {(self.folder / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.stop()
        pytest.fail(f"mlflow server not up in {SERVER_START_SECONDS} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers, started together: "main" for the runs read back, "doomed" to kill."""
    folder = tmp_path_factory.mktemp("mlflow")
    started = {name: Server(folder / name) for name in ("main", "doomed")}
    try:
        for server in started.values():
            server.wait_until_up()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers["main"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    # MLflow keeps the artefacts of a sqlite store in ./mlruns: in the test's folder
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DISABLE_AUTOLOAD, raising=False)  # the entry point is what is tested
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # the tests make no outside calls


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
    """Tiny MNIST IDX files: 300 training and 100 test images."""
    data_dir = tmp_path_factory.mktemp("mnist")
    write_idx_files(data_dir / "MNIST" / "raw", n_train=300, n_test=100, seed=0, gz=False)
    return data_dir


def mnist_run(mnist_dir: Path, out: Path, *options: str) -> list[str]:
    return ["run", MNIST, "--data-dir", str(mnist_dir), "--no-download", "--batch-size", "100",
            "--out", str(out), "--progress", "plain", *options]  # fmt: skip


@pytest.fixture(scope="module")
def mnist(server, mnist_dir, tmp_path_factory) -> dict:
    """A 3-epoch MNIST run logged to the main server, with the loss of every batch."""
    out = tmp_path_factory.mktemp("mnist-run") / "run"
    status = main(
        mnist_run(mnist_dir, out, "--epochs", "3", "--mlflow-uri", server.uri,
                  "--mlflow-experiment", "mnist", "--mlflow-every", "1")
    )  # fmt: skip
    assert status == 0
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"run": run, "client": client, "records": records, "out": out}


# --- what a run logs ----------------------------------------------------------------------


def test_params_are_the_config_fields_and_the_run_options(mnist):
    params = mnist["run"].data.params
    assert params["batch_size"] == "100" and params["lr"] == "0.01"
    assert params["epochs"] == "3" and params["download"] == "False"
    assert params["option.mlflow_every"] == "1" and params["option.seed"] == "0"
    assert params["option.out"] == str(mnist["out"])


def test_every_epoch_metric_is_logged_at_its_epoch_with_the_values_of_metrics_jsonl(mnist):
    client, run_id, records = mnist["client"], mnist["run"].info.run_id, mnist["records"]
    assert len(records) == 3
    for key in ("train_loss", "valid_loss", "valid_accuracy"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)
        assert [metric.step for metric in history] == [0, 1, 2]
        assert [metric.value for metric in history] == pytest.approx(
            [record[key] for record in records], rel=1e-12
        )


def test_every_n_batches_logs_the_training_loss_at_the_global_step(mnist):
    history = mnist["client"].get_metric_history(mnist["run"].info.run_id, "batch/train_loss")
    assert sorted(metric.step for metric in history) == list(range(9))  # 3 batches x 3 epochs
    assert all(0 < metric.value < 10 for metric in history)


def test_the_run_has_its_name_tags_status_and_the_run_folders_files(mnist):
    run, client = mnist["run"], mnist["client"]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    tags = run.data.tags
    assert tags["trainloop.recipe"] == "mnist_mlp"
    assert tags["trainloop.run_dir"] == str(mnist["out"].resolve())
    assert tags["trainloop.version"] == __import__("trainloop").__version__
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    if commit:
        assert tags["mlflow.source.git.commit"] == commit
    names = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.jsonl"} <= names
    assert "model.pt" not in names  # only with --mlflow-model-file
    assert not any("tfevents" in name or name == "checkpoints" for name in names)
    local = client.download_artifacts(run.info.run_id, "metrics.jsonl", str(mnist["out"].parent))
    assert Path(local).read_text() == (mnist["out"] / "metrics.jsonl").read_text()


def test_a_resumed_run_continues_the_same_mlflow_run(server, mnist_dir, tmp_path):
    out = tmp_path / "run"
    logged = ["--mlflow-uri", server.uri, "--mlflow-experiment", "resume"]
    assert main(mnist_run(mnist_dir, out, "--epochs", "1", *logged)) == 0
    assert main(mnist_run(mnist_dir, out, "--epochs", "2", "--resume", *logged)) == 0

    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    history = client.get_metric_history(run.info.run_id, "valid_loss")
    assert sorted(metric.step for metric in history) == [0, 1]
    assert run.info.status == "FINISHED" and run.data.tags["trainloop.resumes"] == "1"
    assert run.data.params["epochs"] == "1"  # MLflow params are write-once: the first run's


def test_carvana_uploads_the_submission_pictures_and_model_file(server, tmp_path):
    out = tmp_path / "carvana"
    status = main(
        ["run", CARVANA, "--input-dir", str(tmp_path / "input"), "--synthetic-cars", "2",
         "--synthetic-test-cars", "1", "--synthetic-size", "56", "40",
         "--image-size", "32", "24", "--depth", "2", "--base-width", "4", "--epochs", "2",
         "--out", str(out), "--progress", "plain", "--mlflow-uri", server.uri,
         "--mlflow-experiment", "carvana", "--mlflow-model-file"]
    )  # fmt: skip
    assert status == 0
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("carvana").experiment_id])
    names = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.jsonl", "model.pt", "submit.csv.gz"} <= names
    pictures = [
        artifact.path
        for folder in client.list_artifacts(run.info.run_id, "valid_images")
        for artifact in client.list_artifacts(run.info.run_id, folder.path)
    ]
    assert len(pictures) == 2 and all(path.endswith(".png") for path in pictures)
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "valid_dice")]
    local = client.download_artifacts(run.info.run_id, "submit.csv.gz", str(tmp_path))
    assert Path(local).read_bytes() == (out / "submit.csv.gz").read_bytes()


class KillServer:
    """Kills the server given to it when the second epoch begins: mid-run."""

    server: Server | None = None

    @hookimpl
    def on_epoch_begin(self, learner):
        if learner.epoch == 1 and self.server is not None:
            self.server.stop()


KILL_SERVER = KillServer()  # for -p test_mlflow:KILL_SERVER


def test_a_server_killed_mid_run_costs_warnings_not_the_training(
    servers, mnist_dir, tmp_path, capsys, monkeypatch
):
    doomed = servers["doomed"]
    monkeypatch.setattr(KILL_SERVER, "server", doomed)
    out = tmp_path / "run"
    started = time.monotonic()
    status = main(
        mnist_run(mnist_dir, out, "--epochs", "3", "--mlflow-uri", doomed.uri,
                  "--mlflow-experiment", "doomed", "-p", "test_mlflow:KILL_SERVER")
    )  # fmt: skip
    seconds = time.monotonic() - started
    captured = capsys.readouterr()

    assert status == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    warnings = [line for line in captured.err.splitlines() if line.startswith("mlflow: warning")]
    # the epoch ends of epochs 1 and 2, then the last try at the end of fit
    assert len(warnings) == 4, captured.err
    assert warnings[-1].startswith("mlflow: warning: 3 call(s) to the tracking store failed")
    assert "metric values were not sent" in warnings[-1]
    assert seconds < 60
    # What reached the server before it died is in its database: epoch 0.
    client = MlflowClient(f"sqlite:///{doomed.folder / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("doomed").experiment_id])
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "valid_loss")] == [
        0
    ]


# --- switching it on and off; bad input ------------------------------------------------------


def test_trainloop_plugins_lists_the_tracker_with_its_distribution(capsys):
    assert main(["plugins"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "│ mlflow" in line]
    assert rows and "entry point (trainloop-mlflow 0.1.0)" in rows[0]
    assert "add_options" in rows[0] and "configure" in rows[0]


def test_importing_trainloop_and_listing_plugins_never_imports_mlflow():
    code = (
        "import sys, trainloop, trainloop.cli\n"
        "trainloop.cli.load_plugins([])\n"
        "print(sorted(name for name in ('mlflow', 'wandb') if name in sys.modules))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != DISABLE_AUTOLOAD}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_a_tracking_uri_nothing_is_logged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_tiny_recipe(tmp_path)
    assert main(["run", str(recipe), "--out", "run", "--progress", "plain"]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run", "tiny.py"]


def test_mlflow_tracking_uri_switches_it_on_and_p_no_mlflow_off(tmp_path, monkeypatch):
    recipe = write_tiny_recipe(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'on.db'}")
    assert main(["run", str(recipe), "--out", str(tmp_path / "on"), "--progress", "plain"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'on.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "train_loss")) == [0]  # fmt: skip

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'off.db'}")
    off = ["run", str(recipe), "--out", str(tmp_path / "off"), "-p", "no:mlflow"]
    assert main([*off, "--progress", "plain"]) == 0
    assert not (tmp_path / "off.db").exists()


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("htp://127.0.0.1:5000", "unknown scheme 'htp'"),
        ("http://127.0.0.1:port", "the port is not a number"),
        ("http://", "give a host"),
        ("http//127.0.0.1:5000", "not a valid URL"),
        ("sqlite://relative.db", "sqlite:///relative.db"),
    ],
)
def test_a_malformed_uri_is_one_line_and_status_2(uri, message, tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    status = main(["run", str(recipe), "--out", str(tmp_path / "run"), "--mlflow-uri", uri])
    line = one_line_error(capsys)
    assert status == 2
    assert line.startswith(f"trainloop: error: --mlflow-uri {uri}: ") and message in line
    assert not (tmp_path / "run").exists()


def closed_port_uri() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_an_unreachable_server_with_mlflow_required_stops_before_anything_is_written(
    tmp_path, capsys
):
    recipe = write_tiny_recipe(tmp_path)
    uri = closed_port_uri()
    status = main(["run", str(recipe), "--out", str(tmp_path / "run"), "--mlflow-uri", uri,
                   "--mlflow-required"])  # fmt: skip
    line = one_line_error(capsys)
    assert status == 2
    assert f"--mlflow-uri {uri}: cannot reach the tracking server" in line
    assert not (tmp_path / "run").exists()


def test_an_unreachable_server_without_mlflow_required_warns_and_trains(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    uri = closed_port_uri()
    status = main(["run", str(recipe), "--out", str(tmp_path / "run"), "--mlflow-uri", uri,
                   "--epochs", "2", "--progress", "plain"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 0
    assert f"mlflow: warning: cannot reach the tracking server at {uri}" in err
    # fit begin, 2 epoch ends and the end of fit each tried once
    assert "mlflow: warning: 4 call(s) to the tracking store failed during fit" in err
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_without_the_mlflow_package_the_error_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    recipe = write_tiny_recipe(tmp_path)
    status = main(["run", str(recipe), "--out", str(tmp_path / "run"), "--mlflow-uri",
                   f"sqlite:///{tmp_path / 'x.db'}"])  # fmt: skip
    line = one_line_error(capsys)
    assert status == 2
    assert "the mlflow plugin needs the mlflow package: pip install mlflow" in line


def test_bad_option_values_are_one_line_and_status_2(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    for option, value, message in (
        ("--mlflow-every", "-1", "--mlflow-every -1: give 0 (off) or more"),
        ("--mlflow-timeout", "0", "--mlflow-timeout 0: give 1 second or more"),
    ):
        status = main(["run", str(recipe), "--out", str(tmp_path / "run"), option, value])
        assert status == 2 and message in one_line_error(capsys)


def test_the_docs_page_names_only_options_that_exist(capsys):
    page = ROOT / "docs" / "trackers" / "mlflow.md"
    named = options_named_on_page(page, r"--mlflow(?:-[a-z]+)*", capsys)
    assert len(named) >= 8, named


# --- the docs' screenshot ---------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven through the DevTools protocol on a pipe (its fds 3 and 4)."""

    def __init__(self, executable: str, profile: Path) -> None:
        child_in, self._to_browser = os.pipe()
        self._from_browser, child_out = os.pipe()

        def wire() -> None:  # in the child: the pipe ends become fds 3 and 4
            ends = os.dup(child_in), os.dup(child_out)
            for fd, end in zip((3, 4), ends):
                os.dup2(end, fd)
                os.set_inheritable(fd, True)

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=wire,
        )  # fmt: skip
        os.close(child_in)
        os.close(child_out)
        self._buffer = b""
        self._id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # skip events until the answer comes
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 20)
                assert chunk, "chromium closed the pipe"
                self._buffer += chunk
            raw, _, self._buffer = self._buffer.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})
        raise TimeoutError(method)

    def open(self, url: str, width: int, height: int) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session = attached["sessionId"]
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        answer = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return answer["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return True
            time.sleep(0.25)
        return False

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        self.session = None
        try:
            self.send("Browser.close", timeout=10)
        except (AssertionError, OSError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        os.close(self._to_browser)
        os.close(self._from_browser)


def test_the_mlflow_ui_draws_the_runs_curves_screenshot_for_the_docs(mnist, server, tmp_path):
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("chromium is not installed: apt-get install chromium")
    run = mnist["run"]
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics"
    browser = Chromium(executable, tmp_path / "profile")
    try:
        browser.open(f"{server.uri}/", 1400, 1400)  # tall enough to draw all six charts
        assert browser.wait_for("document.readyState === 'complete'", 60)
        # The UI's assistant panel opens on a first visit: say it was seen and closed.
        browser.evaluate(
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')"
        )
        browser.send("Page.navigate", {"url": f"{server.uri}/{page}"})
        # One chart per metric: batch/train_loss, train_loss, valid_loss, valid_accuracy,
        # and the throughput plugin's train_samples_per_second and train_data_wait.
        drawn = "document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length"
        assert browser.wait_for(f"{drawn} >= 6", 90), browser.evaluate(drawn)
        titles = browser.evaluate("document.body.innerText")
        assert "valid_accuracy" in titles and "valid_loss" in titles and "run" in titles
        time.sleep(1)  # the lines' last frame
        png = browser.screenshot()
    finally:
        browser.close()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.write_bytes(png)


def test_the_logger_guides_excerpts_are_still_in_the_plugins_source():
    source = (ROOT / "integrations" / "trainloop-mlflow" / "trainloop_mlflow.py").read_text()
    lines = [line.strip() for line in source.splitlines()]
    page = (ROOT / "docs" / "trackers" / "index.md").read_text()
    excerpts = re.findall(r"<!-- no-test -->\n```python\n(.*?)```", page, flags=re.S)
    assert len(excerpts) >= 5
    for excerpt in excerpts:
        position = 0
        for line in (line.strip() for line in excerpt.splitlines()):
            if line in ("", "..."):
                continue
            assert line in lines[position:], f"not in trainloop_mlflow.py (in order): {line}"
            position = lines.index(line, position) + 1


def test_mlflow_log_model_logs_a_model_that_mlflow_pytorch_loads(tmp_path):
    import mlflow.pytorch
    import torch

    recipe = write_tiny_recipe(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    status = main(["run", str(recipe), "--out", str(out), "--epochs", "2", "--progress", "plain",
                   "--mlflow-uri", uri, "--mlflow-log-model"])  # fmt: skip
    assert status == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    local = client.download_artifacts(run.info.run_id, "model", str(tmp_path))
    model = mlflow.pytorch.load_model(local)
    saved = torch.load(out / "model.pt", weights_only=True)["model"]  # the model_saver's file
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_a_fit_that_fails_before_the_logger_starts_reports_its_own_error(tmp_path):
    from conftest import make_learner
    from trainloop_mlflow import MLflowLogger

    class Boom:
        def on_fit_begin(self):
            raise RuntimeError("boom")

    logger = MLflowLogger(f"sqlite:///{tmp_path / 'mlflow.db'}")
    learner = make_learner(plugins=[Boom(), logger])
    with pytest.raises(RuntimeError, match="boom"):
        learner.fit(1)
    assert logger.run_id is None and not (tmp_path / "mlflow.db").exists()
