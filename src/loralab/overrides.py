"""Which stage reads which key, and the command line's overrides checked against it: an override
the chosen stage ignores is refused before anything runs (`lora.rank=4` without
`stage=finetune` would otherwise run a whole pretrain)."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser

from loralab.errors import ConfigError

# The keys (and config groups) that only some stages read; the longest matching prefix decides,
# so optim.loraplus_ratio is a fine-tune key while the rest of optim is any training stage's.
USED_BY = {
    "lora": ("finetune",),
    "variant": ("finetune",),
    "finetune": ("finetune",),
    "data.replay": ("finetune",),
    "data.auto_k": ("finetune",),
    "optim.loraplus_ratio": ("finetune",),
    "optim": ("pretrain", "finetune"),
    "base": ("finetune", "eval"),
    "eval": ("eval",),
    "resume": ("pretrain", "finetune"),
}


def stages_using(key: str) -> tuple[str, ...] | None:
    """The stages that read ``key`` (e.g. "lora.rank"); None for a key every stage reads."""
    parts = key.split(".")
    return next((USED_BY[k] for n in range(len(parts), 0, -1) if (k := ".".join(parts[:n])) in USED_BY), None)


def ignored_by_stage(key: str, stage: str | None, override: str) -> str | None:
    """Why ``stage`` ignores ``key`` (set by ``override``), with the fix; None when it reads it.
    ``stage`` None: the stage is not known, the config did not compose without it."""
    stages = stages_using(key)
    if stages is None or stage in stages:
        return None
    run = f"this stage={stage} run would ignore it" if stage else "the chosen stage has no such setting"
    fix = f"add stage={stages[0]}" if len(stages) == 1 else "run one of those stages"
    return f"{override} is read only by {' and '.join(f'stage={s}' for s in stages)}, so {run}; {fix}, or drop {override}"


def check_overrides(overrides: Sequence[str], stage: str) -> None:
    """Refuse a command-line override that the stage would silently ignore: `train.py lora.rank=4`
    would otherwise pretrain for a minute and never read the rank. Only the user's own overrides
    count: an experiment config sets values for its stage on purpose."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    ignored = [why for o in parsed if (why := ignored_by_stage(o.key_or_group, stage, o.input_line or o.key_or_group))]
    if ignored:
        raise ConfigError(ignored[0] + (f" ({len(ignored) - 1} more such override{'s' * (len(ignored) > 2)})" if len(ignored) > 1 else ""))
