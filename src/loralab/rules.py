"""What one setting may hold: a rule is declared with its field in the schema (loralab.config,
loralab.spec), checked when the settings become objects, and worded in the error a bad value
gets ("lora.rank=0 is invalid: expected an integer ≥ 1"). Torch-free, like the schema."""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from loralab.errors import ConfigError


def invalid(key: str, value: Any, allowed: str) -> ConfigError:
    """The one wording of a bad setting: the key, the value as typed, what is allowed."""
    return ConfigError(f"{key}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class Rule:
    """A number's range (``low``/``high``, open or closed), or a fixed set of ``choices``."""

    kind: type = float  # int, float, bool or str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is allowed too (e.g. optim.loraplus_ratio's "off")

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str) and (not self.choices or value in self.choices)
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else numbers.Real) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    @property
    def expected(self) -> str:
        """The allowed values in words, as the error message says them."""
        if self.kind is bool:
            return "expected true or false"
        if self.choices:
            return f"expected one of {', '.join(self.choices)}"
        if self.kind is str:
            return "expected a string" + (" or null" if self.optional else "")
        noun = "an integer" if self.kind is int else "a number"
        if self.kind is int and self.high is not None and not (self.low_open or self.high_open):
            bounds = f"from {int(self.low)} to {int(self.high)}"
        else:
            bounds = " and ".join(
                f"{sign} {limit:g}" for limit, sign in ((self.low, ">" if self.low_open else "≥"), (self.high, "<" if self.high_open else "≤"))
                if limit is not None
            )
        return f"expected {noun} {bounds}".rstrip() + (" (or null)" if self.optional else "")


def setting(default: Any = MISSING, rule: Rule | None = None, factory: Any = MISSING) -> Any:
    """A schema field: its default (or default factory) and the rule its values follow."""
    metadata = {"rule": rule} if rule else {}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Checked:
    """A node of the schema that checks its fields' rules when it is built. ``KEY`` is where the
    node sits in the composed config ("data", "lora"), so an error names the key as typed."""

    KEY: ClassVar[str] = ""

    def key(self, name: str) -> str:
        return f"{self.KEY}.{name}" if self.KEY else name

    def check_rules(self) -> None:
        for f in fields(self):
            rule = f.metadata.get("rule")
            if rule is not None and not rule.allows(getattr(self, f.name)):
                raise invalid(self.key(f.name), getattr(self, f.name), rule.expected)

    def __post_init__(self) -> None:
        self.check_rules()
