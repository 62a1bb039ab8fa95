import pytest
import torch

from trainloop.data.tensors import TensorBatches


def numbered(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs 0..n-1 as a column and targets ten times them, to check rows stay paired."""
    inputs = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return inputs, torch.arange(n) * 10


def test_unshuffled_batches_come_in_order_with_an_uneven_last_batch():
    inputs, targets = numbered(10)
    batches = TensorBatches(inputs, targets, batch_size=4)

    assert len(batches) == 3
    assert [batch_targets.tolist() for _, batch_targets in batches] == [
        [0, 10, 20, 30],
        [40, 50, 60, 70],
        [80, 90],
    ]
    first_inputs, _ = next(iter(batches))
    assert first_inputs.shape == (4, 1)
    assert first_inputs.data_ptr() == inputs.data_ptr()  # a view, not a copy


def test_drop_last_leaves_out_the_short_batch_only():
    inputs, targets = numbered(10)

    dropped = TensorBatches(inputs, targets, batch_size=4, drop_last=True)
    assert len(dropped) == 2
    assert [len(batch_inputs) for batch_inputs, _ in dropped] == [4, 4]

    even = TensorBatches(inputs, targets, batch_size=5, drop_last=True)
    assert len(even) == 2
    assert [len(batch_inputs) for batch_inputs, _ in even] == [5, 5]


def test_shuffled_batches_cover_every_sample_exactly_once_and_keep_rows_paired():
    inputs, targets = numbered(23)
    torch.manual_seed(0)
    batches = TensorBatches(inputs, targets, batch_size=5, shuffle=True)

    seen = list(batches)
    assert [len(batch_targets) for _, batch_targets in seen] == [5, 5, 5, 5, 3]
    all_inputs = torch.cat([batch_inputs.squeeze(1) for batch_inputs, _ in seen])
    all_targets = torch.cat([batch_targets for _, batch_targets in seen])
    assert sorted(all_inputs.long().tolist()) == list(range(23))
    assert torch.equal(all_targets, all_inputs.long() * 10)
    assert all_inputs.long().tolist() != list(range(23))  # shuffled, not in order


def test_shuffled_drop_last_leaves_out_the_short_batch():
    inputs, targets = numbered(23)
    batches = TensorBatches(inputs, targets, batch_size=5, shuffle=True, drop_last=True)

    assert len(batches) == 4
    assert sum(len(batch_targets) for _, batch_targets in batches) == 20


def test_the_order_is_torch_randperm_from_the_global_rng():
    inputs, targets = numbered(12)
    batches = TensorBatches(inputs, targets, batch_size=12, shuffle=True)

    torch.manual_seed(7)
    expected = torch.randperm(12) * 10
    torch.manual_seed(7)
    ((_, batch_targets),) = batches
    assert torch.equal(batch_targets, expected)


def test_the_same_global_rng_state_before_iter_replays_the_same_order():
    inputs, targets = numbered(50)
    batches = TensorBatches(inputs, targets, batch_size=8, shuffle=True)
    torch.manual_seed(3)
    list(batches)  # an earlier epoch
    state = torch.get_rng_state()

    first_pass = iter(batches)
    torch.manual_seed(12345)  # RNG use after iter() must not change the order drawn at iter()
    first_order = torch.cat([batch_targets for _, batch_targets in first_pass])
    torch.set_rng_state(state)
    replayed_order = torch.cat([batch_targets for _, batch_targets in batches])
    next_epoch_order = torch.cat([batch_targets for _, batch_targets in batches])

    assert torch.equal(first_order, replayed_order)
    assert not torch.equal(replayed_order, next_epoch_order)


def test_a_single_tensor_gives_one_element_tuples():
    (batch,) = TensorBatches(torch.zeros(3, 2), batch_size=8)
    assert isinstance(batch, tuple)
    assert batch[0].shape == (3, 2)


def test_empty_tensors_give_no_batches():
    batches = TensorBatches(torch.zeros(0, 4), torch.zeros(0), batch_size=2, shuffle=True)
    assert len(batches) == 0
    assert list(batches) == []


@pytest.mark.parametrize(
    ("tensors", "batch_size", "message"),
    [
        ((torch.zeros(5, 2), torch.zeros(4)), 2, r"same size in dimension 0, got \[5, 4\]"),
        ((torch.zeros(5),), 0, "batch_size must be an integer >= 1, got 0"),
        ((torch.zeros(5),), -3, "batch_size must be an integer >= 1, got -3"),
        ((torch.zeros(5),), 2.5, "batch_size must be an integer >= 1, got 2.5"),
        ((torch.zeros(5),), True, "batch_size must be an integer >= 1, got True"),
        ((), 2, "at least one tensor"),
        ((torch.zeros(5), [1, 2, 3, 4, 5]), 2, "argument 1 must be a tensor, got list"),
        ((torch.tensor(1.0),), 2, "argument 0 is a 0-d tensor"),
    ],
)
def test_bad_input_is_a_value_error_that_says_what_is_wrong(tensors, batch_size, message):
    with pytest.raises(ValueError, match=message):
        TensorBatches(*tensors, batch_size=batch_size)


class _Crash:
    def __init__(self, at: int) -> None:
        self.at = at

    def on_batch_end(self, learner) -> None:
        if learner.training and learner.step + 1 == self.at:
            raise RuntimeError("simulated crash")


def _shuffled_learner(plugins=()):
    import functools

    from trainloop import Learner
    from trainloop.data.seeding import SetDataEpoch

    inputs = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    target = (inputs.sum(dim=1) > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2), torch.nn.LogSoftmax(1)
    )
    return Learner(
        model,
        TensorBatches(inputs, target, batch_size=8, shuffle=True),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        plugins=[SetDataEpoch(), *plugins],  # as the recipes have it: no effect on TensorBatches
    )


@pytest.mark.parametrize(("crash_at", "every"), [(8, 3), (8, 0)], ids=["mid-epoch", "epoch-end"])
def test_shuffled_tensor_batches_resume_exactly(tmp_path, crash_at, every):
    from trainloop.data.seeding import resume_exactness_warning
    from trainloop.plugins.checkpoint import Checkpoint

    reference = _shuffled_learner()
    reference.fit(3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _shuffled_learner([Checkpoint(tmp_path, every=every), _Crash(crash_at)]).fit(3)
    torch.manual_seed(99)  # everything must come from the checkpoint
    resumed = _shuffled_learner([Checkpoint(tmp_path, resume=tmp_path / "last.pt")])
    resumed.fit(3)

    expected = reference.model.state_dict()
    for name, weight in resumed.model.state_dict().items():
        assert torch.equal(weight, expected[name]), name
    assert resume_exactness_warning(resumed.train_data) is None
