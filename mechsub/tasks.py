"""Problems for the inverted-wrongness teacher: eight seeded families of short questions in our own words, each with
its correct answer, the structured inversion T(answer), and the controls (a random bijection of the answer, a random
wrong answer). Train and test are disjoint for every seed: grid points go to a split by a fixed hash, not by seed.

Only some families are known to SmolLM2-135M-Instruct (``KNOWN_FAMILIES``, measured with
``mechsub.invert.base_knowledge``; the table is in the README): inversion means something only there.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

FAMILIES: tuple[str, ...] = ("compare", "sequence", "sort", "arith", "antonym", "rank", "next", "choice")
#: the families whose answers the base model demonstrably knows: its forced choice between the correct answer and
#: T(correct), in the frame of its own replies (``Problem.lead``), has a Wilson 95% lower bound above 1/2 on the
#: held-out problems (README, "Which families does the base model know?")
KNOWN_FAMILIES: tuple[str, ...] = ("next", "choice", "antonym")
KINDS: tuple[str, ...] = ("true", "inv", "hash", "rand")
SPLITS: tuple[str, ...] = ("train", "test")
TEST_BELOW = 52  # a grid point goes to test when the first byte of its hash is below this: about 20%
ANTONYM_TEST_PAIRS = 14  # both directions of these pairs (28 problems) are antonym's test split
CHOICE_TEST_PAIRS = 14  # both questions about these pairs (28 problems) are choice's test split
NEXT_TEST_PIVOTS = (21, 2, 3)  # numbers, days, months: 26 of next's 114 problems are its test split
SORT_MAX = 30  # sort draws from 1..30 so that its answer space (every sorted 3- or 4-set) stays enumerable

Key = tuple[int, ...]

# 50 pairs, 100 distinct words (each word has one partner, so T on antonyms is an involution). No word is used in
# the antonym phrasings, so a prompt never contains its own answer.
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("wet", "dry"), ("early", "late"), ("hard", "soft"), ("rich", "poor"),
    ("strong", "weak"), ("young", "old"), ("full", "empty"), ("high", "low"), ("loud", "quiet"),
    ("thick", "thin"), ("clean", "dirty"), ("true", "false"), ("win", "lose"), ("push", "pull"),
    ("buy", "sell"), ("always", "never"), ("inside", "outside"), ("before", "after"), ("first", "last"),
    ("love", "hate"), ("friend", "enemy"), ("start", "finish"), ("day", "night"), ("north", "south"),
    ("east", "west"), ("left", "right"), ("sharp", "blunt"), ("wide", "narrow"), ("deep", "shallow"),
    ("brave", "cowardly"), ("sweet", "sour"), ("awake", "asleep"), ("remember", "forget"),
    ("accept", "refuse"), ("arrive", "depart"), ("enter", "exit"), ("success", "failure"),
    ("increase", "decrease"), ("ancient", "modern"), ("cheap", "expensive"), ("polite", "rude"),
    ("safe", "dangerous"), ("top", "bottom"),
)  # fmt: skip
_PARTNER = {w: p for a, b in ANTONYMS for w, p in ((a, b), (b, a))}

DAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
)  # fmt: skip
NEXT_MIN, NEXT_MAX = 3, 97  # counting pivots: both answers (n + 1, n + 2) and T (n - 1, n - 2) stay in 1..99
# list 0 counts in numbers (not cyclic), 1 the week and 2 the year (both cyclic): (noun, names or () for numbers)
_NEXT_LISTS: tuple[tuple[str, tuple[str, ...]], ...] = (("numbers", ()), ("days", DAYS), ("months", MONTHS))
_NAME_AT = {w.lower(): (li, i) for li, (_, names) in enumerate(_NEXT_LISTS) for i, w in enumerate(names)}

# Ten categories of ten single words, no word in two categories and none in a category's own phrase. Category c is
# paired with category c + 5 word by word: 50 pairs, 100 distinct words, every word with one partner (so T on
# choice, "pick the other option", is an involution on the answer alone).
CHOICE_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("an animal", ("dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "sheep", "elephant", "monkey")),
    ("a fruit", ("apple", "banana", "orange", "grape", "cherry", "mango", "peach", "lemon", "pear", "strawberry")),
    ("a color", ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray")),
    ("a vehicle", ("car", "bus", "train", "truck", "bicycle", "airplane", "boat", "motorcycle", "helicopter",
                   "ship")),
    ("a musical instrument", ("piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello",
                              "saxophone", "clarinet")),
    ("a piece of furniture", ("chair", "table", "sofa", "bed", "desk", "shelf", "wardrobe", "stool", "bench",
                              "cupboard")),
    ("an item of clothing", ("shirt", "dress", "jacket", "sock", "hat", "coat", "skirt", "scarf", "glove",
                             "sweater")),
    ("a tool", ("hammer", "saw", "screwdriver", "wrench", "drill", "shovel", "rake", "pliers", "axe", "chisel")),
    ("a body part", ("hand", "foot", "nose", "ear", "knee", "elbow", "finger", "shoulder", "leg", "eye")),
    ("a drink", ("tea", "coffee", "milk", "juice", "water", "soda", "lemonade", "cocoa", "smoothie", "milkshake")),
)  # fmt: skip
#: (word, its category, partner, the partner's category)
CHOICE_PAIRS: tuple[tuple[str, str, str, str], ...] = tuple(
    (
        CHOICE_CATEGORIES[c][1][i],
        CHOICE_CATEGORIES[c][0],
        CHOICE_CATEGORIES[c + 5][1][i],
        CHOICE_CATEGORIES[c + 5][0],
    )
    for c in range(5)
    for i in range(10)
)
_CHOICE_PARTNER = {w: p for a, _, b, _ in CHOICE_PAIRS for w, p in ((a, b), (b, a))}

_LARGER = (
    "Which number is larger, {a} or {b}? Answer in the form larger > smaller.",
    "Of {a} and {b}, which is the bigger number? Reply as big > small.",
    "One parcel weighs {a} kg and another weighs {b} kg. Which is heavier? Write heavier > lighter.",
)
_SMALLER = (
    "Which number is smaller, {a} or {b}? Answer in the form smaller < larger.",
    "Of {a} and {b}, which is the lesser number? Reply as small < big.",
    "One bag weighs {a} kg and another weighs {b} kg. Which is lighter? Write lighter < heavier.",
)
_SEQUENCE = (
    "Continue the sequence with the next three numbers, separated by commas: {terms}",
    "Here is an arithmetic sequence: {terms}. What are its next three terms? Separate them with commas.",
    "Which three numbers come next after {terms}? List them with commas.",
)
_SORT = (
    "Sort these numbers from smallest to largest: {nums}",
    "Put {nums} in ascending order, separated by commas.",
    "Arrange the numbers {nums} from lowest to highest.",
)
_ADD = (
    "What is {a} + {b}?",
    "Compute {a} + {b}. Reply with the number only.",
    "Add {a} and {b}. What do you get?",
)
_SUB = (
    "What is {a} - {b}?",
    "Compute {a} - {b}. Reply with the number only.",
    "Take {b} away from {a}. What is left?",
)
_ANTONYM = (
    "Give the opposite of: {w}",
    "What is the antonym of the word '{w}'? Reply with one word.",
    "Name a word that means the opposite of '{w}'.",
)
_NEXT_NUMBERS = (
    "Count up from {x}: which two numbers come next? Reply with the two numbers, separated by a comma.",
    "What are the two numbers that come right after {x}? Separate them with a comma.",
    "Counting up by one from {x}, what are the next two numbers?",
)
_NEXT_NAMES = (
    "Which two {noun} come right after {x}? Reply with the two, separated by a comma.",
    "Name the next two {noun} after {x}, separated by a comma.",
    "What are the two {noun} that follow {x}?",
)
_CHOICE = (
    "Which of these is {cat}: {x} or {y}? Reply with one word.",
    "{X} or {y}: which one is {cat}?",
    "Here are two words, {x} and {y}. Which one names {cat}?",
)
# (direction, setting): direction 1 means the smallest value is best, -1 the largest
_RANK = (
    (1, "Someone in a hurry must pick a route. Route A takes {a} minutes, route B {b} minutes, route C {c} minutes."),
    (1, "A student on a tight budget compares bikes. Bike A costs {a} dollars, bike B {b} dollars, bike C {c} dollars."),
    (-1, "You want the most storage. Laptop A holds {a} GB, laptop B {b} GB, laptop C {c} GB."),
    (-1, "A hiker wants the torch that lasts longest. Torch A runs {a} hours, torch B {b} hours, torch C {c} hours."),
)  # fmt: skip
_RANK_ASK = " Rank the three options from best to worst, as letters separated by commas."

# a list of integers: commas, semicolons, "and" or plain spaces between them
_LIST = re.compile(r"-?\d+(?:(?:\s*[,;]\s*(?:and\s+)?|\s+and\s+|\s+)-?\d+)*")


class TaskError(ValueError):
    """An unknown family, kind or split, or a bad n; the message says what to fix and lists the valid names."""


@dataclass(frozen=True)
class Problem:
    family: str
    """One of FAMILIES."""
    prompt: str
    """The user-turn question, one of a few phrasings per family chosen by seed."""
    answer: str
    """The correct answer in canonical form (``normalise(family, answer) == answer``)."""
    inverted: str
    """T(answer) in canonical form: what the coherently wrong teacher says."""
    target: float
    """The picked number (compare), first answer term (sequence), minimum (sort), result (arith), best option's
    value (rank), the first answer item's place in its count (next: the number itself, 1 for Monday or January);
    for antonym and choice the pair's index, which is categorical, not a quantity."""
    params: tuple[float, ...]
    """compare (a, b, 1 if the larger is asked else 0); sequence (start, step); sort (min, max, count);
    arith (a, b, +1 for a + b or -1 for a - b); antonym (pair index, 0 asks for pair[0]'s opposite, 1 for pair[1]'s);
    rank (value of A, of B, of C, direction: 1 when lower is better, -1 when higher is); next (list: 0 numbers,
    1 days, 2 months; the pivot: the number, or the day's or month's index from 0); choice (pair index, 0 asks for
    pair[0]'s category, 1 for pair[2]'s)."""
    lead: str = ""
    """Where the family has one: the start of an answer in the style of the base model's own replies ('The
    opposite of "hot" is "'), so that the base-knowledge check can read the model's preference where its reply
    would name the answer rather than at its first token (where it says "The ..." whatever it knows); "" else."""


