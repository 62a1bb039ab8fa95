"""trainloop-wandb in offline mode: what a run writes into RUN_DIR/wandb/, read back.

The package is installed as users install it (``pip install ./integrations/trainloop-wandb``,
which ``.ci/run`` does) and found through its entry point. No test touches the network:
offline mode writes the run into a ``.wandb`` file (what ``wandb sync`` uploads later),
whose records are read here with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import ROOT, options_named_on_page, write_tiny_recipe

from trainloop.cli import DISABLE_AUTOLOAD, main
from trainloop.tasks.mnist.data import write_idx_files

pytest.importorskip("wandb", reason="wandb is not installed: pip install wandb")
if not any(entry.name == "wandb" for entry in entry_points(group="trainloop")):
    pytest.skip(
        "trainloop-wandb is not installed: pip install ./integrations/trainloop-wandb",
        allow_module_level=True,
    )
from wandb.proto import wandb_internal_pb2  # noqa: E402

MNIST = str(ROOT / "recipes" / "mnist_mlp.py")
BLOCK = 32 * 1024  # the .wandb file is a log of 32 KiB blocks of record pieces


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file (LevelDB's log format, W&B's header)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pieces, offset = [], [], 7
    while offset + 7 <= len(data):
        left = BLOCK - offset % BLOCK
        _checksum, length, kind = struct.unpack_from("<IHB", data, offset)
        if left < 7 or (kind == 0 and length == 0):  # the block's padding
            offset += left
            continue
        pieces.append(data[offset + 7 : offset + 7 + length])
        offset += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            records.append(record)
            pieces = []
    return records


def read_offline_run(run_dir: Path) -> dict:
    """What the one offline run in ``run_dir/wandb`` holds."""
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    run, config, history, exit_code = None, {}, [], None
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            items = record.run.config.update
        elif kind == "config":
            items = record.config.update
        else:
            items = ()
        for item in items:
            config[item.key] = json.loads(item.value_json)
        if kind == "history":
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        if kind == "exit":
            exit_code = record.exit.exit_code
    return {"folder": folder, "run": run, "config": config, "history": history,
            "exit_code": exit_code}  # fmt: skip


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    """No W&B settings from the machine: no key, no project, its folders in tmp_path."""
    monkeypatch.delenv(DISABLE_AUTOLOAD, raising=False)
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE",
                 "WANDB_BASE_URL", "MLFLOW_TRACKING_URI"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("mnist")
    write_idx_files(data_dir / "MNIST" / "raw", n_train=300, n_test=100, seed=0, gz=False)
    return data_dir


def run_trainloop(args: list[str]) -> int:
    """``trainloop ARGS`` in this process, then what the end of its process does for wandb.

    wandb's service writes the offline run's file in the background and closes it when
    the process ends (``wandb.teardown`` at exit): a test ends it by hand.
    """
    import wandb

    status = main(args)
    wandb.teardown()
    return status


def mnist_run(mnist_dir: Path, out: Path, *options: str) -> list[str]:
    return ["run", MNIST, "--data-dir", str(mnist_dir), "--no-download", "--batch-size", "100",
            "--out", str(out), "--progress", "plain", *options]  # fmt: skip


def test_an_offline_run_holds_the_config_every_epoch_and_the_run_folders_files(mnist_dir, tmp_path):
    out = tmp_path / "run"
    status = run_trainloop(
        mnist_run(mnist_dir, out, "--epochs", "2", "--wandb-project", "trainloop-tests",
                  "--wandb-mode", "offline", "--wandb-every", "2")
    )  # fmt: skip
    assert status == 0
    logged = read_offline_run(out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    run = logged["run"]
    assert run.project == "trainloop-tests" and run.display_name == "run"
    assert logged["folder"].name.endswith(f"-{run.run_id}")
    config = logged["config"]
    assert config["lr"] == 0.01 and config["batch_size"] == 100 and config["epochs"] == 2
    assert config["option.wandb_mode"] == "offline" and config["recipe"] == MNIST
    assert config["run_dir"] == str(out.resolve())
    epochs = [row for row in logged["history"] if "valid_loss" in row]
    assert [row["epoch"] for row in epochs] == [0, 1]
    for row, record in zip(epochs, records, strict=True):
        for key in ("train_loss", "valid_loss", "valid_accuracy"):
            assert row[key] == pytest.approx(record[key], rel=1e-12)
    steps = [row["batch/step"] for row in logged["history"] if "batch/train_loss" in row]
    assert steps == [0, 2, 4]  # every 2nd of 3 + 3 batches
    files = logged["folder"] / "files"
    for name in ("config.json", "metrics.jsonl"):
        assert (files / name).read_bytes() == (out / name).read_bytes()
    assert not (files / "model.pt").exists()  # only with --wandb-model-file
    assert logged["exit_code"] == 0


def test_a_resumed_run_keeps_its_wandb_run_id(mnist_dir, tmp_path):
    out = tmp_path / "run"
    offline = ["--wandb-project", "trainloop-tests", "--wandb-mode", "offline"]
    assert run_trainloop(mnist_run(mnist_dir, out, "--epochs", "1", *offline)) == 0
    (first,) = (out / "wandb").glob("offline-run-*")
    moved = tmp_path / first.name
    first.rename(moved)  # the resumed run writes a folder of its own
    assert run_trainloop(mnist_run(mnist_dir, out, "--epochs", "2", "--resume", *offline)) == 0

    resumed = read_offline_run(out)
    assert resumed["run"].run_id == moved.name.rsplit("-", 1)[1]
    assert [row["epoch"] for row in resumed["history"] if "valid_loss" in row] == [1]


def test_mode_disabled_and_p_no_wandb_write_nothing(tmp_path, monkeypatch):
    recipe = write_tiny_recipe(tmp_path)
    monkeypatch.setenv("WANDB_PROJECT", "trainloop-tests")
    monkeypatch.setenv("WANDB_MODE", "offline")
    base = ["run", str(recipe), "--progress", "plain"]
    assert main([*base, "--out", str(tmp_path / "off"), "-p", "no:wandb"]) == 0
    assert main([*base, "--out", str(tmp_path / "disabled"), "--wandb-mode", "disabled"]) == 0
    assert main([*base, "--out", str(tmp_path / "none"), "--no-wandb"]) == 0
    for name in ("off", "disabled", "none"):
        assert (tmp_path / name / "metrics.jsonl").exists()
        assert not (tmp_path / name / "wandb").exists(), name


def test_without_a_project_nothing_is_logged(tmp_path):
    recipe = write_tiny_recipe(tmp_path)
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--progress", "plain"]) == 0
    assert not (tmp_path / "run" / "wandb").exists()


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_online_without_credentials_is_one_line_saying_what_to_set(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    status = main(["run", str(recipe), "--out", str(tmp_path / "run"),
                   "--wandb-project", "p", "--wandb-mode", "online"])  # fmt: skip
    line = one_line_error(capsys)
    assert status == 2
    assert line == (
        "trainloop: error: --wandb-mode online needs W&B credentials: set WANDB_API_KEY or "
        "run 'wandb login' (or log with --wandb-mode offline and 'wandb sync' later)"
    )
    assert not (tmp_path / "run").exists()


def test_a_wandb_login_netrc_entry_counts_as_credentials(tmp_path, monkeypatch):
    import trainloop_wandb

    assert not trainloop_wandb.has_credentials()
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert trainloop_wandb.has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert not trainloop_wandb.has_credentials()  # a key for another host


def test_without_the_wandb_package_the_error_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    recipe = write_tiny_recipe(tmp_path)
    status = main(["run", str(recipe), "--out", str(tmp_path / "run"),
                   "--wandb-project", "p", "--wandb-mode", "offline"])  # fmt: skip
    assert status == 2
    assert one_line_error(capsys) == (
        "trainloop: error: the wandb plugin needs the wandb package: pip install wandb"
    )


def test_a_negative_wandb_every_is_one_line_and_status_2(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path)
    status = main(["run", str(recipe), "--out", str(tmp_path / "run"), "--wandb-every", "-2"])
    assert status == 2
    assert "--wandb-every -2: give 0 (off) or more" in one_line_error(capsys)


def test_trainloop_plugins_lists_the_tracker_with_its_distribution(capsys):
    assert main(["plugins"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "│ wandb" in line]
    assert rows and "entry point (trainloop-wandb 0.1.0)" in rows[0]


def test_the_docs_page_names_only_options_that_exist(capsys):
    page = ROOT / "docs" / "trackers" / "wandb.md"
    named = options_named_on_page(page, r"--wandb(?:-[a-z]+)*", capsys)
    assert len(named) >= 6, named
