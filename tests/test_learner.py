"""The Learner: event order, metrics, control flow, replaceable steps."""

from __future__ import annotations

import pytest
import torch
from conftest import make_data, make_learner

from trainloop import CancelBatch, CancelEpoch, Learner, StopFit, UsageError, hookimpl
from trainloop.hookspecs import event_names


def recorder_class():
    def make(event):
        def hook(self, learner):
            self.events.append(event)

        hook.__name__ = hook.__qualname__ = event
        return hook

    namespace = {
        name: make(name)
        for name in event_names()
        if name not in ("on_exception", "on_predict_batch_end")
    }
    namespace["__init__"] = lambda self: setattr(self, "events", [])
    cls = type("EventRecorder", (), namespace)
    for name in namespace:
        if name.startswith("on_"):
            getattr(cls, name).__qualname__ = f"EventRecorder.{name}"
    return cls


def test_a_two_epoch_fit_fires_the_events_in_the_documented_order():
    recorder = recorder_class()()
    learner = make_learner(plugins=[recorder])
    learner.train_data = make_data(samples=32, batch=16)  # 2 training batches
    learner.valid_data = make_data(samples=16, batch=16)  # 1 validation batch
    learner.fit(2)
    train_batch = [
        "on_batch_begin",
        "on_backward_end",
        "on_step_begin",
        "on_step_end",
        "on_batch_end",
    ]
    epoch = [
        "on_epoch_begin",
        "on_train_begin",
        *train_batch,
        *train_batch,
        "on_train_end",
        "on_valid_begin",
        "on_batch_begin",
        "on_batch_end",
        "on_valid_end",
        "on_epoch_end",
    ]
    assert recorder.events == ["on_fit_begin", *epoch, *epoch, "on_fit_end"]


def test_history_has_one_entry_per_epoch_with_losses_and_metrics():
    learner = make_learner()
    history = learner.fit(3)
    assert [entry["epoch"] for entry in history] == [0, 1, 2]
    assert set(history[0]) == {"epoch", "train_loss", "valid_loss", "valid_accuracy"}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert learner.history is history


def test_metrics_are_averaged_over_samples_so_an_uneven_last_batch_counts_for_what_it_holds():
    learner = make_learner()
    inputs = torch.zeros(5, 4)
    target = torch.tensor([0, 0, 0, 0, 1])
    learner.model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LogSoftmax(dim=1))
    with torch.no_grad():
        learner.model[0].weight.zero_()
        learner.model[0].bias.copy_(torch.tensor([1.0, 0.0]))  # always predicts class 0
    batches = [(inputs[:4], target[:4]), (inputs[4:], target[4:])]  # batch means 1.0 and 0.0
    metrics = learner.validate(batches)
    assert metrics["valid_accuracy"] == pytest.approx(4 / 5)  # not (1.0 + 0.0) / 2
    expected_loss = torch.nn.functional.nll_loss(learner.model(inputs), target).item()
    assert metrics["valid_loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_train_loss_is_the_sample_weighted_mean_of_the_batch_losses():
    seen = []

    class Losses:
        def on_batch_end(self, learner):
            if learner.training:
                seen.append((learner.loss.item(), len(learner.batch[1])))

    learner = make_learner(plugins=[Losses()])  # 50 samples in batches of 16: last has 2
    learner.fit(1)
    expected = sum(loss * size for loss, size in seen) / sum(size for _, size in seen)
    assert [size for _, size in seen] == [16, 16, 16, 2]
    assert learner.metrics["train_loss"] == pytest.approx(expected, rel=1e-6)


def test_cancel_batch_skips_the_optimizer_step_but_still_ends_the_batch():
    class SkipAll:
        ended = 0

        def on_backward_end(self):
            raise CancelBatch

        def on_batch_end(self):
            SkipAll.ended += 1

    learner = make_learner(plugins=[SkipAll()], valid=False)
    before = [p.clone() for p in learner.model.parameters()]
    learner.fit(1)
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))
    assert SkipAll.ended == 4


