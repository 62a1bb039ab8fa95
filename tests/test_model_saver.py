"""The model_saver plugin: model.pt holds the best weights and what rebuilds them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_learner

from trainloop import Learner, cli
from trainloop.monitor import Monitor
from trainloop.plugins.checkpoint import Checkpoint
from trainloop.plugins.model_saver import ModelSaver, config_from_dict, rebuild
from trainloop.tasks.mnist.data import write_idx_files

RECIPE = '''
"""A linear model on fixed data, for model_saver tests."""

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainloop import Learner


@dataclass
class Config:
    epochs: int = 2
    samples: int = 32
    note_dir: Path = field(default=Path("notes"))
    sizes: tuple[int, ...] = (1, 2)


def build(cfg):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(cfg.samples, 4, generator=generator)
    target = (inputs.sum(dim=1) > 0).long()
    batches = [(inputs[i : i + 8], target[i : i + 8]) for i in range(0, cfg.samples, 8)]
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LogSoftmax(dim=1))
    return Learner(model, batches, batches[:2], optimizer=functools.partial(torch.optim.SGD, lr=0.1))
'''


class Scores:
    """Adds ``score`` to each epoch's metrics and keeps a copy of the weights at each epoch end."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, learner: Learner) -> None:
        learner.metrics["score"] = self.scores[learner.epoch]
        self.weights.append({k: v.clone() for k, v in learner.model.state_dict().items()})


class Fail:
    def __init__(self, epoch: int, error: BaseException) -> None:
        self.epoch, self.error = epoch, error

    def on_epoch_begin(self, learner: Learner) -> None:
        if learner.epoch == self.epoch:
            raise self.error


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_model_pt_holds_the_best_epochs_weights_and_metrics(tmp_path: Path) -> None:
    scores = Scores([1.0, 3.0, 2.0])
    learner = make_learner([ModelSaver(tmp_path / "model.pt", Monitor("score", "max")), scores])
    learner.fit(3)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["format"] == "trainloop-model"
    assert _same(saved["model"], scores.weights[1])
    assert not _same(saved["model"], learner.model.state_dict())
    assert saved["metrics"] == learner.history[1] and saved["metrics"]["score"] == 3.0
    assert saved["config"] is None and saved["recipe"] is None


def test_without_a_monitored_metric_it_saves_the_final_weights(tmp_path: Path) -> None:
    learner = make_learner([ModelSaver(monitor=Monitor())], valid=False, run_dir=tmp_path)
    learner.fit(2)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert _same(saved["model"], learner.model.state_dict())
    assert saved["metrics"] == learner.history[-1]


def test_nothing_is_saved_when_fit_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        make_learner([ModelSaver(tmp_path / "model.pt"), Fail(1, RuntimeError("x"))]).fit(3)
    assert not (tmp_path / "model.pt").exists()


def test_a_hard_interrupt_saves_the_best_copy_but_never_live_weights(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        make_learner([ModelSaver(tmp_path / "a.pt"), Fail(1, KeyboardInterrupt())]).fit(3)
    assert not (tmp_path / "a.pt").exists()  # no monitor: only live weights, mid-step
    scores = Scores([2.0, 1.0, 0.0])
    with pytest.raises(KeyboardInterrupt):
        saver = ModelSaver(tmp_path / "b.pt", Monitor("score", "max"))
        make_learner([saver, scores, Fail(1, KeyboardInterrupt())]).fit(3)
    assert _same(torch.load(tmp_path / "b.pt", weights_only=True)["model"], scores.weights[0])


def test_the_best_weights_survive_a_resume(tmp_path: Path) -> None:
    monitor_scores = [5.0, 1.0, 2.0, 3.0]
    first = Scores(monitor_scores)
    with pytest.raises(RuntimeError):
        make_learner(
            [
                Checkpoint(tmp_path),
                ModelSaver(tmp_path / "model.pt", Monitor("score", "max")),
                first,
                Fail(2, RuntimeError("crash")),
            ]
        ).fit(4)
    assert not (tmp_path / "model.pt").exists()
    resumed = make_learner(
        [
            Checkpoint(tmp_path, resume=tmp_path / "last.pt"),
            ModelSaver(tmp_path / "model.pt", Monitor("score", "max")),
            Scores(monitor_scores),
        ]
    )
    resumed.fit(4)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert _same(saved["model"], first.weights[0])  # epoch 0 from before the crash
    assert saved["metrics"]["epoch"] == 0


def test_checkpoints_carry_the_best_weights_only_when_they_differ(tmp_path: Path) -> None:
    make_learner(
        [Checkpoint(tmp_path), ModelSaver(tmp_path / "m.pt", Monitor("score", "max"))]
        + [Scores([1.0, 0.0])]
    ).fit(1)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["model_saver"]["model"] is None


def test_config_from_dict_restores_paths_and_tuples() -> None:
    @dataclasses.dataclass
    class Config:
        data_dir: Path = Path("data")
        sizes: tuple[int, ...] = (1,)
        maybe: Path | None = None
        rate: float = 0.1

    config = config_from_dict(Config, {"data_dir": "d", "sizes": [3, 4], "maybe": "m"})
    assert config == Config(Path("d"), (3, 4), Path("m"), 0.1)
    with pytest.raises(ValueError, match="no field"):
        config_from_dict(Config, {"nope": 1})


def test_the_cli_writes_model_pt_that_rebuilds_the_model(tmp_path: Path) -> None:
    recipe = tmp_path / "linear.py"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    assert cli.main(["run", str(recipe), "--out", str(out), "--samples", "24"]) == 0
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["recipe"] == str(recipe)
    assert saved["config"] == {"epochs": 2, "samples": 24, "note_dir": "notes", "sizes": [1, 2]}
    learner = rebuild(out / "model.pt")
    assert _same(learner.model.state_dict(), saved["model"])
    assert len(learner.train_data) == 3  # built with the saved samples=24


def test_no_save_model_writes_no_model_pt(tmp_path: Path) -> None:
    recipe = tmp_path / "linear.py"
    recipe.write_text(RECIPE)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "run"), "--no-save-model"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "run" / "model.pt").exists()


def test_mnist_recipe_leaves_last_best_and_model(tmp_path: Path) -> None:
    write_idx_files(tmp_path / "data" / "MNIST" / "raw", 400, 100)
    out = tmp_path / "run"
    status = cli.main(
        ["run", str(ROOT / "recipes" / "mnist_mlp.py"), "--data-dir", str(tmp_path / "data")]
        + ["--no-download", "--epochs", "2", "--out", str(out), "-p", "no:tensorboard"]
    )
    assert status == 0
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    model = torch.load(out / "model.pt", weights_only=True)
    assert last["learner"]["epoch"] == 2 and last["config"]["batch_size"] == 200
    best_epoch = min(last["learner"]["history"], key=lambda record: record["valid_loss"])
    assert best["learner"]["history"][-1] == best_epoch == model["metrics"]
    assert _same(model["model"], best["model"])
    assert model["model"]["fc1.weight"].shape == (200, 784)
