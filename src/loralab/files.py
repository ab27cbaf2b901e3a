"""Artifacts are written to a temporary file beside the target and renamed into place,
so a reader (or a crash) never sees half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
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
