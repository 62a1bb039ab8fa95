"""Exact resume with DataLoader workers: order and augmentation from (seed, epoch)."""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, Crash, NoisyData, without_timings
from torch.utils.data import DataLoader, Dataset, Sampler

from trainloop import Learner
from trainloop.data.seeding import (
    SeededDataset,
    SeededSampler,
    SetDataEpoch,
    derive_seed,
    resume_exactness_warning,
    seeded_loader,
)
from trainloop.data.tensors import TensorBatches
from trainloop.plugins.checkpoint import Checkpoint
from trainloop.run_folder import read_jsonl
from trainloop.tasks.carvana.dataset import CarvanaDataset, make_loader
from trainloop.tasks.carvana.files import check_layout

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")

RECIPE = str(ROOT / "recipes" / "unet_carvana.py")
# 2 cars: 16 training photos (one car) in 4 batches of 4, 16 validation photos; 2 epochs.
TINY = ["--image-size", "32", "16", "--depth", "2", "--base-width", "4", "--batch-size", "4",
        "--epochs", "2", "--no-predict", "--no-tensorboard"]  # fmt: skip
STEPS = 2 * 4
SLOW_PLUGIN = '''
import time


class SlowBatches:
    """Sleeps after each training batch, so that a test can kill the run in the middle."""

    def on_batch_end(self, learner):
        if learner.training:
            time.sleep(0.3)


SLOW = SlowBatches()
'''


@pytest.fixture(scope="module")
def carvana(tmp_path_factory, generated) -> Path:
    """A folder with conftest's synthetic Carvana set (2 training cars of 72x40 photos) as
    ``input`` and a slow-down plugin."""
    folder = tmp_path_factory.mktemp("resume_workers")
    (folder / "input").symlink_to(generated, target_is_directory=True)
    (folder / "slow_batches.py").write_text(SLOW_PLUGIN)
    return folder


def _command(carvana: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "trainloop", "run", RECIPE, "--input-dir",
            str(carvana / "input"), *TINY, "--out", str(out), *options]  # fmt: skip


