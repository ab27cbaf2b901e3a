"""Runs on disk: a run directory's metrics.json read once, the jobs of a sweep, and the newest
pretrain run that a fine-tune uses as its base."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import ArtifactError
from loralab.files import regular_file, short
from loralab.results import Shift, TestResult
from loralab.spec import variant_flags

METRICS_FILE = "metrics.json"
MAX_METRICS_BYTES = 16 << 20  # a metrics.json is kilobytes
ERROR_FILE = "error.txt"  # a failed sweep job's one-line reason
BASE_FILE = "base.safetensors"
FULL_FILE = "model.safetensors"  # a fully fine-tuned model: the same format as a base


@dataclass(frozen=True)
class Run:
    """A finished run: its directory and its metrics.json (the contract, kept as written)."""

    path: Path
    metrics: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def digits(self) -> list[int]:
        return self.metrics.get("digits", list(range(10)))

    @property
    def test(self) -> TestResult:
        return TestResult.from_json(self.metrics["test"])

    @property
    def test_base(self) -> TestResult | None:
        """A fine-tune's test with its adapters off (or before a full fine-tune); None otherwise."""
        before = self.metrics.get("test_base")
        return TestResult.from_json(before) if before else None

    @property
    def shift(self) -> Shift:
        """Before -> after on the target and other digits (no change for a pretrain)."""
        return Shift.between(self.test_base or self.test, self.test, self.digits)

    @property
    def setting(self) -> str:
        """The run's config without its seed: runs that share it differ only by seed."""
        config = {k: v for k, v in self.metrics.get("config", {}).items() if k != "seed"}
        return json.dumps(config, sort_keys=True)

    @property
    def label(self) -> str:
        """Short name of what was trained: "r=4", "r=4 dora", "full", "pretrain"."""
        lora = self.metrics.get("lora")
        if lora:
            flags = variant_flags(lora)
            if self.metrics.get("config", {}).get("optim", {}).get("loraplus_ratio"):
                flags.append("lora+")
            return " ".join([f"r={lora['rank']}", *flags])
        return self.metrics.get("method", self.metrics.get("stage", "?"))


def read_run(directory: str | Path) -> Run:
    path = Path(directory) / METRICS_FILE
    if not path.exists():
        raise ArtifactError(f"no {METRICS_FILE} in {short(directory)}; pass the directory of a finished run")
    try:
        metrics = json.loads(regular_file(path, METRICS_FILE, limit=MAX_METRICS_BYTES).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{short(path)} is not readable JSON ({str(err)[:60]}); the run did not finish cleanly") from None
    if not isinstance(metrics, dict) or "test" not in metrics:
        raise ArtifactError(f"{short(path)} is not a loralab metrics file (no 'test' result)")
    for key in ("test", "test_base", "val", "val_base"):
        if key == "test" or metrics.get(key) is not None:
            try:
                TestResult.from_json(metrics[key])
            except (KeyError, TypeError, ValueError, AttributeError):
                raise ArtifactError(f"{short(path)}'s {key!r} is not a test result loralab wrote; restore the file or rerun the run") from None
    return Run(Path(directory), metrics)


@dataclass(frozen=True)
class Job:
    """One job of a sweep: its run, or why it failed."""

    name: str
    run: Run | None
    error: str | None


def job_order(path: Path) -> tuple[int, str]:
    """Hydra's job number first (``10_...`` after ``9_...``), then the name."""
    number, _, _ = path.name.partition("_")
    return (int(number) if number.isdigit() else -1, path.name)


def sweep_jobs(sweep_dir: str | Path) -> list[Job]:
    """Each job directory (one holding Hydra's .hydra/), finished or failed, in job order."""
    jobs = []
    for job_dir in sorted((p.parent for p in Path(sweep_dir).glob("*/.hydra")), key=job_order):
        if (job_dir / METRICS_FILE).exists():
            jobs.append(Job(job_dir.name, read_run(job_dir), None))
        else:
            error = job_dir / ERROR_FILE
            reason = error.read_text().strip() if error.exists() else f"no {METRICS_FILE} (see the job's log)"
            jobs.append(Job(job_dir.name, None, reason))
    return jobs


def finished_runs(path: str | Path) -> list[Run]:
    """A run dir's run, or every finished job of a sweep dir."""
    path = Path(path)
    if (path / METRICS_FILE).exists():
        return [read_run(path)]
    runs = [read_run(directory) for directory in sorted((p.parent for p in path.glob(f"*/{METRICS_FILE}")), key=job_order)]
    if not runs:
        raise ArtifactError(f"no {METRICS_FILE} in {short(path)} or its job directories; pass a run or sweep dir")
    return runs


def resolve_base(base: str | None, output_root: str | Path, sizes: list[int]) -> Path:
    """The base weights file: ``base`` as a file or run dir, else the newest matching pretrain run."""
    if base is not None:
        path = Path(base)
        if path.is_dir():
            path = path / BASE_FILE
            if not path.exists():
                raise ArtifactError(f"base={short(base)} is a directory with no {BASE_FILE}; pass a pretrain run dir or a .safetensors file")
        elif not path.exists():
            raise ArtifactError(f"base={short(base)} does not exist; pass a pretrain run dir or a .safetensors file")
        return regular_file(path, "base file")  # /dev/zero or a FIFO would be read for ever
    runs = []
    for metrics_file in Path(output_root).glob(f"**/{METRICS_FILE}"):
        try:
            run = read_run(metrics_file.parent)
        except ArtifactError:
            continue  # a damaged run is not a candidate base
        weights = run.path / BASE_FILE
        if run.metrics.get("stage") == "pretrain" and run.metrics.get("model", {}).get("sizes") == list(sizes) and weights.exists():
            runs.append((metrics_file.stat().st_mtime, weights))
    if not runs:
        raise ArtifactError(
            f"no pretrained {'-'.join(map(str, sizes))} base under {output_root}/; "
            "run `python train.py stage=pretrain` first, or pass base=<run dir>"
        )
    return max(runs)[1]


def worst_digits(base_path: Path, k: int) -> list[int]:
    """digits=auto: the k digits with the highest error rate in the base's own metrics.json."""
    if not (base_path.parent / METRICS_FILE).exists():
        raise ArtifactError(f"digits=auto needs the base's {METRICS_FILE}, not found beside {short(base_path)}; name the digits instead (data.digits=[...])")
    test = read_run(base_path.parent).test
    rates = [w / c for w, c in zip(test.wrong, test.count)]
    return sorted(sorted(range(10), key=lambda d: -rates[d])[:k])