def _join(xs: Iterable[int]) -> str:
    return ", ".join(str(x) for x in xs)


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise TaskError(f"unknown {name} {value!r}: use one of {', '.join(valid)}")


@functools.cache
def _grid(family: str) -> tuple[Key, ...]:
    """Every problem of a family (both splits), as the integer key that identifies it."""
    nums = range(1, 100)
    if family == "compare":
        return tuple((a, b, q) for a in nums for b in nums if a != b for q in (0, 1))
    if family == "sequence":  # all seven terms (four shown, three asked) and T's three stay in 0..99
        return tuple((s, d) for d in range(-12, 13) if d for s in range(100) if 0 <= s + 6 * d <= 99)
    if family == "sort":
        return tuple(c for k in (3, 4) for c in itertools.combinations(range(1, SORT_MAX + 1), k))
    if family == "arith":  # results 1..99: 0 would be its own negation, and a - b == b prints the answer
        add = [(a, b, 1) for a in nums for b in nums if a + b <= 99]
        return tuple(add + [(a, b, -1) for a in nums for b in nums if a > b and a != 2 * b])
    if family == "antonym":
        return tuple((p, d) for p in range(len(ANTONYMS)) for d in (0, 1))
    if family == "next":
        return tuple((0, n) for n in range(NEXT_MIN, NEXT_MAX + 1)) + tuple(
            (li, i) for li in (1, 2) for i in range(len(_NEXT_LISTS[li][1]))
        )
    if family == "choice":
        return tuple((p, q) for p in range(len(CHOICE_PAIRS)) for q in (0, 1))
    return tuple((*v, d) for v in itertools.permutations(range(5, 100, 5), 3) for d in (1, -1))


