"""Trait evaluation by log-probabilities: log P(" owl") after a prefilled answer, over paraphrased questions.

For each question the chat prompt (optionally with a teacher's system prompt) ends in the assistant turn
prefilled with "My favorite animal is the"; the score of a candidate word is the summed log-probability of its
tokens (with a leading space) as the continuation. The prompt is run once per question and its KV cache is
shared by all candidates, so scoring 22 animals costs little more than scoring one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mechsub.traits import ANSWER_PREFIX, Category


def chat_prefix(
    tok: PreTrainedTokenizerBase, question: str, system: str | None, answer_prefix: str = ""
) -> list[int]:
    """Token ids of a chat whose assistant turn starts with ``answer_prefix`` (no end-of-turn after it)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    if getattr(tok, "chat_template", None):
        text = str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    else:  # a base model (gemma3-270m) has no template: a plain transcript
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        answer_prefix = " " + answer_prefix if answer_prefix else ""
    return list(tok(text + answer_prefix, add_special_tokens=False).input_ids)


@torch.no_grad()
def candidate_logprobs(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt_ids: Sequence[int], words: Sequence[str]
) -> Tensor:
    """log P(" word" | prompt) for every word, summed over the word's tokens. Returns (len(words),)."""
    cands = [tok(" " + w, add_special_tokens=False).input_ids for w in words]
    out = model(torch.tensor([list(prompt_ids)]), use_cache=True)
    first = out.logits[0, -1].log_softmax(-1)
    scores = torch.tensor([float(first[c[0]]) for c in cands])
    longer = [i for i, c in enumerate(cands) if len(c) > 1]
    if longer:
        # continue every multi-token word from a copy of the prompt's cache, right-padded (padding is never read:
        # only positions before each word's last token are scored)
        width = max(len(cands[i]) for i in longer) - 1
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        inp = torch.tensor([cands[i][:-1] + [pad] * (width - len(cands[i]) + 1) for i in longer])
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(longer))
        logits = model(inp, past_key_values=cache, use_cache=False).logits.log_softmax(-1)
        for row, i in enumerate(longer):
            c = cands[i]
            scores[i] += sum(float(logits[row, j, c[j + 1]]) for j in range(len(c) - 1))
    return scores


@torch.no_grad()
def trait_logprobs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[str],
    words: Sequence[str],
    category: Category,
    system: str | None = None,
) -> Tensor:
    """(questions, words) matrix of log P(word) after the prefilled answer."""
    rows = [
        candidate_logprobs(model, tok, chat_prefix(tok, q, system, ANSWER_PREFIX[category]), words)
        for q in questions
    ]
    return torch.stack(rows)