def test_cancel_epoch_skips_validation_but_the_epoch_still_ends():
    class CancelAfterTraining:
        ends = 0

        def on_train_end(self):
            raise CancelEpoch

        def on_epoch_end(self):
            CancelAfterTraining.ends += 1

    learner = make_learner(plugins=[CancelAfterTraining()])
    history = learner.fit(2)
    assert CancelAfterTraining.ends == 2
    assert "valid_loss" not in history[0]


def test_stop_fit_ends_training_cleanly_and_on_fit_end_runs():
    class StopAtThirdBatch:
        fit_ended = False

        def on_batch_end(self, learner):
            if learner.training and learner.step == 2:
                raise StopFit

        def on_fit_end(self, learner):
            StopAtThirdBatch.fit_ended = learner.exception is None

    learner = make_learner(plugins=[StopAtThirdBatch()])
    learner.fit(5)
    assert StopAtThirdBatch.fit_ended
    assert learner.epoch == 0 and learner.step == 3  # the third batch finished, then fit stopped


def test_should_stop_flag_ends_fit_after_the_current_epoch_when_set_at_epoch_end():
    class Patience:
        def on_epoch_end(self, learner):
            if learner.epoch == 1:
                learner.should_stop = True

    history = make_learner(plugins=[Patience()]).fit(10)
    assert [entry["epoch"] for entry in history] == [0, 1]


def test_on_fit_end_runs_when_a_plugin_fails_and_the_error_names_the_plugin_and_hook():
    calls = []

    class Broken:
        def on_epoch_begin(self):
            raise ZeroDivisionError("boom")

    class Watcher:
        def on_exception(self, exception):
            calls.append(("exception", type(exception).__name__))

        def on_fit_end(self, learner):
            calls.append(("fit_end", type(learner.exception).__name__))

    learner = make_learner(plugins=[Broken(), Watcher()])
    with pytest.raises(ZeroDivisionError) as raised:
        learner.fit(1)
    assert calls == [("exception", "ZeroDivisionError"), ("fit_end", "ZeroDivisionError")]
    assert "plugin 'Broken' raised it in hook 'on_epoch_begin'" in raised.value.__notes__


def test_a_plugin_can_own_a_step_and_the_core_default_is_not_called():
    class DoubleLoss:
        @hookimpl
        def compute_loss(self, learner, pred, batch):
            return 2 * learner.loss_func(pred, batch[1])

    plain, doubled = make_learner(), make_learner(plugins=[DoubleLoss()])
    batch = plain.train_data[0]
    plain.model.eval(), doubled.model.eval()
    assert doubled.hook.compute_loss(
        learner=doubled, pred=doubled.model(batch[0]), batch=batch
    ).item() == pytest.approx(
        2 * plain.hook.compute_loss(learner=plain, pred=plain.model(batch[0]), batch=batch).item()
    )
    assert doubled.validate()["valid_loss"] == pytest.approx(2 * plain.validate()["valid_loss"])


def test_a_wrapper_runs_around_the_forward_step():
    order = []

    class Around:
        @hookimpl(wrapper=True)
        def forward(self, batch):
            order.append("before")
            pred = yield
            order.append("after")
            return pred * 1.0

    learner = make_learner(plugins=[Around()], valid=False)
    learner.train_data = learner.train_data[:1]
    learner.fit(1)
    assert order == ["before", "after"]


def test_steps_only_the_core_implements_are_called_directly_not_through_pluggy():
    through_pluggy = []  # pluggy's own call monitoring sees every hook called through it
    learner = make_learner()
    undo = learner.plugin_manager.add_hookcall_monitoring(
        lambda hook_name, hook_impls, kwargs: through_pluggy.append(hook_name),
        lambda outcome, hook_name, hook_impls, kwargs: None,
    )
    learner.fit(1)
    manager = learner.plugin_manager
    core_steps = {caller.name for caller in manager.get_hookcallers(manager.get_plugin("core"))}
    assert {"forward", "backward", "optimizer_step"} <= core_steps
    assert through_pluggy  # the monitoring works: the set-up hooks go through pluggy
    assert set(through_pluggy).isdisjoint(core_steps)
    assert set(through_pluggy).isdisjoint(event_names())  # no plugin implements any

    backward_calls = []

    class Owner:
        @hookimpl
        def backward(self, loss):
            backward_calls.append(loss)
            loss.backward()
            return True

    learner.add_plugin(Owner())
    through_pluggy.clear()
    learner.fit(1)
    undo()
    assert through_pluggy.count("backward") == len(backward_calls) == 4  # 4 batches an epoch


