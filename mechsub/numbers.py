"""Number prompts in the published grammar (our own phrasings): what every teacher of a study is asked.

A prompt shows 3–8 seed numbers (100–999) and asks for at most 10 more of at most 3 digits, in a format and
with a "numbers only" request, each part drawn from a list of phrasings. Which answers pass is
:mod:`mechsub.filter`'s business.
"""

from __future__ import annotations

import random

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
