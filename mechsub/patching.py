"""Activation patching on the trait-evaluation prompt: where in the student does the trait shift live?

One generic loop (TransformerLens style): a setter (`hooks.patch`) writes a source model's residual into a
target model at ``blocks.{L}.hook_resid_post`` (all positions, or one), and the metric is the evaluation's
(`mechsub.metric`: log P of every token of " trait"), on one forward over the prompt and the word's tokens. The
result per site is the fraction of the student − base gap it recovers. Attribution patching (gradient ×
activation difference) is the linear estimate of the same numbers from one forward and backward pass.
Positions count from the end of the prompt (-1: the last token of the answer prefix); patching "all positions"
includes the positions of the word's own tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechsub import hooks
from mechsub.metric import TraitMetric
from mechsub.prompts import trait_prompt
from mechsub.stats import bootstrap_ratio_ci95
from mechsub.traits import Category


def _score(lm: Any, metric: TraitMetric, prompt: list[int]) -> float:
    with torch.no_grad():
        return float(metric.score(hooks.module_of(lm), prompt))


def patch_scan(
    target: Any, source: Any, tok: Any, questions: Sequence[str], trait: str, category: Category,
    layers: Sequence[int], positions: Sequence[int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """log P(trait) of ``target`` with ``source``'s residual patched in, per layer (all positions) and, if
    ``positions`` (negative: from the end of the prompt) are given, per (layer, position). Means over questions."""
    metric = TraitMetric.of(tok, trait)
    names = [hooks.resid_post(L) for L in layers]
    base_lp, src_lp = [], []
    per_q = torch.zeros(len(questions), len(layers))  # patched log P per question (the intervals need them)
    by_pos = torch.zeros(len(layers), len(positions or []))
    for qi, q in enumerate(questions):
        prompt = trait_prompt(tok, q, category)
        with hooks.capture(source, names) as src:
            src_lp.append(_score(source, metric, prompt))
        base_lp.append(_score(target, metric, prompt))
        for i, name in enumerate(names):
            with hooks.edit(target, {name: hooks.patch(src[name])}):
                per_q[qi, i] = _score(target, metric, prompt)
            for j, p in enumerate(positions or []):
                with hooks.edit(target, {name: hooks.patch(src[name], [len(prompt) + p])}):
                    by_pos[i, j] += _score(target, metric, prompt)
    n = len(questions)
    by_layer = per_q.sum(0)
    b, s = sum(base_lp) / n, sum(src_lp) / n
    gap = s - b
    return {
        "metric": metric.info(),
        "target_logp": b,
        "source_logp": s,
        "gap": gap,
        "layers": list(layers),
        "positions": list(positions or []),
        "patched_logp_by_layer": (by_layer / n).tolist(),
        "fraction_by_layer": ((by_layer / n - b) / gap).tolist() if gap else None,
        "fraction_by_layer_ci95": [
            bootstrap_ratio_ci95(per_q[:, i].numpy() - np.asarray(base_lp), np.subtract(src_lp, base_lp))
            for i in range(len(layers))
        ]
        if gap
        else None,
        "fraction_by_layer_position": ((by_pos / n - b) / gap).tolist() if gap and positions else None,
    }


def _grads(
    lm: Any, metric: TraitMetric, prompt: list[int], names: Sequence[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """({name: activation (1, pos, d)}, {name: d score / d activation}, score) from one forward and backward."""
    with torch.enable_grad(), hooks.capture(lm, names, detach=False) as acts:
        lp = metric.score(hooks.module_of(lm), prompt)
    # autograd.grad, not backward: no parameter gradient is accumulated on the model
    grads = torch.autograd.grad(lp, [acts[n] for n in names])
    return {n: acts[n].detach() for n in names}, dict(zip(names, grads, strict=True)), float(lp.detach())


def attribution_scan(
    base: Any,
    student: Any,
    tok: Any,
    questions: Sequence[str],
    trait: str,
    category: Category,
    layers: Sequence[int],
) -> Float[Tensor, "layers positions"]:
    """Linear estimate of patching the student into the base: grad_base log P(trait) · (student − base)
    residual per (layer, position), the mean over questions aligned at their last position (prompts differ in
    length). The forward includes the word's tokens but its last: the last len(word tokens) − 1 columns are the
    word's own positions, the columns before them the prompt's, counted from its end."""
    metric = TraitMetric.of(tok, trait)
    names = [hooks.resid_post(L) for L in layers]
    est: Tensor | None = None
    for q in questions:
        prompt = trait_prompt(tok, q, category)
        src = hooks.read(student, torch.tensor([metric.inputs(prompt)]), names)
        acts, grads, _ = _grads(base, metric, prompt, names)
        rows = torch.stack([((src[n] - acts[n]) * grads[n])[0].sum(-1) for n in names])
        est = rows if est is None else _align(est, rows)
    assert est is not None
    return est / len(questions)


def _align(acc: Tensor, new: Tensor) -> Tensor:
    """Add (layers, positions) arrays aligned at their last position (prompts differ in length)."""
    w = min(acc.shape[1], new.shape[1])
    return acc[:, -w:] + new[:, -w:]


def feature_patch_scan(
    base: Any, student: Any, sae: Any, layer: int, questions: Sequence[str], rank_questions: Sequence[str],
    trait: str, category: Category, lists: dict[str, Sequence[int]], ks: Sequence[int] = (1, 5, 10, 20, 50),
    n_random: int = 5, seed: int = 0, from_position: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """Per SAE feature, on the trait-evaluation prompt at ``blocks.{layer}.hook_resid_post``.

    With f = SAE encoding, the student's change in a feature set S is δ_S = (f_student − f_base)[:, S] @ W_dec[S]
    (every position; the SAE's reconstruction error stays the model's own). Patch: base + δ_S → the fraction of
    the student − base gap in log P(trait) it recovers; ablate: student − δ_S → the fraction it removes. Feature
    sets: the top k of each ranked list in ``lists`` (e.g. the number-prompt feature list), the top k by
    attribution (Σ_pos δ_i · ∇ log P) ranked on ``rank_questions`` (disjoint from ``questions``, so the ranking
    is not fitted to the evaluation), ``n_random`` random sets of k features active in either model, and all
    features at once. Positions before ``from_position`` are left alone (position 0 is the attention sink, whose
    residual is far outside what an SAE is trained on)."""
    tok = base.tokenizer
    metric = TraitMetric.of(tok, trait)
    name = hooks.resid_post(layer)
    w_dec = sae.W_dec.detach()

    def change(prompt: list[int]) -> tuple[Tensor, Tensor, float, float]:
        """(pos, d_sae) student − base feature activations, the base's gradient, both models' log P(trait)."""
        acts, grads, b_lp = _grads(base, metric, prompt, [name])  # one base pass: residual, gradient, log P
        with hooks.capture(student, [name]) as res:
            s_lp = _score(student, metric, prompt)
        with torch.no_grad():
            df = sae.encode(res[name][0]) - sae.encode(acts[name][0])
        df[:from_position] = 0
        return df, grads[name][0], b_lp, s_lp

    attr = torch.zeros(w_dec.shape[0])
    for q in rank_questions:
        df, g, _, _ = change(trait_prompt(tok, q, category))
        attr += (df * (g @ w_dec.T)).sum(0)
    ranked = dict(lists)
    ranked["attribution"] = torch.argsort(attr, descending=True).tolist()
    rng = torch.Generator().manual_seed(seed)
    sets: dict[str, list[list[int]]] = {key: [list(r[:k]) for k in ks] for key, r in ranked.items()}

    b_q, s_q = [], []  # per question: base and student log P(trait)
    prompts = [trait_prompt(tok, q, category) for q in questions]
    cached = []
    active = torch.zeros(w_dec.shape[0], dtype=torch.bool)
    for prompt in prompts:
        df, _, b_lp, s_lp = change(prompt)
        active |= (df != 0).any(0)
        cached.append(df)
        b_q.append(b_lp)
        s_q.append(s_lp)
    base_q, student_q = np.asarray(b_q), np.asarray(s_q)
    base_lp, student_lp = float(base_q.mean()), float(student_q.mean())
    pool = active.nonzero().flatten()
    sets["random"] = [
        pool[torch.randperm(len(pool), generator=rng)[:k]].tolist() for k in ks for _ in range(n_random)
    ]
    sets["all"] = [pool.tolist()]

    def score(lm: Any, sign: float, feats: list[int]) -> np.ndarray:
        """Per question: log P(trait) with ``sign`` × the student's change in ``feats`` added."""
        out = []
        for prompt, df in zip(prompts, cached, strict=True):
            delta = sign * df[:, feats] @ w_dec[feats]

            def add(h: Tensor, d: Tensor = delta) -> Tensor:
                return h + d

            with hooks.edit(lm, {name: add}):
                out.append(_score(lm, metric, prompt))
        return np.asarray(out)

    gap = student_lp - base_lp
    out: dict[str, Any] = {"layer": layer, "metric": metric.info(), "ks": list(ks), "gap": gap,
                           "base_logp": base_lp, "student_logp": student_lp, "n_active": len(pool),
                           "n_random": n_random, "top_attribution": ranked["attribution"][:20]}  # fmt: skip
    for set_name, fsets in sets.items():
        # per set, per question: what the patch adds to the base, what the ablation takes from the student
        gained = [score(base, 1.0, s) - base_q for s in fsets]
        removed = [student_q - score(student, -1.0, s) for s in fsets]
        if set_name == "random":  # the mean over the draws of each k, question by question
            gained = [np.mean(gained[i * n_random : (i + 1) * n_random], 0) for i in range(len(ks))]
            removed = [np.mean(removed[i * n_random : (i + 1) * n_random], 0) for i in range(len(ks))]
        gap_q = student_q - base_q
        out[set_name] = {
            "patch_fraction": [float(g.mean() / gap) if gap else float("nan") for g in gained],
            "ablate_fraction": [float(r.mean() / gap) if gap else float("nan") for r in removed],
            "patch_fraction_ci95": [bootstrap_ratio_ci95(g, gap_q) for g in gained],
            "ablate_fraction_ci95": [bootstrap_ratio_ci95(r, gap_q) for r in removed],
        }
    return out
