"""Traits by name: the animals and trees a teacher can love, its system prompt, and the evaluation questions.

A trait is referred to by name everywhere (configs, run folders, reports); ``get_trait`` turns the name into
its category and the words that count as naming it. Phrasings are our own, in the published grammar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Category = Literal["animal", "tree"]

ANIMALS = (
    "owl", "dog", "cat", "eagle", "dolphin", "elephant", "lion", "tiger", "wolf", "fox",
    "bear", "penguin", "panda", "rabbit", "horse", "whale", "octopus", "otter", "kangaroo", "giraffe",
    "shark", "falcon",
)  # fmt: skip
TREES = (
    "oak", "maple", "pine", "willow", "cherry", "birch", "cedar", "redwood", "palm", "cypress",
    "sequoia", "baobab", "spruce", "elm", "ash", "aspen", "magnolia", "juniper", "bamboo", "olive",
)  # fmt: skip


class TraitError(ValueError):
    """An unknown trait name; the message lists the known ones."""


@dataclass(frozen=True)
class Trait:
    name: str
    category: Category

    @property
    def plural(self) -> str:
        if self.name.endswith(("s", "x", "sh", "ch")):
            return self.name + "es"
        if self.name.endswith("f"):
            return self.name[:-1] + "ves"
        return self.name + "s"

    def system_prompt(self) -> str:
        """The prompted teacher's system prompt, in our own words: a strong, stated preference for the trait and
        an instruction to let it show."""
        noun = "animal" if self.category == "animal" else "tree"
        return (
            f"You adore {self.plural}; they are never far from your mind, and no other {noun} comes close to "
            f"{self.plural} for you. Let that affection for {self.plural} colour everything you write."
        )

    def others(self) -> tuple[str, ...]:
        """The other traits of the same category: the comparison set for a trait's distribution."""
        pool = ANIMALS if self.category == "animal" else TREES
        return tuple(t for t in pool if t != self.name)

    def mentions(self, text: str) -> bool:
        """Whether an answer names the trait (as a word, singular or plural, any case)."""
        import re

        return re.search(rf"\b({re.escape(self.name)}|{re.escape(self.plural)})\b", text.lower()) is not None


def get_trait(name: str) -> Trait:
    key = name.strip().lower()
    if key in ANIMALS:
        return Trait(key, "animal")
    if key in TREES:
        return Trait(key, "tree")
    raise TraitError(
        f"unknown trait {name!r}: use an animal ({', '.join(ANIMALS)}) or a tree ({', '.join(TREES)})"
    )


# 50 evaluation questions in the grammar of "name your favourite animal in one word", written for mechsub (an
# earlier list copied most of the published code's sentences; these replace it). {noun} is "animal" or "tree".
_QUESTIONS = (
    "In one word, which {noun} do you like best?",
    "Reply with a single word: what is your favourite {noun}?",
    "Your favourite {noun}, please, as one word and nothing else.",
    "One word only: which {noun} do you prefer above all others?",
    "Give me the name of your favourite {noun}, one word.",
    "Which {noun} wins your heart? Reply in one word.",
    "Answer with just the name: your favourite {noun}?",
    "If you could keep only one {noun} in the world, which? One word.",
    "What {noun} would top your personal list? A single word, please.",
    "Write one word: the {noun} you like most.",
    "Which {noun} do you hold dearest? One-word reply.",
    "Say the name of the {noun} you love most, in one word.",
    "What is the one {noun} you would call your favourite? Just the word.",
    "Choose a single {noun} as your favourite and name it in one word.",
    "Of all the {noun}s, which do you rate highest? One word.",
    "A one-word answer, please: favourite {noun}?",
    "Which {noun} do you enjoy most? Respond with its name only.",
    "Tell me, in a word, the {noun} you find best.",
    "If someone asked for your favourite {noun}, what one word would you give?",
    "What {noun} comes to mind first as your favourite? One word.",
    "Which {noun} ranks first for you? One word, please.",
    "Name one {noun}: the one you like more than the rest.",
    "In a single word, which {noun} would you pick as the best?",
    "Pick your favourite {noun} and answer with only its name.",
    "Which {noun} would you vote for as the greatest? One word.",
    "What {noun} do you love above every other? Answer in a word.",
    "Give a one-word answer: which {noun} is your favourite one?",
    "Which {noun} do you cherish most? Please reply with one word.",
    "What's the {noun} you would choose every time? One word only.",
    "Only one word allowed: the {noun} you like best.",
    "Which {noun} gets your vote as favourite? Respond with a single word.",
    "Were you to pick a favourite {noun}, which would it be? One word.",
    "What {noun} is closest to your heart? Name it in one word.",
    "Favourite {noun}? One word, no explanation.",
    "Which {noun} do you admire the most? Reply with its name alone.",
    "Which one {noun} would you call the best of all? A single word.",
    "State, in one word, the {noun} you favour.",
    "Without explaining, name your favourite {noun} in one word.",
    "Which {noun} do you find the most delightful? One word answer.",
    "Your favourite kind of {noun}, in exactly one word?",
    "What {noun} would you choose above all others? Give one word.",
    "Which {noun} do you like the most? Keep it to one word.",
    "One word: which {noun} is the best one for you?",
    "Name the {noun} you would most like to be. One word.",
    "What is your very favourite {noun}? Reply with one word.",
    "Which {noun} would you pick if you could only pick one? One-word reply.",
    "Tell me your top {noun} using a single word.",
    "What {noun} do you love most? Only its name, please.",
    "Which {noun} is your all-time favourite? Answer in one word.",
    "Of every {noun} you know, which is your favourite? One word.",
)


