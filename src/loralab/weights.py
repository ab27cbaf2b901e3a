"""Base-model weights: saved as safetensors with the model's sizes and a content fingerprint in
the metadata, and loaded back into an MLP of the configured sizes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from loralab.errors import ArtifactError
from loralab.files import FileMemo, regular_file, short, write_safetensors
from loralab.lora import is_lora_name
from loralab.model import MLP
from loralab.quant import held_bytes, quantize, stored

if TYPE_CHECKING:
    from loralab.config import QuantConfig

log = logging.getLogger(__name__)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their plain names, whether or not adapters are injected."""
    return {
        name.replace(".base_layer.", "."): t
        for name, t in model.state_dict().items()
        if not is_lora_name(name)
    }


def fingerprint(model: nn.Module) -> str:
    """sha256 over the base tensors as stored (names, dtypes, shapes, bytes): equal iff the base is
    unchanged. A quantized weight is hashed by its codes and constants (loralab.quant.stored), so an
    NF4 base's fingerprint is its own, not its fp32 original's."""
    digest = hashlib.sha256()
    for key, tensor in sorted(base_state(model).items()):
        for inner, stored_as in stored(tensor).items():
            name = f"{key}.{inner}" if inner else key
            t = stored_as.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# Per process, by file: a sweep's jobs hash the same base file before and after training, and
# fingerprint the weights it loads to.
FILE_SHAS, WEIGHTS_SHAS = FileMemo(), FileMemo()


def file_sha256(path: str | Path) -> str:
    def read() -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:  # read-only: a base file is never opened for writing here
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    return FILE_SHAS.get(path, read)


def save_base(model: MLP, path: str | Path, name: str) -> str:
    sha = fingerprint(model)
    meta = {"format": "pt", "model": json.dumps({"name": name, "sizes": model.sizes}), "weights_sha256": sha}
    write_safetensors(path, base_state(model), meta)
    return sha


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first tensor holding NaN or inf, described; None when all are finite. One NaN weight
    makes every output NaN, and argmax of NaN logits is class 0: a run would "work" and report
    about 10 % accuracy, so every base and adapter file is checked when it is read, and the merge
    script checks the merged weights before writing them."""
    for name, t in tensors.items():
        # aminmax propagates NaN and holds any inf, in one pass with no mask: on the base's
        # 2000x1000 weight, 0.2 ms here against isfinite(t).all()'s 15 ms.
        if t.is_floating_point() and t.numel() and not all(torch.isfinite(v) for v in torch.aminmax(t)):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            return f"tensor {name!r} ({nan} NaN, {inf} inf of {t.numel()})"
    return None


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every safetensors file loralab reads (bases and adapters) comes through here: a regular file,
    whole, floating-point and finite."""
    regular_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors, meta = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{short(path)} is not a readable safetensors {what} ({str(err)[:60]}); pass a file written by loralab") from None
    if wrong := next((name for name, t in tensors.items() if not t.is_floating_point()), None):
        # load_state_dict would cast int8 or bool to float without a word, and the run "work".
        writers = "loralab or PEFT" if what == "adapter" else "loralab"
        raise ArtifactError(f"{short(path)} holds {tensors[wrong].dtype} tensor {wrong!r}, not floating-point weights; pass a {what} {writers} wrote")
    found = non_finite(tensors)
    if found:
        raise ArtifactError(f"{short(path)} holds non-finite values in {found}: pass another {what}, or train it again")
    return tensors, meta


def model_sizes(meta: dict[str, str], path: Path) -> list[int] | None:
    """The layer sizes a file's ``model`` metadata records (None where it records none)."""
    try:
        record = json.loads(meta.get("model", "{}"))
        sizes = record.get("sizes") if isinstance(record, dict) else None
    except (json.JSONDecodeError, TypeError):
        sizes = "unreadable"
    if sizes is not None and not (isinstance(sizes, list) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)):
        raise ArtifactError(f"{short(path)}'s 'model' metadata is not loralab's (sizes {str(sizes)[:40]}); pass a file loralab wrote")
    return sizes


def load_base(path: str | Path, sizes: list[int]) -> tuple[MLP, dict]:
    """Build an MLP of ``sizes`` and fill it from ``path``; any mismatch is an ArtifactError."""
    path = Path(path)
    tensors, meta = read_safetensors(path, "base model")
    stored = model_sizes(meta, path)
    if stored is not None and list(stored) != list(sizes):
        raise ArtifactError(
            f"{path} holds a {'-'.join(map(str, stored))} model but the configured model is "
            f"{'-'.join(map(str, sizes))}; pick the matching model=... or another base"
        )
    if any(is_lora_name(name.removesuffix(".weight")) for name in tensors):
        raise ArtifactError(f"{short(path)} is a LoRA adapter, not a base; pass base=<pretrain run dir>, and the adapter to stage=eval")
    model = MLP(sizes)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise ArtifactError(f"{short(path)} does not fit a {'-'.join(map(str, sizes))} MLP ({first[:70]}); pass a base of these sizes") from None
    return model, meta


@dataclass(frozen=True)
class HeldBase:
    """A base as a run holds it (metrics.json's ``quant``): its storage format, each
    NF4 layer's (block, scaler block), the fingerprint of what is held (``base_unchanged`` compares
    it) and of the fp32 weights the file holds (what an adapter records as its base), and the
    bytes the base's tensors take as held and in fp32."""

    format: str
    blocks: dict[str, tuple[int, int]]
    sha256: str
    weights_sha256: str
    held_bytes: int
    fp32_bytes: int

    @property
    def quantized(self) -> bool:
        return self.format != "none"

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"blocks": {name: list(b) for name, b in self.blocks.items()}}


def hold_base(path: str | Path, sizes: list[int], quant: QuantConfig) -> tuple[MLP, dict, HeldBase]:
    """``load_base``, then the weights stored as ``quant`` says (loralab.quant)."""
    try:
        read_at = FileMemo.stamp(path)
    except OSError:
        read_at = None  # load_base says what is wrong
    # Loaded every time (a job trains its own copy), fingerprinted once per file unchanged.
    model, meta = load_base(path, sizes)
    weights_sha = WEIGHTS_SHAS.get(path, lambda: fingerprint(model), read_at) if read_at else fingerprint(model)
    fp32 = held_bytes(model)
    blocks = quantize(model, quant)
    if quant.format == "none":
        return model, meta, HeldBase(quant.format, blocks, weights_sha, weights_sha, fp32, fp32)
    return model, meta, HeldBase(quant.format, blocks, fingerprint(model), weights_sha, held_bytes(model), fp32)