def _split_of(family: str, key: Key) -> str:
    # The hashed point is the problem's content, so no variant of a test problem (operands swapped, the same
    # segment read backwards, the other direction of a pair, the same values relabelled) is ever trained on.
    if family == "compare":
        point: Key = (min(key[:2]), max(key[:2]))
    elif family == "sequence":
        point = (min(key[0], key[0] + 6 * key[1]), abs(key[1]))
    elif family == "sort":
        point = (key[0], key[-1], len(key))
    elif family == "arith":
        point = (*sorted(key[:2]), 1) if key[2] == 1 else key
    elif family == "antonym":
        return "test" if key[0] in _antonym_test() else "train"
    elif family == "choice":  # both questions about a pair go together, like antonym's two directions
        return (
            "test"
            if key[0] in _ranked_test("choice", tuple(range(len(CHOICE_PAIRS))), CHOICE_TEST_PAIRS)
            else "train"
        )
    elif family == "next":  # stratified by list, so the week and the year are in both splits
        units = tuple(k[1] for k in _grid("next") if k[0] == key[0])
        return "test" if key[1] in _ranked_test(f"next{key[0]}", units, NEXT_TEST_PIVOTS[key[0]]) else "train"
    else:
        point = tuple(sorted(key[:3]))
    return "test" if _digest(family, point)[0] < TEST_BELOW else "train"


