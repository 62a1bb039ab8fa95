"""Predictions from the best weights, and ``trainloop predict RUN_DIR`` on a finished run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_learner

from trainloop.cli import main
from trainloop.plugins.model_saver import ModelSaver

CARVANA = ROOT / "recipes" / "unet_carvana.py"
TINY_CARVANA = (
    "--synthetic-cars", "4", "--synthetic-test-cars", "1", "--image-size", "64", "48",
    "--base-width", "4", "--depth", "2", "--batch-size", "8",
)  # fmt: skip


class WorseEachEpoch:
    """Reports a valid_loss that grows, so the first epoch is the best; keeps its weights."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, learner) -> None:
        learner.metrics["valid_loss"] = float(learner.epoch)
        self.weights.append(copy.deepcopy(learner.model.state_dict()))


@pytest.mark.parametrize("predict_with", ["best", "last"])
def test_a_predict_after_fit_uses_the_best_epochs_weights_unless_asked_for_the_last(
    tmp_path, capsys, predict_with
):
    worse = WorseEachEpoch()
    saver = ModelSaver(tmp_path / "model.pt", monitor="valid_loss", predict_with=predict_with)
    learner = make_learner([worse, saver])
    learner.fit(3)
    inputs = torch.randn(5, 4)
    learner.predict([(inputs,)])

    wanted = worse.weights[0] if predict_with == "best" else worse.weights[-1]
    for name, tensor in learner.model.state_dict().items():
        assert torch.equal(tensor, wanted[name]), name
    said = capsys.readouterr().out
    if predict_with == "best":
        assert (
            "predicting with the weights of epoch 1, the best by valid_loss (0); "
            "--predict-with last keeps the last epoch's" in said
        )
    else:
        assert "predicting with" not in said


def test_when_the_last_epoch_is_the_best_predict_says_so_once(tmp_path, capsys):
    class BetterEachEpoch:
        def on_epoch_end(self, learner) -> None:
            learner.metrics["valid_loss"] = -float(learner.epoch)

    saver = ModelSaver(tmp_path / "model.pt", monitor="valid_loss")
    learner = make_learner([BetterEachEpoch(), saver])
    learner.fit(3)
    last = copy.deepcopy(learner.model.state_dict())
    learner.predict([(torch.randn(5, 4),)])
    learner.predict([(torch.randn(5, 4),)])

    for name, tensor in learner.model.state_dict().items():
        assert torch.equal(tensor, last[name]), name
    said = capsys.readouterr().out.splitlines()
    assert (
        said.count(
            "predicting with the weights of epoch 3, the last and the best by valid_loss (-2)"
        )
        == 1
    )


@pytest.fixture(scope="module")
def carvana_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("carvana")
    out = folder / "run"
    status = main(
        ["run", str(CARVANA), "--input-dir", str(folder / "input"), *TINY_CARVANA,
         "--epochs", "2", "--out", str(out)]
    )  # fmt: skip
    assert status == 0 and (out / "submit.csv.gz").exists()
    return out


def test_trainloop_predict_reproduces_the_runs_submission_byte_for_byte(carvana_run, capsys):
    assert main(["predict", str(carvana_run)]) == 0
    (folder,) = (carvana_run / "predict").iterdir()
    assert (folder / "submit.csv.gz").read_bytes() == (carvana_run / "submit.csv.gz").read_bytes()
    assert f"predictions of {carvana_run / 'model.pt'}: {folder}" in capsys.readouterr().out


def test_trainloop_predict_takes_options_and_another_out(carvana_run, tmp_path, capsys):
    out = tmp_path / "lower"
    assert main(["predict", str(carvana_run), "--threshold", "0.01", "--out", str(out)]) == 0
    assert (out / "submit.csv.gz").read_bytes() != (carvana_run / "submit.csv.gz").read_bytes()


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_run_folders_are_one_line_and_write_nothing(carvana_run, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder: give a run folder" in error_line(capsys)
    assert main(["predict", str(carvana_run / "checkpoints")]) == 2
    assert "is not a run folder: it has no config.json" in error_line(capsys)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((carvana_run / "config.json").read_text())
    assert main(["predict", str(unfinished)]) == 2
    assert "has no model.pt" in error_line(capsys)
    assert sorted(path.name for path in unfinished.iterdir()) == ["config.json"]


def test_weights_that_do_not_fit_an_overridden_model_are_one_line(carvana_run, capsys):
    before = sorted(carvana_run.iterdir())
    assert main(["predict", str(carvana_run), "--base-width", "8"]) == 2
    assert "model.pt: its weights do not fit the recipe's model" in error_line(capsys)
    assert sorted(carvana_run.iterdir()) == before  # no predict/ folder left behind


def test_a_recipe_without_a_predict_step_is_one_line(tmp_path, capsys):
    out = tmp_path / "neuron"
    recipe = tmp_path / "nopredict.py"
    recipe.write_text(
        (ROOT / "tests" / "conftest.py").read_text().split('TINY_RECIPE = """')[1].split('"""')[0]
    )
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["predict", str(out)]) == 2
    assert "has no predict(learner, cfg) step" in error_line(capsys)


# --- test-time augmentation -------------------------------------------------------------


class Lopsided(torch.nn.Module):
    """Logits that depend on where a pixel is: flips change the prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-2, 2, 6).repeat(4, 1)[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@pytest.mark.parametrize(("mode", "flips"), [("flip", [(3,)]), ("flips", [(3,), (2,), (2, 3)])])
def test_flip_tta_averages_the_probabilities_of_the_flipped_predictions(mode, flips):
    from trainloop import Learner
    from trainloop.tasks.carvana.tta import FlipTTA

    images = torch.randn(2, 1, 4, 6)
    model = Lopsided()
    learner = Learner(
        model, [(images, images)], loss_func=torch.nn.functional.mse_loss, plugins=[FlipTTA(mode)]
    )
    pred = learner.predict([(images, torch.arange(2))])

    with torch.no_grad():
        maps = [torch.sigmoid(model(images))]
        maps += [torch.sigmoid(model(images.flip(dims))).flip(dims) for dims in flips]
    assert torch.allclose(torch.sigmoid(pred), torch.stack(maps).mean(0), atol=1e-6)
    assert not torch.allclose(torch.sigmoid(pred), maps[0])  # the flips did change it
    learner.validate([(images, images)])  # outside predict it is off: one pass
    assert learner.pred.shape == images.shape


def test_tta_is_a_carvana_option_and_other_recipes_do_not_have_it(tmp_path, capsys):
    assert main(["run", str(ROOT / "recipes" / "single_node.py"), "--tta", "flip"]) == 2
    assert "unknown option(s) --tta flip" in error_line(capsys)
    assert main(["run", str(CARVANA), "--tta", "rotate", "--out", str(tmp_path / "r")]) == 2
    assert "--tta: invalid choice: 'rotate'" in error_line(capsys)
