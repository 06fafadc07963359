"""The one trait metric: log P(" word" | prompt), the summed log-probability of every token of the word.

Evaluation, steering, patching and attribution all report this quantity. Two ways to compute it, equal up to
float rounding: `score_words` scores many candidate words from one shared prompt KV cache (evaluation);
`TraitMetric.score` runs the prompt and the word's tokens in one forward, so an edit that depends on positions
sees every position the score reads, and gradients flow to any activation of that forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mechsub.prompts import word_ids


@dataclass(frozen=True)
class TraitMetric:
    """log P(" word" | prompt) summed over the word's tokens; it records them for metrics.json."""

    word: str
    ids: tuple[int, ...]  # the tokens of lead + word (" word" after the answer prefix)
    tokens: tuple[str, ...]  # each token decoded (" ot", "ter"), for readers of metrics.json

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase, word: str, lead: str = " ") -> TraitMetric:
        """The metric of ``lead + word``: a leading space after the prefilled answer (the default), or
        ``prompts.answer_lead(tok)`` for a word that starts the answer itself ("Owl" in a chat template)."""
        ids = word_ids(tok, word, lead)
        return cls(word, tuple(ids), tuple(str(tok.decode([i])) for i in ids))

    def info(self) -> dict[str, Any]:
        return {"word": self.word, "token_ids": list(self.ids), "tokens": list(self.tokens)}

    def inputs(self, prompt: Sequence[int]) -> list[int]:
        """The forward that scores the word: the prompt and every token of the word but the last."""
        return [*prompt, *self.ids[:-1]]

    def from_logits(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        """The score from the logits of a forward over `inputs` (its last len(ids) positions predict the word)."""
        k = len(self.ids)
        lp = logits[:, -k:].log_softmax(-1)
        target = torch.tensor(self.ids, device=lp.device).expand(lp.shape[0], k)
        return lp.gather(-1, target[..., None])[..., 0].sum(-1)

    def score_rows(self, model: Any, rows: Sequence[Sequence[int]]) -> Float[Tensor, " rows"]:
        """The score of each row (a prompt's `inputs`) from one forward over the rows right-padded; differentiable
        when grad is enabled. A pad after a row's last token is never attended to by its real positions (causal
        attention), and positions count from 0 as in a forward of the row alone: each row's score is the one it
        has alone, up to float rounding (one row: the same forward). Only the positions that predict the word go
        through the head (a fifth of SmolLM2's compute per token)."""
        dev, k, width = next(model.parameters()).device, len(self.ids), max(len(r) for r in rows)
        ids = torch.tensor([[*r, *[r[-1]] * (width - len(r))] for r in rows], device=dev)
        keep = torch.tensor([[len(r) - k + j for j in range(k)] for r in rows], device=dev)
        return self.from_logits(model(input_ids=ids, logits_to_keep=keep).logits)

    def score(self, model: Any, prompt: Sequence[int]) -> Float[Tensor, ""]:
        """The score of ``model`` after ``prompt``, one forward (`score_rows` of one row)."""
        return self.score_rows(model, [self.inputs(prompt)])[0]

    @torch.no_grad()
    def scores(self, model: Any, prompts: Sequence[Sequence[int]]) -> list[float]:
        """The score after each prompt."""
        return [float(self.score(model, p)) for p in prompts]


@torch.no_grad()
def score_words(model: Any, prompt: Sequence[int], metrics: Sequence[TraitMetric]) -> Float[Tensor, " words"]:
    """The score of every word after one prompt, the prompt run once (`score_prompts` of one prompt).

    Each multi-token word continues from a copy of the prompt's KV cache. An edit active around this call
    applies to both forwards, each seeing only its own positions: edits that depend on positions need
    `TraitMetric.score`.
    """
    return score_prompts(model, [prompt], metrics)[0]


@torch.no_grad()
def score_prompts(
    model: Any, prompts: Sequence[Sequence[int]], metrics: Sequence[TraitMetric], batch_size: int = 16
) -> Float[Tensor, "prompts words"]:
    """The score of every word after each prompt: prompts run in left-padded batches (explicit attention mask and
    position ids, so a padded prompt scores as it does alone), the head applied at the last position only; the
    multi-token words continue, all at once, from copies of the batch's KV cache."""
    longer = [i for i, m in enumerate(metrics) if len(m.ids) > 1]
    width = max((len(metrics[i].ids) for i in longer), default=1) - 1
    first_ids = [m.ids[0] for m in metrics]
    out_rows = []
    dev = getattr(model, "device", torch.device("cpu"))
    for s in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[s : s + batch_size]]
        n, length = len(chunk), max(map(len, chunk))
        ids = torch.zeros(n, length, dtype=torch.long)
        attn = torch.zeros(n, length, dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, length - len(p) :] = torch.tensor(p)
            attn[j, length - len(p) :] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        out = model(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=bool(longer), logits_to_keep=1
        )
        scores = out.logits[:, -1].float().log_softmax(-1)[:, first_ids].clone()
        if longer:
            k = len(longer)
            # right-padded with token 0: padding comes after every scored position, and attention is causal
            cont = torch.tensor(
                [list(metrics[i].ids[:-1]) + [0] * (width + 1 - len(metrics[i].ids)) for i in longer],
                device=dev,
            )
            cache = out.past_key_values
            cache.batch_repeat_interleave(k)  # rows: prompt-major, (prompt 0, word 0), (prompt 0, word 1), …
            lp = (
                model(
                    input_ids=cont.repeat(n, 1),
                    attention_mask=torch.cat(
                        [
                            attn.repeat_interleave(k, 0),
                            torch.ones(n * k, width, dtype=torch.long, device=dev),
                        ],
                        1,
                    ),
                    position_ids=attn.sum(1).repeat_interleave(k)[:, None]
                    + torch.arange(width, device=dev)[None],
                    past_key_values=cache,
                    use_cache=False,
                )
                .logits.float()
                .log_softmax(-1)
            )
            for r, i in enumerate(longer):
                rest = torch.tensor(metrics[i].ids[1:], device=dev)
                steps = torch.arange(len(rest), device=dev)
                scores[:, i] += lp[r::k][:, steps, rest].sum(-1)
        out_rows.append(scores.cpu())
    return torch.cat(out_rows)