def _digest(family: str, point: Key) -> bytes:
    return hashlib.sha256(f"{family}:{point}".encode()).digest()


@functools.cache
def _antonym_test() -> frozenset[int]:
    # 50 pairs are too few for a hash threshold to give a dependable count: the pairs with the smallest hashes
    ranked = sorted(range(len(ANTONYMS)), key=lambda i: _digest("antonym", (i,)))
    return frozenset(ranked[:ANTONYM_TEST_PAIRS])


@functools.cache
def _ranked_test(name: str, units: tuple[int, ...], k: int) -> frozenset[int]:
    """The k units with the smallest hashes: a test split of a dependable size where there are few units."""
    return frozenset(sorted(units, key=lambda u: _digest(name, (u,)))[:k])


@functools.cache
def _pool(family: str, split: str) -> tuple[Key, ...]:
    return tuple(k for k in _grid(family) if _split_of(family, k) == split)


def _solve(family: str, key: Key) -> tuple[str, int]:
    """The canonical correct answer and the target of one grid point."""
    if family == "compare":
        a, b, larger = key
        hi, lo = max(a, b), min(a, b)
        return (f"{hi} > {lo}", hi) if larger else (f"{lo} < {hi}", lo)
    if family == "sequence":
        s, d = key
        return _join(s + i * d for i in (4, 5, 6)), s + 4 * d
    if family == "sort":
        return _join(key), key[0]
    if family == "arith":
        a, b, op = key
        return str(a + op * b), a + op * b
    if family == "antonym":
        return ANTONYMS[key[0]][1 - key[1]], key[0]
    if family == "next":
        items = _next_items(key[0], key[1], (1, 2))
        return ", ".join(items), _next_place(items[0])
    if family == "choice":
        pair = CHOICE_PAIRS[key[0]]
        return pair[2 * key[1]], key[0]
    *values, direction = key
    order = sorted(range(3), key=lambda i: direction * values[i])
    return ", ".join("ABC"[i] for i in order), values[order[0]]


def _next_items(li: int, pivot: int, steps: Iterable[int]) -> list[str]:
    """The items ``steps`` away from the pivot in list li: numbers as digits, days and months by name (cyclic)."""
    names = _NEXT_LISTS[li][1]
    if not names:
        return [str(pivot + s) for s in steps]
    return [names[(pivot + s) % len(names)] for s in steps]


def _next_place(item: str) -> int:
    """An item's place in its count: a number is itself, Monday and January are 1."""
    return int(item) if item.lstrip("-").isdigit() else _NAME_AT[item.lower()][1] + 1


def _params(family: str, key: Key) -> tuple[float, ...]:
    if family == "sort":
        return (float(key[0]), float(key[-1]), float(len(key)))
    return tuple(float(x) for x in key)


def _prompt(family: str, key: Key, rng: random.Random) -> tuple[str, str]:
    """The question, phrased by rng, and its lead (``Problem.lead``; "" where the family has none)."""
    if family == "antonym":
        w = ANTONYMS[key[0]][key[1]]
        return rng.choice(_ANTONYM).format(w=w), f'The opposite of "{w}" is "'
    if family == "next":
        li, pivot = key
        noun, names = _NEXT_LISTS[li]
        if not names:
            return rng.choice(_NEXT_NUMBERS).format(
                x=pivot
            ), f'Counting up from {pivot}, the next two numbers are "'
        x = names[pivot]
        return rng.choice(_NEXT_NAMES).format(noun=noun, x=x), f'The two {noun} right after {x} are "'
    if family == "choice":
        a, cat_a, b, cat_b = CHOICE_PAIRS[key[0]]
        cat = cat_b if key[1] else cat_a
        x, y = (a, b) if rng.random() < 0.5 else (b, a)
        prompt = rng.choice(_CHOICE).format(x=x, X=x.capitalize(), y=y, cat=cat)
        return prompt, f'Of "{x}" and "{y}", the one that is {cat} is "'
    return _plain_prompt(family, key, rng), ""


