"""Test-time augmentation's effect on the validation Dice of a finished Carvana run.

Rebuilds the run's Learner from ``RUN_DIR/model.pt`` (its data too) and validates it
three times: as trained, with ``FlipTTA("flip")`` (2 passes) and with
``FlipTTA("flips")`` (4 passes); prints each ``valid_dice`` and its time.

Run: ``python benchmarks/tta_dice.py RUN_DIR`` (a run of ``recipes/unet_carvana.py``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from trainloop.plugins.model_saver import rebuild
from trainloop.tasks.carvana.tta import FlipTTA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    run_dir = parser.parse_args().run_dir
    learner = rebuild(run_dir / "model.pt")
    base = None
    for mode in ("none", "flip", "flips"):
        tta = FlipTTA(mode) if mode != "none" else None
        if tta is not None:
            tta.active = True
            learner.add_plugin(tta)
        start = time.perf_counter()
        dice = learner.validate()["valid_dice"]
        seconds = time.perf_counter() - start
        base = dice if base is None else base
        print(f"{mode:>6}: valid_dice {dice:.5f} ({dice - base:+.5f})  {seconds:.2f} s")
        if tta is not None:
            learner.plugin_manager.unregister(tta)


if __name__ == "__main__":
    main()
