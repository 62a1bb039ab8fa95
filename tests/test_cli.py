"""The command line: running recipes, options from Config, bad input, plugin selection."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from trainloop.cli import main

ROOT = Path(__file__).resolve().parents[1]
SINGLE_NODE = str(ROOT / "recipes" / "single_node.py")

TINY_RECIPE = """
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path
import functools, torch
from trainloop import Learner

@dataclass
class Config:
    batch_size: int = 8
    lr: float = 0.1
    name: str = "tiny"
    shuffle: bool = True
    size: tuple[int, int] = (4, 2)
    kind: Literal["a", "b"] = "a"
    limit: int | None = None
    folder: Path = Path("somewhere")

def build(cfg):
    torch.manual_seed(0)
    inputs = torch.randn(32, cfg.size[0])
    target = (inputs.sum(1) > 0).long()
    data = [(inputs[i:i + cfg.batch_size], target[i:i + cfg.batch_size]) for i in range(0, 32, cfg.batch_size)]
    model = torch.nn.Sequential(torch.nn.Linear(cfg.size[0], cfg.size[1]), torch.nn.LogSoftmax(1))
    learner = Learner(model, data, data, optimizer=functools.partial(torch.optim.SGD, lr=cfg.lr))
    learner.built_with = cfg
    return learner
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def run(*args, capsys) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write(tmp_path / "tiny.py", TINY_RECIPE)


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("trainloop 0.")


def test_run_writes_config_and_one_metrics_line_per_epoch_and_prints_the_folder(
    tiny, tmp_path, capsys
):
    out = tmp_path / "run"
    status, stdout, _ = run(
        "run", tiny, "--epochs", 3, "--out", out, "--batch-size", 16, capsys=capsys
    )
    assert status == 0
    assert f"run folder: {out}" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["batch_size"] == 16
    assert config["options"]["epochs"] == 3
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    assert set(lines[0]) == {
        "epoch", "train_loss", "train_samples_per_second", "train_data_wait", "valid_loss"
    }  # fmt: skip
    assert lines[2]["train_loss"] < lines[0]["train_loss"]


