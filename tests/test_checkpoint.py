"""The checkpoint plugin: what it writes, when, and that every write is atomic."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_data, make_learner

from trainloop import Learner, UsageError, cli
from trainloop.monitor import Monitor
from trainloop.plugins.checkpoint import Checkpoint, read_checkpoint
from trainloop.run_folder import atomic_save
from trainloop.state import capture_rng_state, json_safe, set_rng_state

BATCHES = len(make_data())  # 4 batches of 16 out of 50 samples


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _point(path: Path) -> tuple[int, int, int]:
    state = _load(path)["learner"]
    return state["epoch"], state["iteration"], state["step"]


class Watcher:
    """Records the resume point of last.pt before every batch and at the end of fit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: list[tuple[int, int, int]] = []

    def on_batch_begin(self, learner: Learner) -> None:
        self._look()

    def on_fit_end(self, learner: Learner) -> None:
        self._look()

    def _look(self) -> None:
        last = self.directory / "last.pt"
        if last.exists() and (not self.seen or self.seen[-1] != _point(last)):
            self.seen.append(_point(last))


class Scores:
    """Adds ``score`` to each epoch's metrics, from a list."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def on_epoch_end(self, learner: Learner) -> None:
        learner.metrics["score"] = self.scores[learner.epoch]


def test_last_pt_holds_everything_a_resume_needs(tmp_path: Path) -> None:
    learner = make_learner([Checkpoint(tmp_path)])
    learner.fit(2)
    checkpoint = _load(tmp_path / "last.pt")

    assert checkpoint["format"] == "trainloop-checkpoint" and checkpoint["version"] == 1
    for name, tensor in learner.model.state_dict().items():
        assert torch.equal(checkpoint["model"][name], tensor)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.1
    state = checkpoint["learner"]
    assert (state["epoch"], state["iteration"], state["step"]) == (2, 0, 2 * BATCHES)
    assert state["history"] == learner.history
    assert set(checkpoint["rng"]) >= {"python", "numpy", "torch"}
    assert checkpoint["epoch_rng"] is None  # at an epoch end nothing is left to replay
    assert checkpoint["config"] is None
    own = checkpoint["checkpoint"]
    assert {key: own[key] for key in ("kept_best", "monitor")} == {"kept_best": [], "monitor": None}
    assert own["optimizer_start"][0]["lr"] == 0.1  # a resume compares a new --lr with it
    assert checkpoint["train_batches"] == BATCHES


def test_last_pt_is_written_at_each_epoch_end_only_by_default(tmp_path: Path) -> None:
    watcher = Watcher(tmp_path)
    make_learner([Checkpoint(tmp_path), watcher]).fit(3)
    assert watcher.seen == [(1, 0, 4), (2, 0, 8), (3, 0, 12)]

    class PerBatchHooks:
        def on_train_begin(self, learner):
            owners = [impl.plugin_name for impl in learner.hook.on_batch_end.get_hookimpls()]
            watcher.per_batch = [name for name in owners if "checkpoint" in name.lower()]

    make_learner([Checkpoint(tmp_path / "again"), watcher, PerBatchHooks()]).fit(1)
    assert watcher.per_batch == []  # nothing per batch


def test_checkpoint_every_n_batches_writes_mid_epoch_resume_points(tmp_path: Path) -> None:
    watcher = Watcher(tmp_path)
    plugin = Checkpoint(tmp_path, every=3)
    make_learner([plugin, watcher]).fit(2)
    # (epoch, batches of it done, steps): after steps 3 and 6, and at both epoch ends
    assert watcher.seen == [(0, 3, 3), (1, 0, 4), (1, 2, 6), (2, 0, 8)]
    mid_epoch = Checkpoint(tmp_path, every=3)
    with pytest.raises(RuntimeError):
        make_learner([mid_epoch, Stop(at_step=7, error=True)]).fit(2)
    assert _load(tmp_path / "last.pt")["epoch_rng"] is not None


class Stop:
    """Stops fit after training step ``at_step``: with the flag, or with an error."""

    def __init__(self, at_step: int, error: bool = False) -> None:
        self.at_step = at_step
        self.error = error

    def on_batch_end(self, learner: Learner) -> None:
        if learner.training and learner.step + 1 == self.at_step:
            if self.error:
                raise RuntimeError("boom")
            learner.should_stop = True


def test_a_clean_stop_writes_last_pt_at_the_stop_point(tmp_path: Path) -> None:
    learner = make_learner([Checkpoint(tmp_path), Stop(at_step=6)])
    learner.fit(3)
    assert _point(tmp_path / "last.pt") == (1, 2, 6)
    assert _load(tmp_path / "last.pt")["learner"]["train_losses"].shape == (2,)


def test_an_error_leaves_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        make_learner([Checkpoint(tmp_path), Stop(at_step=6, error=True)]).fit(3)
    assert _point(tmp_path / "last.pt") == (1, 0, 4)


def test_best_pt_and_keep_best_rotate_the_files(tmp_path: Path) -> None:
    scores = [1.0, 3.0, 2.0, 5.0, 4.0, float("nan")]
    seen = []

    class Files:
        def on_epoch_begin(self) -> None:
            seen.append(_best_files(tmp_path))

    plugin = Checkpoint(tmp_path, monitor=Monitor("score", "max"), keep_best=2)
    make_learner([plugin, Scores(scores), Files()]).fit(6)
    seen.append(_best_files(tmp_path))

    assert seen[1:] == [
        {"best.pt": 0},
        {"best.pt": 1, "best-0.pt": 0},
        {"best.pt": 1, "best-2.pt": 2},
        {"best.pt": 3, "best-1.pt": 1},
        {"best.pt": 3, "best-4.pt": 4},
        {"best.pt": 3, "best-4.pt": 4},  # NaN is never among the best
    ]
    assert plugin.kept == [(5.0, 3), (4.0, 4)]
    assert _load(tmp_path / "best.pt")["learner"]["history"][-1]["score"] == 5.0
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def _best_files(directory: Path) -> dict[str, int]:
    """Each best file and the epoch whose end it holds."""
    return {
        path.name: _load(path)["learner"]["history"][-1]["epoch"]
        for path in directory.glob("best*.pt")
    }


def test_keep_best_one_keeps_only_best_pt_of_the_lowest_value(tmp_path: Path) -> None:
    scores = [3.0, 1.0, 2.0]
    make_learner([Checkpoint(tmp_path, monitor=Monitor("score", "min")), Scores(scores)]).fit(3)
    assert _best_files(tmp_path) == {"best.pt": 1}


def test_no_best_pt_without_validation_data_for_valid_loss(tmp_path: Path) -> None:
    make_learner([Checkpoint(tmp_path, monitor=Monitor())], valid=False).fit(2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.pt"]


def test_a_monitor_metric_the_epoch_lacks_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--monitor valid_f1: no such metric"):
        make_learner([Checkpoint(tmp_path, monitor=Monitor("valid_f1"))]).fit(1)


def test_best_ranking_survives_a_resume(tmp_path: Path) -> None:
    first = Checkpoint(tmp_path, monitor=Monitor("score", "max"), keep_best=2)
    make_learner([first, Scores([2.0, 1.0, 9.0, 0.5, 3.0])]).fit(2)
    resumed = Checkpoint(
        tmp_path, monitor=Monitor("score", "max"), keep_best=2, resume=tmp_path / "last.pt"
    )
    make_learner([resumed, Scores([2.0, 1.0, 9.0, 0.5, 3.0])]).fit(5)
    assert resumed.kept == [(9.0, 2), (3.0, 4)]
    assert resumed.monitor.best == 9.0
    assert _best_files(tmp_path) == {"best.pt": 2, "best-4.pt": 4}


def test_save_checkpoint_hook_writes_a_named_checkpoint_and_returns_its_path(tmp_path):
    learner = make_learner([Checkpoint(tmp_path)])
    learner.fit(1)
    path = learner.hook.save_checkpoint(learner=learner, name="manual")
    assert path == tmp_path / "manual.pt"
    assert _point(path) == _point(tmp_path / "last.pt") == (1, 0, 4)
    with pytest.raises(ValueError, match="plain file name"):
        learner.hook.save_checkpoint(learner=learner, name="../escape")


def test_without_write_nothing_is_written(tmp_path: Path) -> None:
    learner = make_learner([Checkpoint(tmp_path / "checkpoints", write=False)])
    learner.fit(2)
    assert learner.hook.save_checkpoint(learner=learner, name="interrupt") is None
    assert not (tmp_path / "checkpoints").exists()


def test_the_default_folder_is_the_run_folders_checkpoints(tmp_path: Path) -> None:
    make_learner([Checkpoint()], run_dir=tmp_path).fit(1)
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    with pytest.raises(ValueError, match="needs a directory"):
        make_learner([Checkpoint()]).fit(1)


def test_config_is_saved_with_json_types(tmp_path: Path) -> None:
    @dataclasses.dataclass
    class Config:
        data_dir: Path = Path("data/mnist")
        sizes: tuple[int, ...] = (1, 2)
        rate: float = 0.5

    learner = make_learner([Checkpoint(tmp_path)])
    learner.config = Config()
    learner.fit(1)
    assert _load(tmp_path / "last.pt")["config"] == {
        "data_dir": "data/mnist",
        "sizes": [1, 2],
        "rate": 0.5,
    }
    assert json_safe({"a": np.float32(1.5), 2: {3}, "t": torch.tensor(4)}) == {
        "a": 1.5,
        "2": [3],
        "t": 4,
    }


# --- files -----------------------------------------------------------------------------


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"generation": 1}, path)

    def save_half_then_die(obj, file) -> None:
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # what a kill looks like from inside the process

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"generation": 2}, path)
    assert _load(path) == {"generation": 1}
    assert [item.name for item in tmp_path.iterdir()] == ["last.pt"]


def test_a_temporary_file_left_by_a_kill_is_removed_when_fit_starts(tmp_path: Path) -> None:
    stale = tmp_path / ".last.pt.0123abcd.tmp"
    stale.write_bytes(b"half")
    make_learner([Checkpoint(tmp_path)]).fit(1)
    assert not stale.exists()
    assert read_checkpoint(tmp_path / "last.pt")["learner"]["epoch"] == 1


def test_files_get_the_usual_permissions(tmp_path: Path) -> None:
    atomic_save({}, tmp_path / "x.pt")
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "x.pt").stat().st_mode == (tmp_path / "plain").stat().st_mode


# --- RNG -------------------------------------------------------------------------------


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    loader = torch.utils.data.DataLoader(range(10), shuffle=True, generator=generator)
    torch.save(capture_rng_state(loader), tmp_path / "rng.pt")

    def draw() -> tuple:
        values = (random.random(), np.random.rand(), torch.rand(1).item())
        return values + (torch.rand(1, generator=generator).item(),)

    first = draw()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), loader)
    assert draw() == first


# --- command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--checkpoint-every", "-1"], "--checkpoint-every -1"),
        (["--keep-best", "-2"], "--keep-best -2"),
    ],
)
def test_bad_checkpoint_options_are_usage_errors(option, message, tmp_path, capsys) -> None:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "single_node.py"
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "run"), *option]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_a_monitor_shared_with_model_saver_gives_both_the_same_best(tmp_path: Path) -> None:
    from trainloop.plugins.model_saver import ModelSaver

    shared = Monitor("score", "max")
    plugins = [Checkpoint(tmp_path, monitor=shared), ModelSaver(tmp_path / "model.pt", shared)]
    make_learner(plugins + [Scores([1.0, 3.0, 2.0])]).fit(3)
    assert _best_files(tmp_path) == {"best.pt": 1}
    assert torch.load(tmp_path / "model.pt", weights_only=True)["metrics"]["epoch"] == 1


def test_resume_applies_to_the_first_fit_only(tmp_path: Path) -> None:
    make_learner([Checkpoint(tmp_path)]).fit(2)
    plugin = Checkpoint(tmp_path / "again", resume=tmp_path / "last.pt")
    learner = make_learner([plugin])
    learner.fit(3)
    assert [record["epoch"] for record in learner.history] == [0, 1, 2]
    assert plugin.resumed_from == tmp_path / "last.pt"
    learner.fit(1)  # a second fit on the same learner starts afresh
    assert learner.history == [learner.history[0]] and learner.history[0]["epoch"] == 0


def test_the_neuron_recipes_descent_path_is_whole_after_a_resume(tmp_path: Path) -> None:
    # The recipe draws the path of (w, b) over all steps at the end: a resumed run must
    # draw the steps before the stop too, as the run never stopped does.
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "single_node.py")
    quiet = ["--progress", "plain", "--no-tensorboard"]
    assert cli.main(["run", recipe, "--epochs", "4", "--out", str(tmp_path / "whole"), *quiet]) == 0
    assert cli.main(["run", recipe, "--epochs", "2", "--out", str(tmp_path / "part"), *quiet]) == 0
    resumed = ["run", recipe, "--epochs", "4", "--resume", "--out", str(tmp_path / "part"), *quiet]
    assert cli.main(resumed) == 0
    whole = (tmp_path / "whole" / "error_surface.png").read_bytes()
    assert (tmp_path / "part" / "error_surface.png").read_bytes() == whole
