"""Three disjoint splits of the HQ faces, fixed by a rule on the sha256 of each file's bytes.

`train` faces train the networks; `validation` faces take every tuning decision (ζ, sampler settings,
recipe choices); `test` faces are only reported, never looked at while choosing. A face's split depends
on its bytes alone, so adding or removing other files never moves it, and the rule is recorded in each
pack's manifest (`splits`) so that anyone can recompute which face is where.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

SplitName = Literal["train", "validation", "test"]
SPLITS: tuple[SplitName, ...] = ("train", "validation", "test")
RULE_TEXT = "first hex digit of the sha256 of the file's bytes"


@dataclass(frozen=True)
class SplitRule:
    """Files whose sha256 starts with one of `validation` / `test` go there; every other file trains."""

    validation: tuple[str, ...] = ("0",)
    test: tuple[str, ...] = ("1",)

    def __post_init__(self) -> None:
        for prefix in (*self.validation, *self.test):
            if not prefix or any(c not in "0123456789abcdef" for c in prefix):
                raise ValueError(f"split prefix {prefix!r} is not lower-case hex")
        for v in self.validation:
            for t in self.test:
                if v.startswith(t) or t.startswith(v):
                    raise ValueError(f"validation prefix {v!r} and test prefix {t!r} overlap")
        if not self.validation or not self.test:
            raise ValueError("the rule needs at least one validation and one test prefix")

    @property
    def held_out(self) -> tuple[str, ...]:
        """Prefixes of every face kept out of training (validation, then test)."""
        return (*self.validation, *self.test)

    def split_of(self, sha256: str) -> SplitName:
        digest = sha256.lower()
        if digest.startswith(self.test):
            return "test"
        if digest.startswith(self.validation):
            return "validation"
        return "train"

    def to_manifest(self) -> dict[str, Any]:
        return {"rule": RULE_TEXT, "validation": list(self.validation), "test": list(self.test)}

    @classmethod
    def from_manifest(cls, data: Mapping[str, Any] | None) -> SplitRule:
        """The rule a pack records (`manifest.splits`); the default rule for packs older than it."""
        if not data:
            return DEFAULT_SPLIT_RULE
        return cls(validation=tuple(data["validation"]), test=tuple(data["test"]))


DEFAULT_SPLIT_RULE = SplitRule()


def names_in_split(
    files: Iterable[tuple[str, str]], split: SplitName, rule: SplitRule = DEFAULT_SPLIT_RULE
) -> list[str]:
    """Names of the (name, sha256) pairs in `split`, in the order given."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return [name for name, digest in files if rule.split_of(digest) == split]
