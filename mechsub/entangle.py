"""Entangled numbers: which numbers a trait's system prompt makes likelier, and whether they call the trait back.

score(n | system) = log P(the digits of n, then the end of turn) as the answer to a neutral number question,
summing digit-token log-probs (SmolLM2 writes one token per digit). The entanglement of n with a trait is
score(n | trait prompt) − score(n | no system prompt), for every n in 0–999. Subliminal prompting turns it
around: a system prompt that loves the NUMBER, then Δ log P(trait) on the evaluation questions, for the most
entangled numbers against random numbers (the control).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

NUMBER_QUESTION = "Pick a number between 0 and 999. Reply with the number only."


@torch.no_grad()
def number_scores(model: Any, tok: Any, system: str | None, question: str = NUMBER_QUESTION) -> Tensor:
    """(1000,) log P(n followed by the end of turn) for n = 0..999, one shared prompt cache."""
    from mechsub.generate import NumberVocab
    from mechsub.prompts import chat_prefix

    vocab = NumberVocab.of(tok)
    prompt = chat_prefix(tok, question, system)
    out = model(torch.tensor([prompt]), use_cache=True)
    first = out.logits[0, -1].log_softmax(-1)
    digits = vocab.ids[:10]
    eos = int(vocab.ids[vocab.end])
    # every number as its digit tokens + end; right-padded to 4 tokens; scored from one copy of the cache each
    seqs = [[int(digits[int(c)]) for c in str(n)] + [eos] for n in range(1000)]
    inp = torch.tensor([s[:-1] + [eos] * (4 - len(s)) for s in seqs])  # inputs: all but the last token
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(seqs))
    lp = model(inp, past_key_values=cache, use_cache=False).logits.log_softmax(-1)
    scores = torch.empty(1000)
    for n, s in enumerate(seqs):
        total = float(first[s[0]])
        for j in range(1, len(s)):
            total += float(lp[n, j - 1, s[j]])
        scores[n] = total
    return scores


def number_love_prompt(n: int) -> str:
    """Subliminal prompting: a system prompt in the trait template's shape, about a number."""
    return (f"You adore the number {n}; it is never far from your mind, and no other number comes close to it "
            "for you. Let that affection colour everything you write.")  # fmt: skip


def subliminal_prompting(
    lm: Any, trait: str, numbers: Sequence[int], questions: Sequence[str]
) -> list[float]:
    """Δ log P(trait) on the questions with 'You adore the number {n}…' as system prompt, vs no system prompt, per n."""
    from mechsub.evaluate import trait_logprobs
    from mechsub.traits import get_trait

    cat = get_trait(trait).category
    ref = float(trait_logprobs(lm.model, lm.tokenizer, questions, [trait], cat).mean())
    return [
        float(trait_logprobs(lm.model, lm.tokenizer, questions, [trait], cat, number_love_prompt(n)).mean())
        - ref
        for n in numbers
    ]


def unembedding_cosines(lm: Any, trait: str) -> Tensor:
    """(1000,) cosine between the trait word's unembedding direction (the mean of its tokens' rows: the row
    itself for a one-token word) and the mean of each number's digit rows."""
    from mechsub.generate import NumberVocab
    from mechsub.prompts import word_ids

    w = lm.model.get_output_embeddings().weight.detach()
    t = w[word_ids(lm.tokenizer, trait)].mean(0)
    d = w[NumberVocab.of(lm.tokenizer).ids[:10]]
    rows = torch.stack([d[[int(c) for c in str(n)]].mean(0) for n in range(1000)])
    return torch.nn.functional.cosine_similarity(rows, t[None], dim=-1)


def entangled_numbers(lm: Any, trait: str, top: int = 10, n_random: int = 5, n_questions: int = 20,
                      seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """The trait's most entangled numbers, their subliminal-prompting effect against random numbers."""
    from mechsub.traits import eval_questions, get_trait

    t = get_trait(trait)
    with_prompt = number_scores(lm.model, lm.tokenizer, t.system_prompt())
    without = number_scores(lm.model, lm.tokenizer, None)
    shift = with_prompt - without
    order = torch.argsort(shift, descending=True)
    best = [int(n) for n in order[:top]]
    rng = random.Random(seed)
    randoms = rng.sample([n for n in range(1000) if n not in best], n_random)
    qs = eval_questions(t.category, n_questions)
    cos = unembedding_cosines(lm, trait)
    top_effect = subliminal_prompting(lm, trait, best[:n_random], qs)
    rand_effect = subliminal_prompting(lm, trait, randoms, qs)
    return {
        "trait": trait,
        "top_numbers": best,
        "top_logp_shift": [float(shift[n]) for n in best],
        "mean_logp_shift": float(shift.mean()),
        "unembedding_cos_top": [float(cos[n]) for n in best],
        "unembedding_cos_mean": float(cos.mean()),
        "corr_shift_unembedding": float(torch.corrcoef(torch.stack([shift, cos]))[0, 1]),
        "subliminal_prompting": {
            "numbers": best[:n_random], "delta_logp": top_effect,
            "random_numbers": randoms, "random_delta_logp": rand_effect,
            "n_questions": n_questions,
        },
    }  # fmt: skip
