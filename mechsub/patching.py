"""Activation patching on the trait-evaluation prompt: where in the student does the trait shift live?

One generic loop (TransformerLens style): a setter that writes a source model's residual into a target model at
``blocks.{L}.hook_resid_post`` (all positions, or one), and a metric, log P(first token of " trait") after the
prefilled answer. The result per site is the fraction of the student − base gap it recovers. Attribution patching
(gradient × activation difference) is the linear estimate of the same numbers from one forward and backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mechsub.stats import bootstrap_ratio_ci95
from mechsub.steering import edit_resid


def _layers(model: Any) -> Any:
    return model.get_decoder().layers


def resid_all(model: Any, ids: Tensor) -> tuple[list[Tensor], Tensor]:
    """Residual after every layer, [(1, pos, d)] * n_layers, and the final log-probs at the last position."""
    outs: list[Tensor] = []
    handles = [
        layer.register_forward_hook(
            lambda _m, _i, o: outs.append((o[0] if isinstance(o, tuple) else o).detach())
        )
        for layer in _layers(model)
    ]
    try:
        with torch.no_grad():
            lp = model(ids).logits[0, -1].log_softmax(-1)
    finally:
        for h in handles:
            h.remove()
    return outs, lp


def target_token(tok: Any, trait: str) -> int:
    return int(tok(" " + trait, add_special_tokens=False).input_ids[0])


def prompt_ids(tok: Any, question: str, category: Any) -> Tensor:
    from mechsub.evaluate import chat_prefix
    from mechsub.traits import ANSWER_PREFIX

    return torch.tensor([chat_prefix(tok, question, None, ANSWER_PREFIX[category])])


def patch_scan(
    target: Any, source: Any, tok: Any, questions: Sequence[str], trait: str, category: Any,
    layers: Sequence[int], positions: Sequence[int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """log P(trait) of ``target`` with ``source``'s residual patched in, per layer (all positions) and, if
    ``positions`` (negative = from the end) are given, per (layer, position). Means over questions."""
    t_id = target_token(tok, trait)
    base_lp, src_lp = [], []
    per_q = torch.zeros(len(questions), len(layers))  # patched log P per question (the intervals need them)
    by_pos = torch.zeros(len(layers), len(positions or []))
    for qi, q in enumerate(questions):
        ids = prompt_ids(tok, q, category)
        src_res, s_lp = resid_all(source.model, ids)
        _, t_lp = resid_all(target.model, ids)
        base_lp.append(float(t_lp[t_id]))
        src_lp.append(float(s_lp[t_id]))
        for i, L in enumerate(layers):

            def whole(h: Tensor, r: Tensor = src_res[L]) -> Tensor:
                return r

            with torch.no_grad(), edit_resid(target.model, L, whole):
                per_q[qi, i] = float(target.model(ids).logits[0, -1].log_softmax(-1)[t_id])
            for j, p in enumerate(positions or []):

                def one(h: Tensor, r: Tensor = src_res[L], p: int = p) -> Tensor:
                    h = h.clone()
                    h[:, p] = r[:, p]
                    return h

                with torch.no_grad(), edit_resid(target.model, L, one):
                    by_pos[i, j] += float(target.model(ids).logits[0, -1].log_softmax(-1)[t_id])
    n = len(questions)
    by_layer = per_q.sum(0)
    b, s = sum(base_lp) / n, sum(src_lp) / n
    gap = s - b
    return {
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


def attribution_scan(
    base: Any,
    student: Any,
    tok: Any,
    questions: Sequence[str],
    trait: str,
    category: Any,
    layers: Sequence[int],
) -> Tensor:
    """Linear estimate of patching the student into the base: (layers, positions from the end) of
    grad_base log P(trait) · (student − base) residual, summed over questions with the same prompt length
    alignment (positions counted from the end of the prompt). Returns the mean over questions."""
    t_id = target_token(tok, trait)
    est: Tensor | None = None
    for q in questions:
        ids = prompt_ids(tok, q, category)
        src_res, _ = resid_all(student.model, ids)
        outs: list[Tensor] = []

        def keep(_m: Any, _i: Any, o: Any, outs: list[Tensor] = outs) -> None:
            h = o[0] if isinstance(o, tuple) else o
            h.retain_grad()
            outs.append(h)

        handles = [layer.register_forward_hook(keep) for layer in _layers(base.model)]
        try:
            with torch.enable_grad():
                lp = base.model(ids).logits[0, -1].log_softmax(-1)[t_id]
                lp.backward()
        finally:
            for h in handles:
                h.remove()
        rows = torch.stack([((src_res[L] - outs[L].detach()) * _grad(outs[L]))[0].sum(-1) for L in layers])
        base.model.zero_grad(set_to_none=True)
        width = rows.shape[1]
        est = rows if est is None else _align(est, rows, width)
    assert est is not None
    return est / len(questions)


def _grad(t: Tensor) -> Tensor:
    if t.grad is None:
        raise RuntimeError("no gradient reached the residual: is the model frozen by torch.no_grad?")
    return t.grad


def _align(acc: Tensor, new: Tensor, _width: int) -> Tensor:
    """Add (layers, positions) arrays aligned at their last position (prompts differ in length)."""
    w = min(acc.shape[1], new.shape[1])
    return acc[:, -w:] + new[:, -w:]


def _grad_at(model: Any, ids: Tensor, layer: int, t_id: int) -> tuple[Tensor, Tensor, float]:
    """(residual after ``layer``, d log P(t_id at the last position) / d that residual, each (pos, d); log P)."""
    kept: list[Tensor] = []

    def leaf(h: Tensor) -> Tensor:
        h = h.detach().requires_grad_(True)
        kept.append(h)
        return h

    with torch.enable_grad(), edit_resid(model, layer, leaf):
        lp = model(ids).logits[0, -1].log_softmax(-1)[t_id]
        lp.backward()
    model.zero_grad(set_to_none=True)
    return kept[0].detach()[0], _grad(kept[0])[0], float(lp)


def feature_patch_scan(
    base: Any, student: Any, sae: Any, layer: int, questions: Sequence[str], rank_questions: Sequence[str],
    trait: str, category: Any, lists: dict[str, Sequence[int]], ks: Sequence[int] = (1, 5, 10, 20, 50),
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
    t_id = target_token(tok, trait)
    w_dec = sae.W_dec.detach()

    def change(ids: Tensor) -> tuple[Tensor, Tensor, float, float]:
        """(pos, d_sae) student − base feature activations, the base's gradient, both models' log P(trait)."""
        hb, g, b_lp = _grad_at(base.model, ids, layer, t_id)  # one base pass: residual, gradient and log P
        res, s_lp = resid_all(student.model, ids)
        with torch.no_grad():
            df = sae.encode(res[layer][0]) - sae.encode(hb)
        df[:from_position] = 0
        return df, g, b_lp, float(s_lp[t_id])

    attr = torch.zeros(w_dec.shape[0])
    for q in rank_questions:
        df, g, _, _ = change(prompt_ids(tok, q, category))
        attr += (df * (g @ w_dec.T)).sum(0)
    ranked = dict(lists)
    ranked["attribution"] = torch.argsort(attr, descending=True).tolist()
    rng = torch.Generator().manual_seed(seed)
    sets: dict[str, list[list[int]]] = {name: [list(r[:k]) for k in ks] for name, r in ranked.items()}

    b_q, s_q = [], []  # per question: base and student log P(trait)
    prompts = [prompt_ids(tok, q, category) for q in questions]
    cached = []
    active = torch.zeros(w_dec.shape[0], dtype=torch.bool)
    for ids in prompts:
        df, _, b_lp, s_lp = change(ids)
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

    def score(model: Any, sign: float, feats: list[int]) -> np.ndarray:
        """Per question: log P(trait) with ``sign`` × the student's change in ``feats`` added."""
        out = []
        for ids, df in zip(prompts, cached, strict=True):
            delta = sign * df[:, feats] @ w_dec[feats]

            def add(h: Tensor, d: Tensor = delta) -> Tensor:
                return h + d

            with torch.no_grad(), edit_resid(model, layer, add):
                out.append(float(model(ids).logits[0, -1].log_softmax(-1)[t_id]))
        return np.asarray(out)

    gap = student_lp - base_lp
    out: dict[str, Any] = {"layer": layer, "ks": list(ks), "gap": gap, "base_logp": base_lp,
                           "student_logp": student_lp, "n_active": len(pool), "n_random": n_random,
                           "top_attribution": ranked["attribution"][:20]}  # fmt: skip
    for name, fsets in sets.items():
        # per set, per question: what the patch adds to the base, what the ablation takes from the student
        gained = [score(base.model, 1.0, s) - base_q for s in fsets]
        removed = [student_q - score(student.model, -1.0, s) for s in fsets]
        if name == "random":  # the mean over the draws of each k, question by question
            gained = [np.mean(gained[i * n_random : (i + 1) * n_random], 0) for i in range(len(ks))]
            removed = [np.mean(removed[i * n_random : (i + 1) * n_random], 0) for i in range(len(ks))]
        gap_q = student_q - base_q
        out[name] = {
            "patch_fraction": [float(g.mean() / gap) if gap else float("nan") for g in gained],
            "ablate_fraction": [float(r.mean() / gap) if gap else float("nan") for r in removed],
            "patch_fraction_ci95": [bootstrap_ratio_ci95(g, gap_q) for g in gained],
            "ablate_fraction_ci95": [bootstrap_ratio_ci95(r, gap_q) for r in removed],
        }
    return out
