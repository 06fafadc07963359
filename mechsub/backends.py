"""Number data through vLLM (``DataConfig.backend="vllm"``): a GPU engine samples, mechsub scores.

vLLM draws the completions under the same number grammar as :func:`mechsub.generate.generate_numbers` (the
13-token vocabulary as ``allowed_token_ids``, the list grammar as a regex, :func:`number_regex`); the teacher's
per-position log-probs that distillation needs are then recomputed here by one teacher-forced forward of the
mechsub model (:func:`score_numbers`), with the grammar's masks replayed, so a shard holds what the mechsub
backend would have stored for the same tokens. The draws themselves differ from mechsub's for a seed (another
sampler), which is why ``backend`` is part of a data run's identity. The filter runs afterwards as always.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mechsub.device import need
from mechsub.generate import (
    SEP_UNKNOWN,
    Generation,
    NumberVocab,
    grammar_mask,
    next_state,
)
from mechsub.prompts import pad_right

MAX_NUMBERS, MAX_DIGITS = 10, 3
#: the longest list the grammar allows, in tokens, end of turn included: 10 numbers of 3 digits and 9 ", "
LONGEST = MAX_NUMBERS * (MAX_DIGITS + 2) - 2 + 1


def number_regex(max_numbers: int = MAX_NUMBERS, max_digits: int = MAX_DIGITS) -> str:
    """The completions :func:`mechsub.generate.grammar_mask` allows, as a regex (end of turn excluded): 1 to
    ``max_numbers`` numbers of 1 to ``max_digits`` digits, one separator kind throughout (", ", "," or " ")."""
    d = f"[0-9]{{1,{max_digits}}}"
    rest = f"{{0,{max_numbers - 1}}}"
    return f"{d}(?:(?:, {d}){rest}|(?:,{d}){rest}|(?: {d}){rest})"


def _choices(vocab: NumberVocab, tokens: Sequence[int], n_rows: int) -> list[int]:
    """Indices into the 13-token vocabulary of a completion's tokens, then the end (``n_rows`` in all)."""
    index = {int(t): j for j, t in enumerate(vocab.ids.tolist())}
    out = [index.get(int(t), vocab.end) for t in tokens] + [vocab.end]
    return out[:n_rows]


@torch.no_grad()
def score_numbers(
    model: Any,
    prompts: Sequence[Sequence[int]],
    tokens: Sequence[Sequence[int]],
    vocab: NumberVocab,
    *,
    max_new_tokens: int = 50,
    constrained: bool = True,
    top_k: int = 0,
    pad_id: int = 0,
) -> Generation:
    """The :class:`Generation` that :func:`generate_numbers` would have returned had it drawn ``tokens`` (eos
    excluded) after ``prompts``: the per-position log-probs over the 13 number tokens (grammar-masked when
    ``constrained``) and, with ``top_k``, the full-vocabulary top-k, from one teacher-forced forward.

    A completion shorter than ``max_new_tokens`` ended by choice (its last row is the step that chose the end);
    one of ``max_new_tokens`` tokens was cut by the cap (no such row), as in ``generate_numbers``.
    """
    dev = model.device
    seqs = [list(p) + list(t) for p, t in zip(prompts, tokens, strict=True)]
    ids, attn = pad_right(seqs, pad_id)
    hidden = model.model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).last_hidden_state
    n_rows = [len(t) + 1 if len(t) < max_new_tokens else len(t) for t in tokens]
    width = max(n_rows)
    # hidden state at the position that predicts each completion step (clamped past a row's end: unused)
    cols = torch.tensor(
        [
            [min(len(p) - 1 + s, len(seq) - 1) for s in range(width)]
            for p, seq in zip(prompts, seqs, strict=True)
        ],
        device=dev,
    )
    h = hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))  # (b, width, d_model)
    out_emb = model.get_output_embeddings()
    logits = (h @ out_emb.weight[vocab.ids.to(dev)].T).float()
    if getattr(out_emb, "bias", None) is not None:
        logits = logits + out_emb.bias[vocab.ids.to(dev)]
    if constrained:
        b = len(tokens)
        choice = torch.tensor(
            [_choices(vocab, t, n) + [vocab.end] * (width - n) for t, n in zip(tokens, n_rows, strict=True)],
            device=dev,
        )
        digits = torch.zeros(b, dtype=torch.long, device=dev)
        count = torch.zeros_like(digits)
        last = torch.full_like(digits, -1)
        sep = torch.full_like(digits, SEP_UNKNOWN)
        masks = []
        for s in range(width):
            masks.append(grammar_mask(digits, count, last, sep, remaining=max_new_tokens - s))
            digits, count, last, sep = next_state(choice[:, s], digits, count, last, sep)
        logits = logits.masked_fill(~torch.stack(masks, 1), float("-inf"))
    logp = logits.log_softmax(-1).cpu()
    allowed = [logp[i, :n] for i, n in enumerate(n_rows)]
    if not top_k:
        return Generation([list(t) for t in tokens], allowed)
    tk = out_emb(h).float().log_softmax(-1).topk(top_k, dim=-1)
    values, indices = tk.values.cpu(), tk.indices.cpu()
    return Generation(
        [list(t) for t in tokens],
        allowed,
        [values[i, :n] for i, n in enumerate(n_rows)],
        [indices[i, :n] for i, n in enumerate(n_rows)],
    )


