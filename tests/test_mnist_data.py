"""load_mnist and write_idx_files, on small IDX files written into tmp_path.

The download path runs against a local HTTP server on 127.0.0.1: torchvision 0.29's
downloader cannot read ``file://`` URLs (its progress bar asks the response for a
``length`` that only HTTP responses have), so the mirrors point at the loopback server.
"""

import functools
import gzip
import hashlib
import http.server
import struct
import threading

import numpy as np
import pytest
import torch
import torchvision

from trainloop.data.tensors import TensorBatches
from trainloop.errors import UsageError
from trainloop.tasks.mnist.data import IDX_FILES, load_mnist, write_idx_files


def write_plain_idx(raw_dir, train_pixels, train_labels, test_pixels, test_labels):
    """IDX files written by hand from the format's definition, independent of the code."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for split, pixels, labels in (
        ("train", train_pixels, train_labels),
        ("t10k", test_pixels, test_labels),
    ):
        images = np.zeros((len(pixels), 28, 28), dtype=np.uint8)
        for index, value in enumerate(pixels):
            images[index, 0, 0] = value  # first pixel carries the value, the rest are 0
            images[index, 27, 27] = 255
        (raw_dir / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, len(pixels), 28, 28) + images.tobytes()
        )
        (raw_dir / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, len(labels)) + bytes(labels)
        )


def test_load_mnist_normalises_pixels_and_keeps_labels(tmp_path):
    write_plain_idx(tmp_path / "MNIST" / "raw", [0, 128, 1], [7, 0, 9], [255, 3], [1, 2])

    train_x, train_y, test_x, test_y = load_mnist(tmp_path, download=False)

    assert train_x.shape == (3, 784) and test_x.shape == (2, 784)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    # (pixel / 255 - 0.1307) / 0.3081, by hand
    expected_first = torch.tensor([-0.424212917883804, 1.2050009227969019, -0.41148468475348593])
    torch.testing.assert_close(train_x[:, 0], expected_first, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        test_x[:, 0], torch.tensor([2.82148653034729, -0.38602821849284996]), rtol=0, atol=1e-6
    )
    assert torch.all(train_x[:, 1:783] == train_x[0, 1])  # pixel 0 everywhere else
    torch.testing.assert_close(
        train_x[:, 783], torch.full((3,), 2.82148653034729), rtol=0, atol=1e-6
    )
    assert train_y.tolist() == [7, 0, 9] and test_y.tolist() == [1, 2]


def test_gz_files_are_decompressed_next_to_themselves_and_load_like_plain_ones(tmp_path):
    write_idx_files(tmp_path / "gz" / "MNIST" / "raw", n_train=30, n_test=20, seed=4, gz=True)
    write_idx_files(tmp_path / "plain" / "MNIST" / "raw", n_train=30, n_test=20, seed=4, gz=False)

    from_gz = load_mnist(tmp_path / "gz", download=False)
    from_plain = load_mnist(tmp_path / "plain", download=False)

    for name in IDX_FILES:
        raw_dir = tmp_path / "gz" / "MNIST" / "raw"
        assert (raw_dir / name).read_bytes() == gzip.decompress(
            (raw_dir / f"{name}.gz").read_bytes()
        )
    assert [tensor.shape for tensor in from_gz] == [(30, 784), (30,), (20, 784), (20,)]
    for gz_tensor, plain_tensor in zip(from_gz, from_plain, strict=True):
        assert torch.equal(gz_tensor, plain_tensor)


def test_write_idx_files_writes_the_standard_headers_and_balanced_labels(tmp_path):
    paths = write_idx_files(tmp_path, n_train=40, n_test=10, gz=False)

    assert [path.name for path in paths] == list(IDX_FILES)
    train_images, train_labels = paths[0].read_bytes(), paths[1].read_bytes()
    assert struct.unpack(">IIII", train_images[:16]) == (2051, 40, 28, 28)
    assert len(train_images) == 16 + 40 * 28 * 28
    assert struct.unpack(">II", train_labels[:8]) == (2049, 40)
    assert np.bincount(np.frombuffer(train_labels[8:], dtype=np.uint8)).tolist() == [4] * 10
    assert (
        write_idx_files(tmp_path / "again", n_train=40, n_test=10, gz=False)[0].read_bytes()
        == train_images
    )


def test_write_idx_files_data_is_learnable_by_a_small_mlp(tmp_path):
    write_idx_files(tmp_path / "MNIST" / "raw", n_train=1000, n_test=300)
    train_x, train_y, test_x, test_y = load_mnist(tmp_path, download=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    for _ in range(4):
        for inputs, targets in TensorBatches(train_x, train_y, batch_size=50, shuffle=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()

    accuracy = (model(test_x).argmax(dim=1) == test_y).float().mean().item()
    assert accuracy > 0.95


def test_missing_files_without_download_name_the_raw_folder_and_the_files(tmp_path):
    with pytest.raises(UsageError) as error:
        load_mnist(tmp_path, download=False)

    message = str(error.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    for name in IDX_FILES:
        assert name in message
    assert "--data-dir" in message
    assert "\n" not in message


def test_only_the_missing_files_are_named(tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    write_idx_files(raw_dir, n_train=10, n_test=10)
    (raw_dir / "t10k-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(UsageError, match="put t10k-labels-idx1-ubyte") as error:
        load_mnist(tmp_path, download=False)
    assert "train-images" not in str(error.value)


def test_a_data_dir_pointing_at_the_raw_folder_gets_the_right_data_dir_suggested(tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    write_idx_files(raw_dir, n_train=10, n_test=10)

    with pytest.raises(UsageError, match=f"try --data-dir {tmp_path}\\.$"):
        load_mnist(raw_dir, download=False)
    with pytest.raises(UsageError, match=f"try --data-dir {tmp_path}\\.$"):
        load_mnist(tmp_path / "MNIST", download=False)


def test_a_truncated_idx_file_is_named(tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    write_idx_files(raw_dir, n_train=10, n_test=10, gz=False)
    images = raw_dir / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])

    with pytest.raises(UsageError, match=f"{images} is corrupt or truncated .*7756 bytes"):
        load_mnist(tmp_path, download=False)


def test_a_wrong_magic_number_is_named(tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    write_idx_files(raw_dir, n_train=10, n_test=10, gz=False)
    labels = raw_dir / "t10k-labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">I", 2051) + labels.read_bytes()[4:])

    with pytest.raises(UsageError, match=f"{labels} is corrupt .*magic number 2051, expected 2049"):
        load_mnist(tmp_path, download=False)


def test_a_corrupt_gz_file_is_named(tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    write_idx_files(raw_dir, n_train=10, n_test=10)
    packed = raw_dir / "train-labels-idx1-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:20])

    with pytest.raises(UsageError, match=f"{packed} is not a valid gzip file"):
        load_mnist(tmp_path, download=False)
    assert not (raw_dir / "train-labels-idx1-ubyte").exists()


def test_images_and_labels_of_different_lengths_are_reported(tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    write_idx_files(raw_dir, n_train=10, n_test=10, gz=False)
    write_idx_files(tmp_path / "other", n_train=12, n_test=10, gz=False)
    (tmp_path / "other" / "train-labels-idx1-ubyte").replace(raw_dir / "train-labels-idx1-ubyte")

    with pytest.raises(UsageError, match="holds 10 images but train-labels-idx1-ubyte 12 labels"):
        load_mnist(tmp_path, download=False)


def test_labels_above_nine_are_reported(tmp_path):
    write_plain_idx(tmp_path / "MNIST" / "raw", [0], [10], [0], [1])

    with pytest.raises(UsageError, match="train-labels-idx1-ubyte holds labels above 9"):
        load_mnist(tmp_path, download=False)


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_a_file_of_zero_samples_is_named(tmp_path, split):
    raw_dir = tmp_path / "MNIST" / "raw"
    sizes = {"n_train": 0, "n_test": 10} if split == "train" else {"n_train": 10, "n_test": 0}
    write_idx_files(raw_dir, **sizes, gz=False)

    with pytest.raises(UsageError, match=f"{raw_dir / split}-images-idx3-ubyte holds 0 samples"):
        load_mnist(tmp_path, download=False)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local HTTP mirror of small MNIST .gz files, patched into torchvision's MNIST."""
    served = tmp_path / "served"
    paths = write_idx_files(served, n_train=30, n_test=20, seed=1)

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=served)
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("no_proxy", "*")  # never send the loopback request through a proxy
    monkeypatch.setattr(
        torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_address[1]}/"]
    )
    # the real files' MD5 sums would reject the small ones
    resources = [(path.name, hashlib.md5(path.read_bytes()).hexdigest()) for path in paths]
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    yield served
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_fetches_the_files_into_the_raw_folder(tmp_path, mirror):
    data_dir = tmp_path / "data"

    train_x, train_y, test_x, test_y = load_mnist(data_dir, download=True)

    assert train_x.shape == (30, 784) and test_y.shape == (20,)
    for name in IDX_FILES:
        assert (data_dir / "MNIST" / "raw" / f"{name}.gz").read_bytes() == (
            mirror / f"{name}.gz"
        ).read_bytes()
        assert (data_dir / "MNIST" / "raw" / name).is_file()
    write_idx_files(tmp_path / "expected" / "MNIST" / "raw", n_train=30, n_test=20, seed=1)
    assert torch.equal(train_y, load_mnist(tmp_path / "expected", download=False)[1])


def test_a_failed_download_says_which_files_to_put_where(tmp_path, mirror):
    (mirror / "t10k-images-idx3-ubyte.gz").unlink()  # the server answers 404
    data_dir = tmp_path / "data"

    with pytest.raises(UsageError) as error:
        load_mnist(data_dir, download=True)

    message = str(error.value)
    assert message.startswith("Could not download MNIST (HTTP Error 404: File not found)")
    assert f"{data_dir / 'MNIST' / 'raw'}/" in message
    assert "t10k-images-idx3-ubyte[.gz]" in message
    assert "train-images" not in message  # downloaded before the failure
    assert "--data-dir" in message and "\n" not in message