def test_default_run_folder_is_runs_recipe_timestamp(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("run", tiny, capsys=capsys)[0] == 0
    folders = list((tmp_path / "runs" / "tiny").iterdir())
    assert len(folders) == 1 and (folders[0] / "metrics.jsonl").exists()


def test_config_fields_become_typed_options(tiny, tmp_path, capsys):
    built = {}

    class SeesTheConfig:  # the Config that build(cfg) got, as the learner holds it
        def on_fit_begin(self, learner):
            built["cfg"] = learner.built_with

    module = type(sys)("sees_the_config")
    module.plugin = SeesTheConfig()
    sys.modules["sees_the_config"] = module
    args = [
        "--no-shuffle",
        "--size",
        "4",
        "3",
        "--kind",
        "b",
        "--limit",
        "7",
        "--folder",
        "x/y",
        "--lr",
        "0.5",
    ]
    out = tmp_path / "o"
    assert (
        run("run", tiny, "--out", out, "-p", "sees_the_config:plugin", *args, capsys=capsys)[0] == 0
    )
    del sys.modules["sees_the_config"]
    cfg = built["cfg"]
    assert (cfg.shuffle, cfg.size, cfg.kind, cfg.limit, cfg.folder, cfg.lr) == (
        False,
        (4, 3),
        "b",
        7,
        Path("x/y"),
        0.5,
    )


def test_help_lists_the_config_fields_and_plugin_options(tiny, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--batch-size",
        "--no-shuffle",
        "--kind {a,b}",
        "--epochs",
        "--out",
        "--seed",
        "-p NAME",
        "--progress",
    ):
        assert option in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "no/such/recipe.py"], "recipe no/such/recipe.py does not exist"),
        (["run", "{tiny}", "--bogus", "1"], "unknown option(s) --bogus 1"),
        (
            ["run", "{tiny}", "--batch-size", "eight"],
            "argument --batch-size: invalid int value: 'eight'",
        ),
        (["run", "{tiny}", "--kind", "c"], "argument --kind: invalid choice: 'c'"),
        (["run", "{tiny}", "-p", "no_such_plugin_xyz"], "-p no_such_plugin_xyz: no such plugin"),
        (["run", "{no_build}"], "has no build(cfg) function"),
        (["run", "{no_config}"], "has no Config dataclass"),
        (
            ["run", "{misspelled}"],
            "implements unknown hook 'on_epoch_edn' (did you mean 'on_epoch_end'?)",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["run", "{tiny}", "--epochs", "-2"], "--epochs -2: give a number of epochs, 0 or more"),
        (["run", "{tiny}", "--out", "{a_file}"], "is a file, not a folder"),
        (["run", "{tiny}", "--out", "{a_file}/run"], "a_file is a file, not a folder"),
        (["run", "{tiny}", "-p", "no:tensorbord"], "-p no:tensorbord: there is no plugin named"),
    ],
)
def test_bad_input_ends_with_one_clear_line_and_status_2(
    args, message, tiny, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write(
        tmp_path / "no_build.py",
        "from dataclasses import dataclass\n@dataclass\nclass Config:\n    a: int = 1\n",
    )
    write(tmp_path / "no_config.py", "def build(cfg):\n    pass\n")
    write(
        tmp_path / "misspelled.py",
        TINY_RECIPE.replace("learner.built_with = cfg", "learner.add_plugin(Typo())")
        + "\nclass Typo:\n    def on_epoch_edn(self, learner):\n        pass\n",
    )
    write(tmp_path / "a_file", "not a folder\n")
    names = {
        "tiny": tiny,
        "a_file": tmp_path / "a_file",
        **{n: tmp_path / f"{n}.py" for n in ("no_build", "no_config", "misspelled")},
    }
    args = [arg.format(**names) for arg in args]
    status, _, err = run(*args, capsys=capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trainloop: error: ")
    assert message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # bad input leaves no run folder behind


def test_a_plugin_given_with_p_module_attr_is_loaded_and_its_hooks_fire(
    tiny, tmp_path, capsys, monkeypatch
):
    write(
        tmp_path / "my_plugins.py",
        """
        class Shout:
            def on_fit_end(self, learner):
                print("SHOUT", learner.epoch)
        shout = Shout()
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    status, stdout, _ = run(
        "run", tiny, "--epochs", 2, "--out", tmp_path / "o", "-p", "my_plugins:shout", capsys=capsys
    )
    assert status == 0
    assert "SHOUT 2" in stdout


def test_p_no_name_disables_a_built_in_plugin(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    assert run("run", tiny, "--out", out, "-p", "no:metrics_jsonl", capsys=capsys)[0] == 0
    assert (out / "config.json").exists()
    assert not (out / "metrics.jsonl").exists()


def test_a_bug_in_a_plugin_is_reported_with_the_plugin_and_hook_and_status_1(
    tiny, tmp_path, capsys, monkeypatch
):
    write(
        tmp_path / "buggy.py",
        """
        def on_epoch_end(learner):
            raise ValueError("bad value")
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    status, _, err = run("run", tiny, "--out", tmp_path / "o", "-p", "buggy", capsys=capsys)
    assert status == 1
    assert "ValueError: bad value (plugin 'buggy' raised it in hook 'on_epoch_end')" in err
    assert "Traceback" not in err
    status, _, err = run(
        "run", tiny, "--out", tmp_path / "o2", "-p", "buggy", "--debug", capsys=capsys
    )
    assert status == 1 and "Traceback" in err


def make_distribution(site: Path, name: str, module_source: str) -> None:
    """A real installed distribution as importlib.metadata sees one: dist-info + module."""
    (site / f"{name}.py").write_text(textwrap.dedent(module_source))
    info = site / f"{name}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[trainloop]\n{name} = {name}\n")
    (info / "RECORD").write_text("")


THIRD_PARTY = """
from trainloop import hookimpl

@hookimpl
def add_options(parser):
    parser.add_argument_group("greeter").add_argument("--greeting", default="hello")

@hookimpl
def configure(config):
    config.plugin_manager.register(Greeter(config.options.greeting), "greeter.instance")

class Greeter:
    def __init__(self, greeting):
        self.greeting = greeting

    def on_epoch_end(self, learner):
        print(self.greeting, "epoch", learner.epoch)
"""


def test_an_installed_third_party_plugin_is_loaded_listed_and_its_hooks_fire(
    tiny, tmp_path, capsys, monkeypatch
):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "tl_greeter", THIRD_PARTY)
    monkeypatch.syspath_prepend(str(site))

    status, stdout, _ = run("plugins", capsys=capsys)
    assert status == 0
    row = next(line for line in stdout.splitlines() if "tl_greeter" in line)
    assert "entry point (tl_greeter 1.2.3)" in row
    assert "add_options" in row and "on_epoch_end" in row

    status, stdout, _ = run(
        "run", tiny, "--epochs", 2, "--out", tmp_path / "o", "--greeting", "hi", capsys=capsys
    )
    assert status == 0
    assert "hi epoch 0" in stdout and "hi epoch 1" in stdout

    status, stdout, _ = run(
        "run", tiny, "--out", tmp_path / "o2", "-p", "no:tl_greeter", capsys=capsys
    )
    assert status == 0 and "epoch 0" not in stdout.replace("1", "")

    monkeypatch.setenv("TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD", "1")
    status, stdout, _ = run("plugins", capsys=capsys)
    assert "tl_greeter" not in stdout


def test_plugins_lists_the_built_ins_with_their_origin(capsys):
    status, stdout, _ = run("plugins", capsys=capsys)
    assert status == 0
    assert any("progress" in line and "built-in" in line for line in stdout.splitlines())
    assert any("metrics_jsonl" in line and "built-in" in line for line in stdout.splitlines())


def test_p_module_class_registers_an_instance_of_the_class(tiny, tmp_path, capsys, monkeypatch):
    write(
        tmp_path / "class_plugins.py",
        """
        class Announce:
            def on_fit_begin(self, learner):
                print("ANNOUNCED", type(self).__name__)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    status, stdout, _ = run(
        "run", tiny, "--out", tmp_path / "o", "-p", "class_plugins:Announce", capsys=capsys
    )
    assert status == 0
    assert "ANNOUNCED Announce" in stdout
