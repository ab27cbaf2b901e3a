"""A test result on MNIST's 10,000 test images, and what a fine-tune changed: the target digits
it was trained on against the other digits, where forgetting shows."""

from __future__ import annotations

from dataclasses import dataclass

NUM_CLASSES = 10


@dataclass(frozen=True)
class TestResult:
    """Accuracy and, per digit 0-9, wrong answers and images. Its JSON form is metrics.json's
    ``test`` object: ``{"acc": ..., "wrong": [...], "count": [...]}``."""

    __test__ = False  # a result, not a pytest test class

    acc: float
    wrong: tuple[int, ...]
    count: tuple[int, ...]

    def wrong_on(self, digits: list[int]) -> int:
        return sum(self.wrong[d] for d in digits)

    def split(self, digits: list[int]) -> tuple[int, int]:
        """(wrong on the target digits, wrong on the others)."""
        target = self.wrong_on(digits)
        return target, sum(self.wrong) - target

    def to_json(self) -> dict:
        return {"acc": self.acc, "wrong": list(self.wrong), "count": list(self.count)}

    @classmethod
    def from_json(cls, obj: dict) -> TestResult:
        """The result metrics.json holds; ValueError for anything loralab would not have written."""
        result = cls(acc=float(obj["acc"]), wrong=tuple(int(w) for w in obj["wrong"]), count=tuple(int(c) for c in obj["count"]))
        if not (0.0 <= result.acc <= 1.0) or len(result.wrong) != NUM_CLASSES or len(result.count) != NUM_CLASSES \
                or not all(0 <= w <= c for w, c in zip(result.wrong, result.count)):
            raise ValueError("a test result has an accuracy in [0, 1] and, per digit 0-9, 0 <= wrong <= count")
        return result


@dataclass(frozen=True)
class Shift:
    """Wrong answers before and after a fine-tune, on its target digits and on the others."""

    target_before: int
    target_after: int
    other_before: int
    other_after: int

    @classmethod
    def between(cls, before: TestResult, after: TestResult, digits: list[int]) -> Shift:
        (tb, ob), (ta, oa) = before.split(digits), after.split(digits)
        return cls(tb, ta, ob, oa)

    @property
    def gain(self) -> int:
        """Target-digit errors fixed."""
        return self.target_before - self.target_after

    @property
    def forgetting(self) -> int:
        """Errors caused on the other digits."""
        return self.other_after - self.other_before

    @property
    def objective(self) -> int:
        """What a sweeper maximises: target-digit errors fixed minus errors caused elsewhere."""
        return self.gain - self.forgetting
