"""The README.md beside an adapter, as PEFT's save_pretrained writes one: what it adapts (the
base file and its sha256), on which digits, with which settings, what it changed on the test set,
and the command that made it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loralab.files import write_text
from loralab.results import Shift, TestResult
from loralab.spec import INITS, LoRASpec

CARD_FILE = "README.md"


@dataclass(frozen=True)
class AdapterCard:
    spec: LoRASpec
    model_name: str
    sizes: list[int]
    base: Path
    base_file_sha256: str  # sha256 of the base file's bytes
    base_sha256: str  # loralab's fingerprint of the base tensors (the adapter's metadata holds it too)
    digits: list[int]
    before: TestResult  # the base alone
    after: TestResult  # the base with this adapter
    command: str | None  # None: the run did not come from train.py

    def settings(self) -> list[str]:
        s = self.spec
        targets = s.targets if isinstance(s.targets, str) else ", ".join(s.targets)
        return [
            f"- rank {s.rank}, alpha {s.alpha:g}, scale {s.scale:g} ({'alpha / sqrt(rank), rsLoRA' if s.rslora else 'alpha / rank'})",
            *([f"- per layer (PEFT's rank_pattern / alpha_pattern): ranks {s.rank_pattern}, alphas {s.alpha_pattern}"]
              if s.rank_pattern or s.alpha_pattern else []),
            f"- targets: {targets}; dropout {s.dropout:g}; DoRA: {'yes' if s.dora else 'no'}",
            f"- init: {s.init}: {INITS[s.init]}",
            *([f"- saved as plain LoRA of rank {s.saved_rank} on the original base, as PEFT converts PiSSA"] if s.init == "pissa" else []),
        ]

    def results(self) -> list[str]:
        shift, digits = Shift.between(self.before, self.after, self.digits), self.digits
        return [
            "| MNIST test set (10,000 images) | base | with adapter |",
            "|---|---|---|",
            f"| accuracy | {100 * self.before.acc:.2f} % | {100 * self.after.acc:.2f} % |",
            f"| wrong on target digits {digits} | {shift.target_before} | {shift.target_after} |",
            f"| wrong on the other digits | {shift.other_before} | {shift.other_after} |",
        ]

    def text(self) -> str:
        command = f"```\n{self.command}\n```" if self.command else "Not recorded: the run did not come from train.py."
        lines = [
            "---", "library_name: peft", f"base_model: {self.base}", "tags: [lora, loralab, mnist]", "---", "",
            f"# LoRA adapter for {self.model_name} ({'-'.join(map(str, self.sizes))}) on MNIST digits {self.digits}", "",
            "## Base", "",
            f"- file: {self.base}", f"- file sha256: {self.base_file_sha256}",
            f"- weights sha256 (loralab's fingerprint of the tensors): {self.base_sha256}", "",
            "## Settings", "", *self.settings(), "",
            "## Test result", "", *self.results(), "",
            "## Made by", "", command, "",
            "## Use", "",
            "PEFT: `PeftModel.from_pretrained(base_model, \"<this directory>\")`, the base being the file above.",
            "loralab: `python train.py stage=eval base=<base file> \"eval.adapters=['<this directory>']\"`.", "",
        ]
        return "\n".join(lines)


def write_card(directory: Path, card: AdapterCard) -> Path:
    return write_text(Path(directory) / CARD_FILE, card.text())