def _environment(carvana: Path) -> dict[str, str]:
    return {**os.environ, "TRAINLOOP_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(carvana)}


def _run(carvana: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _command(carvana, out, *options),
        capture_output=True,
        text=True,
        env=_environment(carvana),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def _resume_point(out: Path) -> dict | None:
    try:
        return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["learner"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def _run_and_kill(carvana: Path, out: Path, kill_when, *options: str) -> dict:
    """Start a run, SIGKILL it once ``kill_when(resume point of last.pt)``; return that point."""
    log = out.parent / f"{out.name}.log"  # a file, not a pipe that nobody reads until the end
    with open(log, "wb") as output:
        process = subprocess.Popen(
            _command(carvana, out, *options, "-p", "slow_batches:SLOW"),
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_environment(carvana),
        )
        try:
            deadline = time.monotonic() + 240
            while process.poll() is None and time.monotonic() < deadline:
                point = _resume_point(out)
                if point is not None and kill_when(point):
                    break
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()
    return _resume_point(out)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(path, weights_only=True)
    return saved["model"] if "model" in saved else saved


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, first {different[0]}"


@pytest.fixture(scope="module")
def uninterrupted(carvana: Path) -> Path:
    """The reference: the same run never stopped, loading in the main process."""
    out = carvana / "uninterrupted"
    _run(carvana, out, "--workers", "0")
    return out


def _mid_epoch_after_the_first(point: dict) -> bool:
    return point["epoch"] >= 1 and point["iteration"] >= 1


def _epoch_end_after_the_first(point: dict) -> bool:
    return point["epoch"] >= 1


@pytest.mark.parametrize(
    ("workers", "every", "kill_when"),
    [
        (0, 1, _mid_epoch_after_the_first),
        (2, 1, _mid_epoch_after_the_first),  # persistent workers, killed in a later epoch
        (2, 0, _epoch_end_after_the_first),  # epoch-end checkpoints only: an epoch's start
    ],
    ids=["workers-0-mid-epoch", "workers-2-mid-epoch", "workers-2-epoch-end"],
)
def test_a_sigkilled_carvana_run_resumed_ends_with_the_uninterrupted_weights(
    carvana: Path, uninterrupted: Path, tmp_path: Path, workers: int, every: int, kill_when
) -> None:
    out = tmp_path / "run"
    options = ["--workers", str(workers), "--checkpoint-every", str(every)]

    killed_at = _run_and_kill(carvana, out, kill_when, *options)

    assert killed_at is not None and killed_at["step"] < STEPS  # killed while training
    assert (killed_at["iteration"] > 0) == (every == 1)  # mid-epoch, or at an epoch's start
    resumed = _run(carvana, out, *options, "--resume")
    assert f"resumed from {out / 'checkpoints' / 'last.pt'}" in resumed.stdout
    # the reference loaded in the main process: the data does not depend on the workers
    _assert_same_weights(_weights(out / "model.pt"), _weights(uninterrupted / "model.pt"))
    _assert_same_weights(
        _weights(out / "checkpoints" / "last.pt"),
        _weights(uninterrupted / "checkpoints" / "last.pt"),
    )
    metrics = without_timings(read_jsonl(out / "metrics.jsonl")[0])
    assert metrics == without_timings(read_jsonl(uninterrupted / "metrics.jsonl")[0])


# --- the loaders themselves ------------------------------------------------------------


def _epochs(loader: DataLoader, epochs) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    batches = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        batches.append(list(loader))
    return batches


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for first, second in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_carvana_batches_depend_on_seed_and_epoch_only_not_on_workers(carvana: Path) -> None:
    ids = check_layout(carvana / "input").train_ids

    def loader(workers: int, seed: int = 5) -> DataLoader:
        dataset = CarvanaDataset(carvana / "input", ids, (32, 16), augment=True, dtype=torch.uint8)
        return make_loader(dataset, 4, shuffle=True, workers=workers, seed=seed)

    torch.manual_seed(1)
    in_main = _epochs(loader(0), [0, 1, 2])
    torch.manual_seed(2)  # the global RNG plays no part
    long_lived, new = loader(2), loader(2)
    persistent = _epochs(long_lived, [0, 1, 2])  # the same two worker processes throughout
    fresh = _epochs(new, [2])  # new workers, as in a resumed run
    _stop_workers(long_lived)
    _stop_workers(new)

    for epoch in range(3):
        _assert_same_batches(in_main[epoch], persistent[epoch])
    _assert_same_batches(fresh[0], persistent[2])
    assert not torch.equal(in_main[0][0][0], in_main[1][0][0])  # each epoch its own draw
    assert not torch.equal(_epochs(loader(0, seed=6), [0])[0][0][0], in_main[0][0][0])


def test_the_old_persistent_loader_gives_a_resumed_epoch_other_augmentations(carvana: Path):
    # What the seeded loader fixes: an epoch after the first, replayed by new workers from
    # the same RNG state, differs from the one the long-lived workers produced.
    ids = check_layout(carvana / "input").train_ids
    dataset = CarvanaDataset(carvana / "input", ids, (32, 16), augment=True, dtype=torch.uint8)

    def loader() -> DataLoader:
        return DataLoader(dataset, 4, shuffle=True, num_workers=2, persistent_workers=True)

    torch.manual_seed(0)
    long_lived = loader()
    list(long_lived)
    state = torch.get_rng_state()
    second_epoch = list(long_lived)
    torch.set_rng_state(state)
    replayed_loader = loader()
    replayed = list(replayed_loader)
    _stop_workers(long_lived)
    _stop_workers(replayed_loader)

    assert not all(torch.equal(a[0], b[0]) for a, b in zip(second_epoch, replayed, strict=True))
    assert "persistent workers" in resume_exactness_warning(long_lived)


def test_the_sampler_draws_order_and_seeds_from_seed_and_epoch() -> None:
    sampler = SeededSampler(10, seed=3)
    sampler.set_epoch(4)
    pairs = list(sampler)
    assert sorted(index for index, _ in pairs) == list(range(10))
    assert pairs == SeededSampler(10, seed=3).pairs(4)
    assert pairs != SeededSampler(10, seed=3).pairs(5)
    assert pairs != SeededSampler(10, seed=4).pairs(4)
    assert [index for index, _ in SeededSampler(10, shuffle=False).pairs(7)] == list(range(10))
    # without set_epoch, each iter() takes the next epoch
    counting = SeededSampler(10, seed=3)
    assert [list(counting) for _ in range(3)] == [counting.pairs(epoch) for epoch in range(3)]


def test_shards_split_the_epoch_and_keep_each_samples_seed() -> None:
    whole = SeededSampler(10, seed=3).pairs(2)
    shards = [SeededSampler(10, seed=3).shard(rank, 4).pairs(2) for rank in range(4)]
    assert [len(shard) for shard in shards] == [3, 3, 3, 3]  # padded to 12, as DDP does
    dealt = [
        pair for position in range(3) for shard in shards for pair in shard[position : position + 1]
    ]
    assert dealt[:10] == whole and dealt[10:] == whole[:2]


def test_a_seeded_item_is_the_same_anywhere_and_leaves_the_global_rng_alone() -> None:
    class Noisy(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int):
            return index + torch.rand(()) + np.random.rand() + random.random()

    seeded = SeededDataset(Noisy())
    torch.manual_seed(0)
    before = torch.rand(())
    torch.manual_seed(0)
    first = seeded[(2, 1234)]
    assert torch.rand(()) == before  # the item drew from its own seed, then restored
    torch.manual_seed(99)
    np.random.seed(99)
    assert seeded[(2, 1234)] == first
    assert seeded[(2, 1235)] != first
    assert seeded[2] != seeded[2]  # a plain index: the global RNG, as without the wrapper


def test_derived_seeds_do_not_collide_as_sums_do() -> None:
    assert derive_seed(0, 1) != derive_seed(1, 0)
    assert derive_seed(-1, 0) == derive_seed(-1, 0)
    assert 0 <= derive_seed(2**70, 5) < 2**63


# --- any data set, in process: crash, resume, compare ----------------------------------


def _learner(plugins=(), seeded: bool = True) -> Learner:
    inputs = torch.randn(32, 8, generator=torch.Generator().manual_seed(1234))
    target = (inputs[:, 0] > 0).long()
    options = {"num_workers": 2, "persistent_workers": True}
    if seeded:
        train = seeded_loader(NoisyData(inputs, target), 8, seed=0, shuffle=True, **options)
    else:
        train = DataLoader(NoisyData(inputs, target), 8, shuffle=True, **options)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 2), torch.nn.LogSoftmax(dim=1))
    return Learner(
        model,
        train,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        plugins=[SetDataEpoch(), *plugins],
    )


def _stop_workers(loader: DataLoader) -> None:
    """Stop a loader's persistent workers now (left to the garbage collector, a worker
    stopped in the middle of an epoch takes its shutdown timeouts, seconds each)."""
    if loader._iterator is not None:
        loader._iterator._shutdown_workers()
        loader._iterator = None


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded_loader", "plain-DataLoader"])
def test_a_seeded_loader_with_persistent_workers_resumes_exactly(tmp_path, seeded) -> None:
    reference = _learner(seeded=seeded)
    reference.fit(3)
    crashed = _learner([Checkpoint(tmp_path, every=2), Crash(7)], seeded)  # epoch 1, batch 3
    with pytest.raises(RuntimeError, match="simulated crash") as raised:
        crashed.fit(3)
    traceback.clear_frames(raised.tb)  # frees the epoch's iterator and its workers now

    torch.manual_seed(123)  # another global state: everything comes from the checkpoint
    resumed = _learner([Checkpoint(tmp_path, resume=tmp_path / "last.pt")], seeded)
    resumed.fit(3)

    for learner in (reference, crashed, resumed):
        _stop_workers(learner.train_data)

    weights, expected = resumed.model.state_dict(), reference.model.state_dict()
    same = all(torch.equal(weights[name], expected[name]) for name in weights)
    assert same == seeded  # the plain persistent DataLoader is the failure this fixes
    assert (resume_exactness_warning(resumed.train_data) is None) == seeded


# --- the one-line warning ---------------------------------------------------------------


class OwnSampler(Sampler[int]):
    """A sampler with state of its own (a counter) that no checkpoint holds."""

    def __init__(self) -> None:
        self.calls = 0

    def __iter__(self):
        self.calls += 1
        return iter(range(self.calls % 4, 4))

    def __len__(self) -> int:
        return 4


def test_the_warning_names_what_cannot_be_replayed() -> None:
    data = list(range(8))
    assert resume_exactness_warning(seeded_loader(data, 2, seed=0, num_workers=2)) is None
    assert resume_exactness_warning(DataLoader(data, 2, shuffle=True, num_workers=2)) is None
    assert resume_exactness_warning(DataLoader(data, 2, shuffle=True)) is None
    assert resume_exactness_warning(TensorBatches(torch.zeros(8), batch_size=2)) is None
    assert resume_exactness_warning([(torch.zeros(2),)]) is None
    own = resume_exactness_warning(DataLoader(data, 2, sampler=OwnSampler()))
    assert own is not None and "sampler OwnSampler" in own and "\n" not in own
    assert "seeded_loader" in own
    persistent = DataLoader(data, 2, shuffle=True, num_workers=2, persistent_workers=True)
    line = resume_exactness_warning(persistent)
    assert line is not None and "2 persistent workers" in line and "\n" not in line