def check_vllm_config(constrained: bool, max_new_tokens: int) -> str | None:
    """Why a data config cannot use the vLLM backend (None: it can). The regex cannot see the token budget that
    :func:`grammar_mask` keeps, so the cap must fit the longest list the grammar allows."""
    if constrained and max_new_tokens < LONGEST:
        return (
            f"max_new_tokens: backend=vllm with constrained decoding needs ≥ {LONGEST} (the longest list the "
            f"grammar allows, end of turn included), got {max_new_tokens}"
        )
    return None


_ENGINES: dict[tuple[str, str], Any] = {}


def _engine_folder(lm: Any) -> Path:
    """A folder vLLM can read: the model's own, or for a LoRA checkpoint its merged weights, saved once."""
    if lm.base is None:
        return Path(lm.path)
    from mechsub.models import MANIFEST, cache_root, save_checkpoint

    folder = cache_root() / "merged" / lm.sha256[:16]
    if not (folder / MANIFEST).is_file():
        save_checkpoint(lm, folder, {"merged_from": str(lm.path), "base": None})
    return folder


def vllm_numbers(
    lm: Any, prompts: Sequence[Sequence[int]], vocab: NumberVocab, cfg: Any, seed: int
) -> Generation:
    """One batch of number completions drawn by vLLM under the data config ``cfg``, scored by :func:`score_numbers`."""
    vllm = need("vllm", "vllm", "backend='vllm'")
    constrained = cfg.decoding == "constrained"
    folder = str(_engine_folder(lm))
    dtype = str(lm.dtype).removeprefix("torch.")
    if (folder, dtype) not in _ENGINES:
        # the mechsub model stays on the GPU beside the engine (it scores the draws): leave it room
        _ENGINES[folder, dtype] = vllm.LLM(
            model=folder, dtype=dtype, seed=cfg.seed, gpu_memory_utilization=0.5
        )
    llm = _ENGINES[folder, dtype]
    eos = int(vocab.ids[vocab.end])
    extra: dict[str, Any] = {}
    if constrained:
        from vllm.sampling_params import StructuredOutputsParams

        extra = {
            "allowed_token_ids": vocab.ids.tolist(),
            "structured_outputs": StructuredOutputsParams(regex=number_regex()),
        }
    params = [
        vllm.SamplingParams(
            temperature=0.0 if cfg.greedy else cfg.temperature,
            max_tokens=cfg.max_new_tokens,
            seed=seed + j,
            stop_token_ids=[eos],
            **extra,
        )
        for j in range(len(prompts))
    ]
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    tokens = [[t for t in o.outputs[0].token_ids if t != eos] for o in outs]
    return score_numbers(
        lm.model, prompts, tokens, vocab, max_new_tokens=cfg.max_new_tokens, constrained=constrained,
        top_k=cfg.top_k, pad_id=lm.tokenizer.pad_token_id or 0,
    )  # fmt: skip


def regex_accepts(text: str) -> bool:
    """Whether ``text`` (a completion without the end of turn) is in :func:`number_regex`'s language."""
    return re.fullmatch(number_regex(), text) is not None
