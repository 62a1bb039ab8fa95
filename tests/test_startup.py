"""What each command imports: the quick ones load no more than they need.

These check the modules a command leaves in ``sys.modules``, not its time
(``benchmarks/startup.py`` measures that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

# The console script's own code, then the names in sys.modules, also after a SystemExit.
REPORT_MODULES = """
import json, os, sys
from trainloop._console import main
try:
    main()
finally:
    with open(os.environ["MODULES_FILE"], "w") as file:
        json.dump(sorted(sys.modules), file)
"""


def modules_after(*args: str, tmp_path) -> set[str]:
    """The modules imported by the time ``trainloop ARGS`` ends (run from the repository)."""
    listing = tmp_path / "modules.json"
    subprocess.run(
        [sys.executable, "-c", REPORT_MODULES, *args],
        cwd=ROOT,
        env={**os.environ, "MODULES_FILE": str(listing)},
        capture_output=True,
        check=True,
        timeout=300,
    )
    return set(json.loads(listing.read_text()))


def test_version_and_help_do_not_import_torch(tmp_path):
    for args in (["--version"], ["--help"]):
        modules = modules_after(*args, tmp_path=tmp_path)

        assert "trainloop.cli" in modules, args  # the command did run
        assert "torch" not in modules, args


@pytest.mark.parametrize("recipe", ["recipes/mnist_mlp.py", "recipes/unet_carvana.py"])
def test_run_recipe_help_imports_neither_torchvision_nor_dynamo(recipe, tmp_path):
    modules = modules_after("run", recipe, "--help", tmp_path=tmp_path)

    assert f"trainloop_recipe_{Path(recipe).stem}" in modules  # the recipe was loaded
    assert "torch" in modules  # the recipe's model is a torch module
    assert "torchvision" not in modules  # only once build() loads the images
    assert "torch._dynamo" not in modules