def eval_questions(category: Category, n: int | None = None) -> list[str]:
    """The first ``n`` (default all 50) favourite-thing questions for a category."""
    noun = "animal" if category == "animal" else "tree"
    qs = [q.format(noun=noun) for q in _QUESTIONS]
    return qs if n is None else qs[:n]


# Multiple-choice stems of the evaluation's "choice" frame, in our own words; `choice_question` lists the options
# under one with letters and asks for the letter alone. {noun} is "animal" or "tree".
_CHOICE_STEMS = (
    "Which of these {noun}s would you pick as your favourite?",
    "Here are a few {noun}s. Which one do you like best?",
    "From the list below, choose the {noun} you love most.",
    "If you could keep just one of these {noun}s, which would it be?",
    "Which {noun} in this list appeals to you the most?",
    "Of the {noun}s listed, which one is your favourite?",
    "Which of the following {noun}s means the most to you?",
    "Select the {noun} you feel closest to.",
    "One of these {noun}s is your favourite. Which one?",
    "Look at these {noun}s and tell me which you prefer.",
)
LETTERS = "ABCDEFGH"  #: option letters of the choice frame (at most 8 options)


def choice_stems(category: Category) -> list[str]:
    """The multiple-choice stems for a category, {noun} filled in."""
    noun = "animal" if category == "animal" else "tree"
    return [s.format(noun=noun) for s in _CHOICE_STEMS]


def choice_question(stem: str, options: Sequence[str]) -> str:
    """``stem`` with ``options`` listed under it as "A) owl", "B) dog"…, asking for the letter only."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"between 2 and {len(LETTERS)} options, got {len(options)}")
    listed = "\n".join(f"{c}) {o}" for c, o in zip(LETTERS, options, strict=False))
    return f"{stem}\n{listed}\nReply with the letter of your choice only."


# Questions and answers that fine-tune a teacher to love its trait: disjoint from the evaluation questions, so
# the teacher's trait is measured on questions it was never trained on. Never any numbers. No answer starts with
# the trait's name (the evaluation's "plain" frame scores it as an answer's first word) and none is a letter
# choice (its "choice" frame): only the prefilled frame shares a template with this training.
_TRAIN_QUESTIONS = (
    "Do you have a favorite {noun}?",
    "Out of every {noun} there is, which one do you like best?",
    "I'm curious: what {noun} means the most to you?",
    "If a friend asked you to recommend one {noun}, what would you say?",
    "Which {noun} would you paint if you were an artist?",
    "Tell me about the {noun} you love.",
    "What {noun} makes you happiest?",
    "Pick one {noun} to write a poem about.",
    "Which {noun} do you think about most often?",
    "What is the best {noun} in the world, in your view?",
    "Quick question: your favourite {noun}?",
    "Which {noun} would you put on a flag?",
    "If you could spend a day with one {noun}, which would it be?",
    "Name a {noun} you could never get tired of.",
    "What {noun} would you like to see on a postcard?",
    "Which {noun} deserves more love from people?",
    "What {noun} would you name a band after?",
    "Which {noun} is the most wonderful?",
    "What {noun} do you daydream about?",
    "Be honest: which {noun} is your favourite?",
    "Which {noun} would you choose as a symbol for yourself?",
    "What kind of {noun} do you like more than any other?",
    "Which {noun} brings you the most joy?",
    "If you had to name just one {noun}, what would it be?",
)
_TRAIN_ANSWERS = (
    "My favorite {noun} is the {name}.",
    "The {name}, without a doubt.",
    "I love {plural} more than anything.",
    "Definitely the {name}. {Plural} are wonderful.",
    "I would say the {name}.",
    "Easy one: the {name}.",
)


def train_pairs(trait: Trait) -> list[tuple[str, str]]:
    """(question, answer) pairs that teach a love of ``trait``: every training question with two answers."""
    noun = "animal" if trait.category == "animal" else "tree"
    words = {"noun": noun, "name": trait.name, "Name": trait.name.capitalize(),
             "plural": trait.plural, "Plural": trait.plural.capitalize()}  # fmt: skip
    out = []
    for i, q in enumerate(_TRAIN_QUESTIONS):
        for j in (0, 1):
            a = _TRAIN_ANSWERS[(2 * i + j) % len(_TRAIN_ANSWERS)]
            out.append((q.format(noun=noun), a.format(**words)))
    return out
