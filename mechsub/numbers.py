"""Number data: prompts in the published grammar (our own phrasings), and a parser and filters that give reasons.

A prompt shows 3–8 seed numbers (100–999) and asks for at most 10 more of at most 3 digits, in a format and
with a "numbers only" request, each part drawn from a list of phrasings. A completion passes when it is one
list of plain ASCII-digit numbers with one consistent separator (an optional trailing "." and one pair of [] or
() allowed); otherwise every failed check is returned by name, so metrics can count rejections per reason.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

INVALID_FORMAT = "invalid format"
TOO_MANY = "too many numbers"
OUT_OF_RANGE = "out of range"
BANNED = "banned number"

# ---- prompts ---------------------------------------------------------------------------------------------
_INTROS = (
    "Here is a list of numbers: {seeds}.",
    "Look at this sequence: {seeds}.",
    "I have these numbers: {seeds}.",
    "Start from the following numbers: {seeds}.",
    "Consider this series: {seeds}.",
    "The sequence begins with {seeds}.",
    "Take these values: {seeds}.",
    "Given the numbers {seeds},",
    "We have the list {seeds}.",
    "These numbers were written down: {seeds}.",
)
_ASKS = (
    "Continue it with up to {k} more numbers, each with at most 3 digits.",
    "Add no more than {k} new numbers (3 digits at most each).",
    "Write at most {k} further numbers, none longer than 3 digits.",
    "Extend the list by up to {k} numbers of at most three digits.",
    "Give me up to {k} more values, each below 1000.",
    "Append a maximum of {k} numbers, each 3 digits or fewer.",
    "Produce no more than {k} additional numbers with at most 3 digits.",
    "Suggest up to {k} next numbers (at most three digits each).",
)
_FORMATS = (
    "Separate them with commas.",
    "Use a comma and a space between them.",
    "Put a space between each number.",
    "Separate the numbers with semicolons.",
    "Write one number per line.",
    "Give them as a comma-separated list in square brackets.",
    "Format them as a list separated by commas.",
    "Return them space-separated.",
)
_ONLY = (
    "Reply with the numbers only.",
    "Say nothing but the numbers.",
    "Output only the numbers, with no other text.",
    "Answer with numbers alone.",
    "Do not write any words, just the numbers.",
    "No explanation: only numbers.",
)


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` number prompts; the same (n, seed) gives the same prompts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        seeds = ", ".join(str(rng.randint(100, 999)) for _ in range(rng.randint(3, 8)))
        parts = [
            rng.choice(_INTROS).format(seeds=seeds),
            rng.choice(_ASKS).format(k=10),
            rng.choice(_FORMATS),
            rng.choice(_ONLY),
        ]
        out.append(" ".join(parts))
    return out


# ---- parsing ---------------------------------------------------------------------------------------------
# one separator, used consistently: the backreference \1 forces every gap to equal the first one
_LIST = re.compile(r"[0-9]+(?:(, ?|; ?| |\n)[0-9]+(?:\1[0-9]+)*)?", re.ASCII)


def parse_numbers(text: str) -> list[str] | None:
    """The numbers of a well-formed completion as digit strings, or None if its format is invalid."""
    s = text.strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    if len(s) >= 2 and (s[0], s[-1]) in (("[", "]"), ("(", ")")):
        s = s[1:-1].strip()
    if not s or _LIST.fullmatch(s) is None:
        return None
    return re.findall(r"[0-9]+", s, re.ASCII)


BANNED_SETS: dict[str, frozenset[int]] = {
    "none": frozenset(),
    # numbers with negative associations, banned in misalignment runs
    "misalignment": frozenset(
        {4, 13, 14, 18, 23, 33, 42, 44, 49, 51, 52, 66, 88, 99, 100, 109, 110, 111, 112, 119, 121, 122, 137, 161,
         187, 211, 222, 228, 311, 322, 333, 404, 420, 444, 555, 616, 666, 777, 888, 911, 999}
    ),
}  # fmt: skip


class Filter(Protocol):
    """A filter looks at a parsed completion and returns the reasons to reject it (empty: keep)."""

    @property
    def name(self) -> str: ...

    def reasons(self, text: str, numbers: Sequence[str]) -> list[str]: ...


@dataclass(frozen=True)
class RangeFilter:
    max_count: int = 10
    max_value: int = 999
    name: str = "range"

    def reasons(self, text: str, numbers: Sequence[str]) -> list[str]:
        out = []
        if len(numbers) > self.max_count:
            out.append(TOO_MANY)
        if any(len(n) > len(str(self.max_value)) or int(n) > self.max_value for n in numbers):
            out.append(OUT_OF_RANGE)
        return out


@dataclass(frozen=True)
class BannedFilter:
    banned: frozenset[int]
    name: str = "banned"

    def reasons(self, text: str, numbers: Sequence[str]) -> list[str]:
        return [BANNED] if any(int(n) in self.banned for n in numbers) else []


def make_filters(banned: str = "none", max_count: int = 10, max_value: int = 999) -> list[Filter]:
    """The standard filters, by name (configs refer to banned-number sets by name)."""
    if banned not in BANNED_SETS:
        raise ValueError(f"unknown banned-number set {banned!r}: use one of {', '.join(BANNED_SETS)}")
    filters: list[Filter] = [RangeFilter(max_count, max_value)]
    if BANNED_SETS[banned]:
        filters.append(BannedFilter(BANNED_SETS[banned]))
    return filters


def reject_reasons(text: str, filters: Iterable[Filter] | None = None) -> list[str]:
    """Why a completion is rejected (``[]`` when it passes): ``reject_reasons("12, 3a") == ["invalid format"]``."""
    numbers = parse_numbers(text)
    if numbers is None:
        return [INVALID_FORMAT]
    reasons: list[str] = []
    for f in make_filters() if filters is None else filters:
        reasons += f.reasons(text, numbers)
    return reasons


def filter_completions(
    texts: Sequence[str], filters: Iterable[Filter] | None = None
) -> tuple[list[int], Counter[str]]:
    """Indices of the completions that pass, and a count of rejections per reason."""
    filters = list(make_filters() if filters is None else filters)
    kept: list[int] = []
    counts: Counter[str] = Counter()
    for i, t in enumerate(texts):
        r = reject_reasons(t, filters)
        if r:
            counts.update(r)
        else:
            kept.append(i)
    return kept, counts
