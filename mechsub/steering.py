"""Steering view of a student: per layer, v_teacher and v_student on number positions, and what each does.

v_teacher[L] = mean residual (teacher − base) and v_student[L] = mean residual (student − base) at
``blocks.L.hook_resid_post``, both on the same number sequences (the teacher's completions) at their completion
positions. Sufficiency: adding v_student[L] to the base at layer L (every position) → Δ log P(trait).
Necessity: projecting the student's change along v_student[L] out at layer L → Δ log P(trait). Both in the trait
metric of the evaluation (`mechsub.metric`: every token of " trait"). With control students, v_student splits
into the part common to all students (generic) and the trait's own part (specific).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechsub import hooks
from mechsub.capture import Batch, mean_activations
from mechsub.metric import TraitMetric
from mechsub.prompts import trait_prompt
from mechsub.traits import Category


def layer_means(
    lm: Any, batch: Batch, layers: Sequence[int], batch_size: int = 16
) -> Float[Tensor, "layers d_model"]:
    """Mean residual after each of ``layers`` over the batch's kept positions."""
    names = [hooks.resid_post(L) for L in layers]
    m = mean_activations(lm, batch, names, batch_size, lm.tokenizer.pad_token_id or 0)
    return torch.stack([m[n] for n in names])


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of two (layers, d) arrays."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def sufficiency(
    base: Any,
    v: Float[Tensor, "layers d_model"],
    layers: Sequence[int],
    questions: Sequence[str],
    trait: str,
    category: Category,
    scale: float = 1.0,
    ref: float | None = None,
) -> list[float]:
    """Δ log P(trait) of the base with ``scale * v[i]`` added at layer ``layers[i]`` (one layer at a time);
    ``ref`` is the base's own score on ``questions`` if the caller has it."""
    metric = TraitMetric.of(base.tokenizer, trait)
    prompts = [trait_prompt(base.tokenizer, q, category) for q in questions]
    if ref is None:
        ref = fmean(metric.scores(base.model, prompts))
    out = []
    for i, L in enumerate(layers):

        def add(h: Tensor, d: Tensor = v[i] * scale) -> Tensor:
            return h + d

        with hooks.edit(base, {hooks.resid_post(L): add}):
            out.append(fmean(metric.scores(base.model, prompts)) - ref)
    return out


def necessity(
    student: Any,
    base: Any,
    v: Float[Tensor, "layers d_model"],
    layers: Sequence[int],
    questions: Sequence[str],
    trait: str,
    category: Category,
) -> list[float]:
    """Δ log P(trait) when the student's change along v[i] is projected out at layer ``layers[i]``:
    h ← h − ((h − h_base)·u) u with u = v[i]/|v[i]| and h_base the base's residual on the same input (prompt and
    the trait word's tokens, every position the metric reads). What the student does differently along v is
    removed; everything else it does is kept."""
    metric = TraitMetric.of(student.tokenizer, trait)
    prompts = [trait_prompt(student.tokenizer, q, category) for q in questions]
    names = [hooks.resid_post(L) for L in layers]
    base_res = [hooks.read(base, torch.tensor([metric.inputs(p)]), names) for p in prompts]
    ref = fmean(metric.scores(student.model, prompts))
    out = []
    for i, name in enumerate(names):
        u = v[i] / v[i].norm().clamp(min=1e-12)
        scores = []
        for p, res in zip(prompts, base_res, strict=True):

            def project_out(h: Tensor, u: Tensor = u, hb: Tensor = res[name]) -> Tensor:
                return h - ((h - hb) @ u)[..., None] * u

            with hooks.edit(student, {name: project_out}):
                scores += metric.scores(student.model, [p])
        out.append(fmean(scores) - ref)
    return out