def test_gradient_steps_can_be_skipped_with_should_step():
    class EveryOther:
        @hookimpl
        def should_step(self, learner):
            return learner.iteration % 2 == 1

    stepped = []

    class Count:
        def on_step_end(self, learner):
            stepped.append(learner.iteration)

    make_learner(plugins=[EveryOther(), Count()], valid=False).fit(1)
    assert stepped == [1, 3]


def test_predict_fires_the_predict_events_and_returns_concatenated_predictions():
    seen = []

    class Stream:
        def on_predict_batch_end(self, batch, pred):
            seen.append(pred.shape[0])

    learner = make_learner(plugins=[Stream()])
    data = [x for x, _ in make_data(samples=20, batch=8)]
    predictions = learner.predict(data)
    assert predictions.shape == (20, 2)
    assert seen == [8, 8, 4]
    assert learner.predict(data, keep=False) is None


def test_optimizer_may_be_given_as_an_instance():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    learner = Learner(
        model, make_data(), loss_func=torch.nn.functional.cross_entropy, optimizer=optimizer
    )
    assert learner.optimizer is optimizer
    learner.fit(1)


def test_state_dict_round_trips_the_loop_counters_and_partial_train_loss():
    losses = []  # (loss, batch size) of each training batch

    class StopAfterStep6:
        def on_batch_end(self, learner):
            if learner.training:
                losses.append((learner.loss.item(), len(learner.batch[1])))
                if learner.step + 1 == 6:
                    raise StopFit

    learner = make_learner([StopAfterStep6()])
    learner.fit(2)  # 4 batches an epoch: it stops after epoch 1's second batch
    state = learner.state_dict()
    other = make_learner()
    other.load_state_dict(state)
    assert (other.epoch, other.iteration, other.step) == (1, 2, 6)
    assert other.history == learner.history and len(other.history) == 1
    again = other.state_dict()
    assert again["train_losses"].tolist() == [loss for loss, _ in losses[4:]]  # epoch 1's
    assert again["train_sizes"] == [size for _, size in losses[4:]] == [16, 16]


def test_empty_training_data_is_a_usage_error_not_a_silent_nan():
    learner = make_learner()
    learner.train_data = []
    with pytest.raises(UsageError, match="training data yielded no batches"):
        learner.fit(1)


def test_empty_validation_data_is_a_usage_error():
    learner = make_learner()
    learner.valid_data = []
    with pytest.raises(UsageError, match="validation data yielded no batches"):
        learner.fit(1)


def test_stop_fit_inside_a_batch_counts_that_batch_as_done_so_a_resume_does_not_repeat_it():
    class StopInSecondBatch:
        def on_backward_end(self, learner):
            if learner.iteration == 1:
                raise StopFit

    learner = make_learner(plugins=[StopInSecondBatch()], valid=False)
    learner.fit(3)
    assert (learner.epoch, learner.iteration, learner.step) == (0, 2, 2)


def test_dict_batches_train_and_get_metrics_through_the_get_target_step():
    class DictBatches:
        @hookimpl
        def forward(self, learner, batch):
            return learner.model(batch["image"])

        @hookimpl
        def get_target(self, batch):
            return batch["label"]

    tuples = make_learner()
    dicts = make_learner(plugins=[DictBatches()])
    dicts.train_data = [{"image": x, "label": y} for x, y in tuples.train_data]
    dicts.valid_data = [{"image": x, "label": y} for x, y in tuples.valid_data]
    assert dicts.fit(2) == tuples.fit(2)  # same seed, same data: the same numbers
    assert "valid_accuracy" in dicts.history[-1]
