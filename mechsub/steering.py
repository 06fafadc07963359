"""Steering view of a student: per layer, v_teacher and v_student on number positions, and what each does.

v_teacher[L] = mean residual (teacher − base) and v_student[L] = mean residual (student − base) at
``blocks.L.hook_resid_post``, both on the same number sequences (the teacher's completions) at their completion
positions. Sufficiency: adding v_student[L] to the base at layer L (every position) → Δ log P(trait).
Necessity: projecting the student's change along v_student[L] out at layer L → Δ log P(trait). With control
students, v_student splits into the part common to all students (generic) and the trait's own part (specific).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from mechsub.capture import Batch, mean_activations


@contextmanager
def edit_resid(model: Any, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the output of decoder layer ``layer`` (= ``blocks.{layer}.hook_resid_post``) by ``fn(output)``.

    A forward hook on the Hugging Face module, removed on exit whatever happens.
    """
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers

    def hook(_mod: Any, _inp: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def resid_hooks(layers: Sequence[int]) -> list[str]:
    return [f"blocks.{L}.hook_resid_post" for L in layers]


def layer_means(lm: Any, batch: Batch, layers: Sequence[int], batch_size: int = 16) -> Tensor:
    """(layers, d_model) mean residual over the batch's kept positions."""
    tl = lm.tl()
    pad = lm.tokenizer.pad_token_id or 0
    m = mean_activations(tl, batch, resid_hooks(layers), batch_size, pad)
    del tl
    return torch.stack([m[h] for h in resid_hooks(layers)])


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of two (layers, d) arrays."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def trait_score(model: Any, tok: Any, questions: Sequence[str], trait: str, category: Any) -> float:
    """Mean log P(trait) after the prefilled answer (the evaluation metric, on ``questions``)."""
    from mechsub.evaluate import trait_logprobs

    return float(trait_logprobs(model, tok, questions, [trait], category).mean())


def sufficiency(
    base: Any,
    v: Tensor,
    layers: Sequence[int],
    questions: Sequence[str],
    trait: str,
    category: Any,
    scale: float = 1.0,
    ref: float | None = None,
) -> list[float]:
    """Δ log P(trait) of the base with ``scale * v[i]`` added at layer ``layers[i]`` (one layer at a time);
    ``ref`` is the base's own score on ``questions`` if the caller has it."""
    if ref is None:
        ref = trait_score(base.model, base.tokenizer, questions, trait, category)
    out = []
    for i, L in enumerate(layers):

        def add(h: Tensor, d: Tensor = v[i] * scale) -> Tensor:
            return h + d

        with edit_resid(base.model, L, add):
            out.append(trait_score(base.model, base.tokenizer, questions, trait, category) - ref)
    return out


def necessity(
    student: Any,
    base: Any,
    v: Tensor,
    layers: Sequence[int],
    questions: Sequence[str],
    trait: str,
    category: Any,
) -> list[float]:
    """Δ log P(first token of the trait) when the student's change along v[i] is projected out at layer
    ``layers[i]``: h ← h − ((h − h_base)·u) u with u = v[i]/|v[i]| and h_base the base's residual on the same
    prompt. What the student does differently along v is removed; everything else it does is kept."""
    from mechsub.patching import prompt_ids, resid_all, target_token

    t_id = target_token(student.tokenizer, trait)
    out = []
    prompts = [prompt_ids(student.tokenizer, q, category) for q in questions]
    base_res = [resid_all(base.model, ids)[0] for ids in prompts]
    ref = sum(float(resid_all(student.model, ids)[1][t_id]) for ids in prompts) / len(prompts)
    for i, L in enumerate(layers):
        u = v[i] / v[i].norm().clamp(min=1e-12)
        total = 0.0
        for ids, res in zip(prompts, base_res, strict=True):

            def project_out(h: Tensor, u: Tensor = u, hb: Tensor = res[L]) -> Tensor:
                return h - ((h - hb) @ u)[..., None] * u

            with torch.no_grad(), edit_resid(student.model, L, project_out):
                total += float(student.model(ids).logits[0, -1].log_softmax(-1)[t_id])
        out.append(total / len(prompts) - ref)
    return out
