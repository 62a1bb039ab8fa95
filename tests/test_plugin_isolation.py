"""One broken plugin does not take the tool down: it is named, and the command goes on.

An installed package is a folder on ``sys.path`` holding ``fake_dist-1.0.dist-info/``
(``METADATA`` and ``entry_points.txt``) next to its modules: ``importlib.metadata``
finds its entry points exactly as it finds those of a package pip installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import run_cli, write_tiny_recipe

from trainloop.cli import main

ENTRY_POINTS = """
[trainloop]
good = fake_good_plugin
broken = fake_broken_plugin
"""
MODULES = {
    "fake_good_plugin": "def on_fit_end(learner):\n    learner.run_dir.joinpath('good.txt').write_text('ran')\n",
    "fake_broken_plugin": "import missing_dependency_xyz\n",
}
BROKEN_LINE = (
    "plugin 'broken' (entry point 'broken = fake_broken_plugin' of fake-dist 1.0) failed to"
    " load: ModuleNotFoundError: No module named 'missing_dependency_xyz'"
)


def install_fake_dist(site: Path, entry_points: str, modules: dict[str, str]) -> Path:
    """Write an installed distribution ``fake-dist 1.0`` with these entry points into ``site``."""
    info = site / "fake_dist-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-dist\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, code in modules.items():
        (site / f"{name}.py").write_text(code)
    return site


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """``fake-dist`` installed: entry point ``good`` loads, ``broken`` misses a dependency."""
    folder = install_fake_dist(tmp_path / "site", ENTRY_POINTS, MODULES)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.chdir(tmp_path)
    return folder


def trainloop(*args, capsys) -> tuple[int, str, list[str]]:
    """Run the command in this process; return its status, stdout and stderr's lines."""
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip().splitlines()


def test_a_broken_entry_point_plugin_is_named_once_and_the_run_goes_on(site, tmp_path, capsys):
    out = tmp_path / "run"

    status, _, err = trainloop(
        "run", write_tiny_recipe(tmp_path), "--epochs", "1", "--out", out, capsys=capsys
    )

    assert status == 0
    assert err == [
        f"trainloop: warning: {BROKEN_LINE}; going on without it"
        " (switch it off with -p no:broken or TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD=1)"
    ]
    assert (out / "metrics.jsonl").is_file()
    assert (out / "good.txt").read_text() == "ran"  # the package's other plugin still runs


def test_an_installed_broken_plugin_in_a_fresh_process_is_one_warning(tmp_path):
    site = install_fake_dist(tmp_path / "site", ENTRY_POINTS, MODULES)
    environment = {"PYTHONPATH": str(site), "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": ""}

    result = run_cli("plugins", cwd=tmp_path, env=environment)

    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        f"trainloop: warning: {BROKEN_LINE}; going on without it"
        " (switch it off with -p no:broken or TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD=1)"
    ]
    assert "failed to load" in result.stdout


def test_run_help_works_with_a_broken_plugin_installed(site, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainloop("run", write_tiny_recipe(tmp_path), "--help", capsys=capsys)
    captured = capsys.readouterr()

    assert exit_info.value.code == 0
    assert "--strict-plugins" in captured.out and "--lr" in captured.out
    assert captured.err.count("plugin 'broken'") == 1


def test_the_plugins_table_shows_the_failed_plugin_and_its_error(site, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per row

    status, table, err = trainloop("plugins", capsys=capsys)

    assert status == 0
    assert len(err) == 1 and BROKEN_LINE in err[0]
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if "│" in line}
    assert "entry point (fake-dist 1.0)" in rows["good"] and "on_fit_end" in rows["good"]
    assert "entry point (fake-dist 1.0)" in rows["broken"]
    assert "failed to load: ModuleNotFoundError: No module named" in rows["broken"]


@pytest.mark.parametrize("command", ["run", "plugins"])
def test_strict_plugins_stops_at_a_broken_plugin_with_one_line_and_status_2(
    command, site, tmp_path, capsys
):
    out = tmp_path / "run"
    recipe_args = [write_tiny_recipe(tmp_path), "--out", out] if command == "run" else []

    status, _, err = trainloop(command, *recipe_args, "--strict-plugins", capsys=capsys)

    assert status == 2
    assert len(err) == 1
    assert err[0].startswith(f"trainloop: error: {BROKEN_LINE}; --strict-plugins stops here")
    assert "uninstall fake-dist" in err[0] and "-p no:broken" in err[0]
    assert "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD=1" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "environment"),
    [(["-p", "no:broken"], {}), ([], {"TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"})],
    ids=["-p no:broken", "autoload off"],
)
def test_switching_the_broken_plugin_off_silences_it(
    args, environment, site, tmp_path, capsys, monkeypatch
):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    status, table, err = trainloop("plugins", "--strict-plugins", *args, capsys=capsys)

    assert status == 0 and err == []
    assert "broken" not in table