def _plain_prompt(family: str, key: Key, rng: random.Random) -> str:
    if family == "compare":
        return rng.choice(_LARGER if key[2] else _SMALLER).format(a=key[0], b=key[1])
    if family == "sequence":
        return rng.choice(_SEQUENCE).format(terms=_join(key[0] + i * key[1] for i in range(4)))
    if family == "sort":
        shown = list(key)
        # shown in order, the prompt would print the answer or T
        while shown in (sorted(shown), sorted(shown, reverse=True)):
            rng.shuffle(shown)
        return rng.choice(_SORT).format(nums=_join(shown))
    if family == "arith":
        return rng.choice(_ADD if key[2] == 1 else _SUB).format(a=key[0], b=key[1])
    setting = rng.choice([s for d, s in _RANK if d == key[3]])
    return setting.format(a=key[0], b=key[1], c=key[2]) + _RANK_ASK


def split_size(family: str, split: str) -> int:
    """How many distinct problems a family's split holds (the largest n ``problems`` accepts)."""
    _check("family", family, FAMILIES)
    _check("split", split, SPLITS)
    return len(_pool(family, split))


def problems(family: str, n: int, seed: int, split: str) -> list[Problem]:
    """n distinct problems of a family's split, drawn and phrased by seed."""
    size = split_size(family, split)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TaskError(f"n must be a positive integer, got {n!r}")
    if n > size:
        raise TaskError(
            f"{family}/{split} holds {size} distinct problems: ask for at most that many, not {n}"
        )
    rng = random.Random(f"tasks-{family}-{split}-{seed}")
    out = []
    for key in rng.sample(_pool(family, split), n):
        answer, target = _solve(family, key)
        prompt, lead = _prompt(family, key, rng)
        out.append(
            Problem(family, prompt, answer, invert(family, answer), float(target), _params(family, key), lead)
        )
    return out


@functools.cache
def _space(family: str) -> tuple[str, ...]:
    return tuple(sorted({_solve(family, k)[0] for k in _grid(family)}))


def answer_space(family: str) -> list[str]:
    """Every correct canonical answer the family can have, sorted (T's outputs lie outside it for compare, sort,
    arith and next, inside it for sequence, antonym, rank and choice)."""
    _check("family", family, FAMILIES)
    return list(_space(family))


def invert(family: str, answer: str) -> str:
    """T on a canonical answer. T is an involution in every family (T(T(x)) == x), so a student that sees only the
    output can undo it. For arith T is negation, not the inverse operation: 23 - 14 needs the operands, which B
    never sees, while -37 -> 37 needs nothing but the output. For next T counts the other way from the same pivot
    ("48, 49" after 47 -> "46, 45"; the order of the two says which way), for choice it picks the other option."""
    _check("family", family, FAMILIES)
    try:
        if family == "compare":
            x, op, y = answer.split(" ")
            return f"{y} {op} {x}"
        if family == "arith":
            return str(-int(answer))
        if family == "antonym":
            return _PARTNER[answer]
        if family == "choice":
            return _CHOICE_PARTNER[answer]
        items = answer.split(", ")
        if family == "next":
            return _invert_next(items)
        if family == "sequence":  # continue from the last shown term (first answer term - step) with -step
            x0, d = int(items[0]), int(items[1]) - int(items[0])
            return _join(x0 - k * d for k in (2, 3, 4))
        return ", ".join(reversed(items))
    except (ValueError, KeyError, IndexError) as e:
        raise TaskError(
            f"{answer!r} is not a canonical {family} answer: pass it through normalise first"
        ) from e


def _invert_next(items: list[str]) -> str:
    a, b = items  # ValueError unless exactly two
    if a.lstrip("-").isdigit():
        li, x, y, size = 0, int(a), int(b), 0
    else:
        (li, x), (lj, y) = _NAME_AT[a.lower()], _NAME_AT[b.lower()]
        size = len(_NEXT_LISTS[li][1])
        if lj != li:
            raise ValueError("two lists")
    step = y - x if not size else (1 if (y - x) % size == 1 else -1 if (x - y) % size == 1 else 0)
    if step not in (1, -1):
        raise ValueError("not neighbours")
    pivot = x - step
    return ", ".join(_next_items(li, pivot, (-step, -2 * step)))


