"""Artifacts are written to a temporary file beside the target and renamed into place,
so a reader (or a crash) never sees half a file."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loralab.errors import ArtifactError

# Larger than any file loralab writes or reads (a base is 11 MB, MNIST's largest IDX 47 MB): a
# bigger file is not one of them, and reading it whole would be the problem.
MAX_READ_BYTES = 1 << 30

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_thread_write_failures: list[OSError] = []


def regular_file(path: str | Path, what: str, limit: int = MAX_READ_BYTES) -> Path:
    """``path`` as a file loralab may read: it exists, is a regular file (not a directory, a
    device or a FIFO, which would block or never end) and is at most ``limit`` bytes."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as err:
        raise ArtifactError(f"{what} {short(path)} cannot be read ({err.strerror}); pass an existing file") from None
    if stat.S_ISDIR(info.st_mode):
        raise ArtifactError(f"{what} {short(path)} is a directory; pass the file itself")
    if not stat.S_ISREG(info.st_mode):
        raise ArtifactError(f"{what} {short(path)} is not a regular file (a device, FIFO or socket); pass a file")
    if info.st_size > limit:
        raise ArtifactError(f"{what} {short(path)} is {info.st_size:,} bytes, larger than any {what}; pass the right file")
    return path


class FileMemo:
    """Values computed from a file's bytes, kept while the file is unchanged: every job of a sweep
    reads the same base file, and hashing its 11 MB takes 9 ms. A file is unchanged while its
    identity, size and change times are: any write moves its ctime, which no user can set back.
    Timestamps are coarse (a kernel tick), so a file changed less than a second before it is read
    could change again under the same ctime; its value is not kept (as git treats a racily clean
    file)."""

    SETTLED_NS = 1_000_000_000

    def __init__(self):
        self.values: dict[tuple[int, ...], Any] = {}

    @staticmethod
    def stamp(path: str | Path) -> tuple[int, ...]:
        st = os.stat(path)
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def get(self, path: str | Path, compute: Callable[[], Any], read_at: tuple[int, ...] | None = None) -> Any:
        """The value ``compute`` gives for the file's bytes as they are, kept for them. ``compute``
        reads ``path``; or, given ``read_at``, works on what was read when the file had that stamp,
        which is kept only if the file has not changed since."""
        try:
            stamp = self.stamp(path)
        except OSError:
            return compute()  # whose own error names the problem
        if read_at is not None and read_at != stamp:
            return compute()
        if stamp in self.values:
            return self.values[stamp]
        value = compute()
        try:
            settled = self.stamp(path) == stamp and time.time_ns() - stamp[-1] > self.SETTLED_NS
        except OSError:
            settled = False
        if settled:
            self.values[stamp] = value
        return value


def short(path: str | Path, keep: int = 48) -> str:
    """A path as an error line shows it: its end, where a long one would push the fix off the line."""
    text = str(path)
    return text if len(text) <= keep else f"…{text[-(keep - 1):]}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """A full disk, a file-size limit or a missing directory ends in an ArtifactError, the file
    at ``path`` as it was (or absent) and no temporary file left."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise ArtifactError(f"cannot write {short(path)} ({err.strerror}); check that its directory exists and is writable") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise ArtifactError(f"could not write {short(path)} ({err.strerror}); free some space (or raise the file-size limit) "
                            "and run again: the previous file is kept") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str]) -> Path:
    # Imported here: the CLI uses this module before it has checked the config, and torch's
    # import costs more than a second that a typo should not pay.
    from safetensors.torch import save

    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    return atomic_write_bytes(path, save(contiguous, metadata=metadata))


def watch_writer_threads() -> None:
    """TensorBoard writes its event files from a thread of its own, which on a full disk dies
    printing a traceback before its writer re-raises the error in the main thread (at the next
    write, flush or close), where it ends in one line. The hook keeps such a thread quiet; a
    failure no writer re-raises is raised by ``raise_thread_write_failure``, before metrics.json."""
    _thread_write_failures.clear()  # every job of a sweep calls this: an earlier job's failure is not its own
    default = threading.excepthook
    if getattr(default, "watches_writes", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in DISK_FULL:
            _thread_write_failures.append(args.exc_value)
        else:
            default(args)

    hook.watches_writes = True
    threading.excepthook = hook


def raise_thread_write_failure() -> None:
    if _thread_write_failures:
        first = _thread_write_failures[0]
        _thread_write_failures.clear()
        raise first