def test_a_run_with_the_broken_plugin_switched_off_is_quiet(site, tmp_path, capsys):
    out = tmp_path / "run"

    status, _, err = trainloop(
        "run", write_tiny_recipe(tmp_path), "--out", out, "-p", "no:broken", "--strict-plugins",
        capsys=capsys,
    )  # fmt: skip

    assert status == 0 and err == []
    assert (out / "good.txt").is_file()


def test_naming_the_broken_entry_point_with_p_is_an_error_naming_it(site, capsys):
    status, _, err = trainloop("plugins", "-p", "broken", capsys=capsys)

    assert status == 2
    assert err == [f"trainloop: error: -p broken: {BROKEN_LINE}"]


def test_p_loads_an_entry_point_by_its_name_when_autoload_is_off(site, capsys, monkeypatch):
    monkeypatch.setenv("TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD", "1")

    status, table, err = trainloop("plugins", "-p", "good", capsys=capsys)

    assert status == 0 and err == []
    assert any(
        "good" in line and "entry point (fake-dist 1.0)" in line for line in table.splitlines()
    )


def test_an_entry_point_with_an_unknown_hook_is_isolated_too(tmp_path, capsys, monkeypatch):
    folder = install_fake_dist(
        tmp_path / "site",
        "[trainloop]\ntypo = fake_typo_plugin\n",
        {"fake_typo_plugin": "def on_epoch_edn(learner):\n    pass\n"},
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD", raising=False)

    status, _, err = trainloop("plugins", capsys=capsys)

    assert status == 0
    assert len(err) == 1
    assert "plugin 'typo' (entry point 'typo = fake_typo_plugin' of fake-dist 1.0)" in err[0]
    assert "unknown hook 'on_epoch_edn' (did you mean 'on_epoch_end'?)" in err[0]


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("fake_needs_dep", "ModuleNotFoundError: No module named 'missing_dependency_xyz'"),
        ("fake_raises:plugin", "RuntimeError: cannot start here"),
    ],
)
def test_a_p_module_that_fails_to_import_is_named_with_its_error(
    spec, error, tmp_path, capsys, monkeypatch
):
    (tmp_path / "fake_needs_dep.py").write_text("import missing_dependency_xyz\n")
    (tmp_path / "fake_raises.py").write_text("raise RuntimeError('cannot\\nstart here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"

    status, _, err = trainloop(
        "run", write_tiny_recipe(tmp_path), "-p", spec, "--out", out, capsys=capsys
    )

    module = spec.partition(":")[0]
    assert status == 2
    assert err == [
        f"trainloop: error: -p {spec}: module {module!r} was found but importing it failed: {error}"
    ]
    assert not out.exists()


def test_a_p_module_that_does_not_exist_is_still_no_such_plugin(tmp_path, capsys):
    status, _, err = trainloop("plugins", "-p", "fake_no_such_module", capsys=capsys)

    assert status == 2
    assert len(err) == 1 and "-p fake_no_such_module: no such plugin" in err[0]


def test_plugins_help_prints_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainloop("plugins", "--help", capsys=capsys)

    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: trainloop plugins")
    assert "-p NAME" in help_text and "--strict-plugins" in help_text


def test_the_console_script_is_the_interrupt_safe_entry_point():
    (script,) = entry_points(group="console_scripts", name="trainloop")

    assert script.value == "trainloop._console:main"


def importing_torch(line: str) -> bool:
    """Whether ``line`` (of ``-X importtime``) says that a module of torch was imported."""
    return line.startswith("import time:") and line.split("|")[-1].strip().startswith("torch.")


def test_ctrl_c_while_the_modules_load_says_interrupted_without_a_traceback(tmp_path):
    # The console script's own code; PYTHONPROFILEIMPORTTIME prints a line as each import
    # ends, so the signal is sent once torch has begun to load, well before it is done.
    script = "import sys\nfrom trainloop._console import main\nsys.exit(main())\n"
    process = subprocess.Popen(
        [sys.executable, "-c", script, "run", str(write_tiny_recipe(tmp_path))],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    while not any(importing_torch(line) for line in seen[-1:]) and process.poll() is None:
        seen.append(process.stderr.readline())
    process.send_signal(signal.SIGINT)
    seen += process.stderr.readlines()
    process.wait(timeout=120)
    err = [line.rstrip("\n") for line in seen if line and not line.startswith("import time:")]

    assert process.returncode == 130
    assert err == ["trainloop: interrupted"]
    assert not (tmp_path / "runs").exists()