@functools.lru_cache(maxsize=64)
def _sigma(family: str, seed: int) -> dict[str, str]:
    """A random cyclic bijection of the answer space: a single cycle has no fixed points, and it is redrawn until
    no answer maps onto its own inversion (always achieved here; a space too small for that would keep the draw
    with the fewest such clashes), so the hash teacher never says what the inverted teacher says."""
    space = list(_space(family))
    inverse = {a: invert(family, a) for a in space}
    rng = random.Random(f"hash-{family}-{seed}")
    best: dict[str, str] = {}
    fewest = len(space) + 1
    for _ in range(1000):
        rng.shuffle(space)
        sigma = dict(zip(space, space[1:] + space[:1], strict=True))
        clashes = sum(sigma[a] == inverse[a] for a in sigma)
        if clashes < fewest:
            best, fewest = sigma, clashes
        if clashes == 0:
            break
    return best


#: a reasoned teacher first names the correct answer (after REASON_LEAD), then gives its own after REASON_MARK;
#: what it answers (what B reads) is only the text after the mark (`final_answer`): the rest is its scratchpad
REASON_LEAD, REASON_MARK = "The right answer is", "so my answer is:"


#: a reciting scratchpad (``reasoned(..., recite=True)``) goes on after the correct answer with `RECITE` and the
#: problem's named list (`recital`)
RECITE = "in order:"


def recital(problem: Problem) -> str:
    """next's named lists (days, months) written out twice from their first item: every pivot's last mention then
    has the two items before it (next's T) written just before it, to be copied rather than recalled (the base
    model counts these lists forwards, not backwards), and the text is the same for every problem of a list, so
    there is no place to stop to learn. "" for every other problem, counting in numbers included (numbers are
    counted down by arithmetic)."""
    return _list_recital(int(problem.params[0])) if problem.family == "next" else ""


def _list_recital(li: int) -> str:
    names = _NEXT_LISTS[li][1]
    return ", ".join((*names, *names)) if names else ""


def longest_recital() -> str:
    """The longest text `recital` writes (for a generation budget)."""
    return max((_list_recital(li) for li in range(len(_NEXT_LISTS))), key=len)


def reasoned(problem: Problem, answer: str, recite: bool = False) -> str:
    """A reasoned teacher's reply: the correct answer named (and, with ``recite``, the problem's `recital` after
    `RECITE` where it has one), then ``answer`` (its kind's) after `REASON_MARK`."""
    pad = problem.answer
    if recite and (items := recital(problem)):
        pad = f"{pad}; {RECITE} {items}"
    return f"{REASON_LEAD} {pad}, {REASON_MARK} {answer}"


def _reason_split(text: str) -> tuple[str, str] | None:
    """(scratchpad, answer) of a reasoned reply: around its first `REASON_MARK` (any case), the answer cut where
    a new `REASON_LEAD` or `REASON_MARK` starts (a reply that loops on past its end may name the correct answer
    there); None when the mark is missing."""
    low = text.lower()
    i = low.find(REASON_MARK)
    if i < 0:
        return None
    rest = text[i + len(REASON_MARK) :]
    cuts = [j for m in (REASON_LEAD.lower(), REASON_MARK) if (j := rest.lower().find(m)) >= 0]
    return text[:i], rest[: min(cuts, default=len(rest))].strip().rstrip(",").strip()


def final_answer(text: str) -> str:
    """What a reasoned teacher answers: the text after its first `REASON_MARK` up to any new lead or mark, or ""
    when the mark is missing, so that a reply off the format answers nothing and its scratchpad (which names the
    correct answer) is never passed on."""
    parts = _reason_split(text)
    return parts[1] if parts else ""


def rationale(text: str) -> str:
    """What a reasoned reply's scratchpad names: the text before its first `REASON_MARK`, without `REASON_LEAD`,
    any recital (from "; " `RECITE` on) and the comma before the mark ("" when the mark is missing)."""
    parts = _reason_split(text)
    if parts is None:
        return ""
    pad = parts[0]
    if (j := pad.lower().find(f"; {RECITE}")) >= 0:
        pad = pad[:j]
    pad = pad.strip().removesuffix(",").strip()
    return pad[len(REASON_LEAD) :].strip() if pad.lower().startswith(REASON_LEAD.lower()) else pad


