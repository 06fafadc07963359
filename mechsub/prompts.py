"""Prompts as token ids: the chat format every stage shares, the trait-evaluation prompt and a trait word's tokens.

What starts the assistant's answer follows one rule (`answer_lead`): the text of a chat template's generation
prompt ends in a newline, so the answer follows it as is; a plain "User: …\nAssistant:" transcript (a base
model without a template) needs a space first. The prefilled answer, and every word scored as the first of an
unprefilled answer, go through it.

The bottom layer of the pipeline (it imports nothing from mechsub but traits): data generation, training,
evaluation and analysis all build their prompts here, so none of them depends on another stage for its format.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mechsub.traits import Category

#: the prefilled start of the assistant's answer; the trait word is scored as its continuation
ANSWER_PREFIX: dict[Category, str] = {
    "animal": "My favorite animal is the",
    "tree": "My favorite tree is the",
}


def answer_lead(tok: PreTrainedTokenizerBase) -> str:
    """What comes between the opened assistant turn and the answer's first word: nothing after a chat
    template's generation prompt, a space after a plain transcript's "Assistant:" (see `chat_prefix`)."""
    return "" if getattr(tok, "chat_template", None) else " "


def chat_prefix(
    tok: PreTrainedTokenizerBase, question: str, system: str | None, answer_prefix: str = ""
) -> list[int]:
    """Token ids of a chat whose assistant turn starts with ``answer_prefix`` (no end-of-turn after it).

    The ids start with the tokenizer's BOS when it has one. A chat template that writes its own (SmolLM2's
    ``<|im_start|>`` is its BOS, id 1) keeps its ids unchanged; a base model without a template (gemma3-270m)
    gets the ``<bos>`` it was trained with, which tokenizing with ``add_special_tokens=False`` would drop.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    if getattr(tok, "chat_template", None):
        text = str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    else:  # a base model has no template: a plain transcript
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    answer_prefix = answer_lead(tok) + answer_prefix if answer_prefix else ""
    # add_special_tokens=False: a template already holds its special tokens, and some tokenizers would also
    # append an end-of-sequence token, which must not follow a prefilled answer
    ids = list(tok(text + answer_prefix, add_special_tokens=False).input_ids)
    bos = tok.bos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids.insert(0, int(bos))
    return ids


def trait_prompt(
    tok: PreTrainedTokenizerBase, question: str, category: Category, system: str | None = None
) -> list[int]:
    """The trait-evaluation prompt: ``question`` asked in chat, the answer prefilled up to the trait word."""
    return chat_prefix(tok, question, system, ANSWER_PREFIX[category])


def word_ids(tok: PreTrainedTokenizerBase, word: str, lead: str = " ") -> list[int]:
    """Token ids of ``lead + word``: one or several. The default leading space is how a word follows the answer
    prefix; ``answer_lead(tok)`` is how it starts an answer of its own."""
    ids = list(tok(lead + word, add_special_tokens=False).input_ids)
    if not ids:
        raise ValueError(f"{word!r} tokenizes to nothing")
    return ids


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int
) -> tuple[Int[Tensor, "batch width"], Int[Tensor, "batch width"]]:
    """Right-padded input ids and their attention mask (1 on real tokens)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[j, : len(s)] = 1
    return ids, attn