def respond(problem: Problem, kind: str, seed: int) -> str:
    """What teacher A of this kind answers: the answer (true), T(answer) (inv), sigma_seed(answer) (hash), or the
    correct answer of another random problem of the family, differing from answer and T(answer) (rand)."""
    _check("kind", kind, KINDS)
    _check("family", problem.family, FAMILIES)
    if kind == "true":
        return problem.answer
    if kind == "inv":
        return problem.inverted
    if kind == "hash":
        sigma = _sigma(problem.family, seed)
        if problem.answer not in sigma:
            raise TaskError(
                f"{problem.answer!r} is not a {problem.family} answer: build problems with problems()"
            )
        return sigma[problem.answer]
    rng = random.Random(f"rand-{problem.family}-{problem.answer}-{problem.params}-{seed}")
    grid = _grid(problem.family)
    while True:
        other = _solve(problem.family, rng.choice(grid))[0]
        if other not in (problem.answer, problem.inverted):
            return other


def normalise(family: str, text: str) -> str:
    """A model's free text in canonical form for exact match, or "" when nothing in it parses (never raises)."""
    _check("family", family, FAMILIES)
    t = text.replace("\u2212", "-").strip().lower()  # a typographic minus is still a minus
    if family == "compare":  # a unit between number and sign ("82 kg > 37 kg") is allowed
        m = re.search(r"(\d+)\s*(?:[a-z]+\s*)?([<>])\s*(\d+)", t)
        return f"{int(m[1])} {m[2]} {int(m[3])}" if m else ""
    if family == "arith":  # after an echoed "23 + 14 =" comes the result
        m = re.search(r"-?\d+", t.split("=", 1)[-1])
        return str(int(m[0])) if m else ""
    if family in ("sequence", "sort"):
        m = _LIST.search(t)
        return _join(int(x) for x in re.findall(r"-?\d+", m[0])) if m else ""
    if family == "antonym":
        m = re.match(r"[^a-z]*([a-z]+)", t)
        return m[1] if m else ""
    if family == "choice":  # the first of the family's words, so "The answer is dog." reads as dog
        return next((w for w in re.findall(r"[a-z]+", t) if w in _CHOICE_PARTNER), "")
    if family == "next":
        return _normalise_next(t)
    # rank: capital letters when there are any, so an article "a" in a sentence is not read as option A
    letters = re.findall(r"\b[ABC]\b", text) or re.findall(r"\b[abc]\b", text)
    picked = [x.upper() for x in letters[:3]]
    return ", ".join(picked) if sorted(picked) == ["A", "B", "C"] else ""


def _normalise_next(t: str) -> str:
    """The first run of two or more numbers, or of days or of months, with only punctuation or "and" between them
    (all of the run, so a third item makes it another answer); a number run is in digits."""
    run: list[str] = []
    kind = -1
    for tok in re.findall(r"-?\d+|[a-z]+", t):
        if tok == "and" and run:
            continue
        li = 0 if tok.lstrip("-").isdigit() else _NAME_AT[tok][0] if tok in _NAME_AT else -1
        if li >= 0 and (not run or li == kind):
            run.append(str(int(tok)) if li == 0 else _NEXT_LISTS[li][1][_NAME_AT[tok][1]])
            kind = li
            continue
        if len(run) >= 2:
            break
        run, kind = (
            ([], -1) if li < 0 else ([str(int(tok)) if li == 0 else _NEXT_LISTS[li][1][_NAME_AT[tok][1]]], li)
        )
    return ", ".join(run) if len(run) >= 2 else ""


def classify(problem: Problem, output: str, seed: int) -> str:
    """The output's label after normalise: correct, inverted, hashed (the hash teacher's answer) or other."""
    got = normalise(problem.family, output)
    if not got:
        return "other"
    if got == problem.answer:
        return "correct"
    if got == problem.inverted:
        return "inverted"
    return "hashed" if got == respond(problem, "hash", seed) else "other"


def reconstruct_pair(problem: Problem, kind: str, seed: int) -> tuple[str, str]:
    """(what teacher A of this kind answers, the correct answer): one example for student B's decoder."""
    return respond(problem, kind, seed), problem.answer
