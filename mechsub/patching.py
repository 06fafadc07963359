"""Activation patching on the trait-evaluation prompt: where in the student does the trait shift live?

One generic loop (TransformerLens style): a setter (`hooks.patch`) writes a source model's residual into a
target model at ``blocks.{L}.hook_resid_post``, and the metric is the evaluation's (`mechsub.metric`: log P of
every token of " trait"), on one forward over the prompt and the word's tokens. The result per site is the
fraction of the student − base gap it recovers. Attribution patching (gradient × activation difference) is the
linear estimate of the same numbers from one forward and backward pass.

One position policy for every scan (`hooks.FIRST_POSITION`): "all positions" means positions ≥ 1, in exact,
attribution and feature patching alike, and position 0 (the attention sink) is a row of its own
(``*_position0``). So residual and feature patching compare like with like. Positions otherwise count from the
end of the prompt (-1: the last token of the answer prefix); "all positions" includes the word's own tokens.

Changed outputs (the keys are kept): ``fraction_by_layer`` and ``attribution_by_layer`` no longer include position
0 (they did before, while `feature_patch_scan` left it out); `attribution_scan` returns an `Attribution` (every
question's own positions, aligned at the end without truncation) instead of a truncated mean; the feature scan's
``random`` is now ``n_random`` (default 50) draws, and every ranked list also gets ``random_matched``: as many
random features from the same firing-frequency deciles, summarised as a distribution with the real value's rank
and empirical p.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats as st
from torch import Tensor

from mechsub import hooks
from mechsub.hooks import FIRST_POSITION
from mechsub.metric import TraitMetric
from mechsub.prompts import trait_prompt
from mechsub.stats import bootstrap_ratio_ci95, random_control
from mechsub.traits import Category

#: the sink's positions, patched alone on their own row
SINK = list(range(FIRST_POSITION))


def _score(lm: Any, metric: TraitMetric, prompt: list[int]) -> float:
    with torch.no_grad():
        return float(metric.score(hooks.module_of(lm), prompt))


def _fractions(patched: Tensor, base: Sequence[float], src: Sequence[float]) -> dict[str, Any]:
    """From (questions, layers) patched scores: the mean patched score, the fraction of the mean gap recovered and
    its bootstrap interval over questions, per layer."""
    b, s = np.asarray(base), np.asarray(src)
    gap = float(s.mean() - b.mean())
    mean = patched.mean(0)
    return {
        "logp": mean.tolist(),
        "fraction": ((mean - b.mean()) / gap).tolist() if gap else None,
        "ci95": [bootstrap_ratio_ci95(patched[:, i].numpy() - b, s - b) for i in range(patched.shape[1])]
        if gap
        else None,
    }


def patch_scan(
    target: Any, source: Any, tok: Any, questions: Sequence[str], trait: str, category: Category,
    layers: Sequence[int], positions: Sequence[int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """log P(trait) of ``target`` with ``source``'s residual patched in, per layer at every position ≥
    `FIRST_POSITION` (``*_by_layer``) and at position 0 alone (``*_by_layer_position0``), and, if ``positions``
    (negative: from the end of the prompt) are given, per (layer, position). Means over questions; the
    per-question scores are kept (``*_by_question``) for correlations with other estimates."""
    metric = TraitMetric.of(tok, trait)
    names = [hooks.resid_post(L) for L in layers]
    base_lp, src_lp = [], []
    per_q = torch.zeros(len(questions), len(layers))  # patched log P per question (the intervals need them)
    per_q0 = torch.zeros(len(questions), len(layers))  # the same, position 0 alone
    by_pos = torch.zeros(len(layers), len(positions or []))
    for qi, q in enumerate(questions):
        prompt = trait_prompt(tok, q, category)
        sink = [p for p in positions or [] if len(prompt) + p < FIRST_POSITION]
        if sink:
            raise ValueError(f"positions {sink} reach position 0 of a {len(prompt)}-token prompt: the sink is "
                             "patched on its own row, give positions closer to the end")  # fmt: skip
        with hooks.capture(source, names) as src:
            src_lp.append(_score(source, metric, prompt))
        base_lp.append(_score(target, metric, prompt))
        for i, name in enumerate(names):
            with hooks.edit(target, {name: hooks.after_sink(hooks.patch(src[name]))}):
                per_q[qi, i] = _score(target, metric, prompt)
            with hooks.edit(target, {name: hooks.patch(src[name], SINK)}):
                per_q0[qi, i] = _score(target, metric, prompt)
            for j, p in enumerate(positions or []):
                with hooks.edit(target, {name: hooks.patch(src[name], [len(prompt) + p])}):
                    by_pos[i, j] += _score(target, metric, prompt)
    n = len(questions)
    b, s = sum(base_lp) / n, sum(src_lp) / n
    gap = s - b
    rest, sink0 = _fractions(per_q, base_lp, src_lp), _fractions(per_q0, base_lp, src_lp)
    return {
        "metric": metric.info(),
        "first_position": FIRST_POSITION,
        "target_logp": b,
        "source_logp": s,
        "gap": gap,
        "layers": list(layers),
        "positions": list(positions or []),
        "patched_logp_by_layer": rest["logp"],
        "fraction_by_layer": rest["fraction"],
        "fraction_by_layer_ci95": rest["ci95"],
        "patched_logp_by_layer_position0": sink0["logp"],
        "fraction_by_layer_position0": sink0["fraction"],
        "fraction_by_layer_position0_ci95": sink0["ci95"],
        "fraction_by_layer_position": ((by_pos / n - b) / gap).tolist() if gap and positions else None,
        "target_logp_by_question": list(base_lp),
        "source_logp_by_question": list(src_lp),
        "patched_logp_by_question": per_q.tolist(),  # (questions, layers), positions ≥ FIRST_POSITION
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


@dataclass(frozen=True)
class Attribution:
    """Attribution patching of the student into the base, per question on its own positions: grad_base
    log P(trait) · (student − base) residual, summed over d_model, per (layer, position) of the scoring forward
    (the prompt and the word's tokens but its last: the last ``n_word`` positions are the word's). Prompts differ
    in length; nothing is truncated: position-wise means align them at their ends and average, per position, over
    the questions that have it."""

    per_question: tuple[Float[Tensor, "layers positions"], ...]
    layers: tuple[int, ...]
    n_word: int

    @property
    def by_question_layer(self) -> Float[Tensor, "questions layers"]:
        """The estimate of patching every position ≥ `FIRST_POSITION` (`patch_scan`'s ``*_by_layer``)."""
        return torch.stack([r[:, FIRST_POSITION:].sum(1) for r in self.per_question])

    @property
    def by_question_layer_position0(self) -> Float[Tensor, "questions layers"]:
        """The estimate of patching position 0 alone (`patch_scan`'s ``*_by_layer_position0``)."""
        return torch.stack([r[:, :FIRST_POSITION].sum(1) for r in self.per_question])

    def aligned(self) -> Float[Tensor, "questions layers width"]:
        """Every question's positions aligned at the last one, NaN where a shorter forward has none."""
        width = max(r.shape[1] for r in self.per_question)
        out = torch.full((len(self.per_question), len(self.layers), width), float("nan"))
        for i, r in enumerate(self.per_question):
            out[i, :, width - r.shape[1] :] = r
        return out

    def prompt_positions(self, n: int) -> Float[Tensor, "layers n"]:
        """The mean over questions at the prompt's last ``n`` positions (-n … -1 from its end, as `patch_scan`'s
        ``positions``), the word's positions after them left out."""
        grid = self.aligned()
        end = grid.shape[2] - self.n_word
        return grid[:, :, end - n : end].nanmean(0)


def attribution_scan(
    base: Any,
    student: Any,
    tok: Any,
    questions: Sequence[str],
    trait: str,
    category: Category,
    layers: Sequence[int],
) -> Attribution:
    """Linear estimate of patching the student into the base, question by question: `Attribution`."""
    metric = TraitMetric.of(tok, trait)
    names = [hooks.resid_post(L) for L in layers]
    rows = []
    for q in questions:
        prompt = trait_prompt(tok, q, category)
        src = hooks.read(student, torch.tensor([metric.inputs(prompt)]), names)
        acts, grads, _ = _grads(base, metric, prompt, names)
        rows.append(torch.stack([((src[n] - acts[n]) * grads[n])[0].sum(-1) for n in names]))
    return Attribution(tuple(rows), tuple(layers), len(metric.ids) - 1)


def frequency_bins(freq: np.ndarray) -> np.ndarray:
    """Per feature, its firing-frequency bin: 0 if it never fires, else its decile (1 … 10) among the features
    that fire (ties share the higher decile)."""
    f = np.asarray(freq, dtype=float)
    bins = np.zeros(f.size, dtype=int)
    on = f > 0
    if on.any():
        bins[on] = np.ceil(st.rankdata(f[on], method="max") / on.sum() * 10).astype(int)
    return bins


def matched_draw(real: Sequence[int], bins: np.ndarray, rng: np.random.Generator) -> list[int]:
    """As many random features as ``real``, each from the bin of its counterpart (`frequency_bins`), none of
    ``real`` and no repeats; when a bin runs out, from the nearest bin that has one left."""
    members = {int(b): np.flatnonzero(bins == b) for b in np.unique(bins)}
    taken = np.asarray(list(real), dtype=int)
    out: list[int] = []
    for i in real:
        b = int(bins[i])
        for c in sorted(members, key=lambda c: (abs(c - b), c)):
            free = members[c][~np.isin(members[c], taken)]
            if free.size:
                j = int(rng.choice(free))
                out.append(j)
                taken = np.append(taken, j)
                break
        else:
            raise ValueError(f"no feature left to match {len(real)} features (only {bins.size} in all)")
    return out


def feature_patch_scan(
    base: Any, student: Any, sae: Any, layer: int, questions: Sequence[str], rank_questions: Sequence[str],
    trait: str, category: Category, lists: dict[str, Sequence[int]], ks: Sequence[int] = (1, 5, 10, 20, 50),
    n_random: int = 50, seed: int = 0, from_position: int = FIRST_POSITION,
) -> dict[str, Any]:  # fmt: skip
    """Per SAE feature, on the trait-evaluation prompt at ``blocks.{layer}.hook_resid_post``.

    With f = SAE encoding, the student's change in a feature set S is δ_S = (f_student − f_base)[:, S] @ W_dec[S]
    (at positions ≥ ``from_position``: `patch_scan`'s policy; the SAE's reconstruction error stays the model's
    own). Patch: base + δ_S → the fraction of the student − base gap in log P(trait) it recovers; ablate:
    student − δ_S → the fraction it removes. Feature sets: the top k of each ranked list in ``lists`` (e.g. the
    number-prompt feature list), the top k by attribution (Σ_pos δ_i · ∇ log P) ranked on ``rank_questions``
    (disjoint from ``questions``, so the ranking is not fitted to the evaluation), ``n_random`` random sets of k
    features active in either model (``random``), and all features at once (``all``; ``all_position0``: their
    change at the positions before ``from_position`` alone, the attention sink, whose residual is far outside what
    an SAE is trained on).

    Each ranked set also gets ``random_matched``: ``n_random`` draws of as many random features, each from the
    firing-frequency decile of its counterpart (frequency: the share of positions ≥ ``from_position`` of the
    evaluation prompts where it fires, base and student together), patched at the same positions; per k the
    draws' mean and 2.5/97.5 percentiles, and the real set's rank and empirical p among them (None for a set of
    more than half the features: no disjoint control exists)."""
    tok = base.tokenizer
    metric = TraitMetric.of(tok, trait)
    name = hooks.resid_post(layer)
    w_dec = sae.W_dec.detach()

    def rng(set_name: str, k: int) -> np.random.Generator:
        """The draws for one (set, k), from the seed alone: the same whatever else the scan computes."""
        return np.random.default_rng([seed, zlib.crc32(set_name.encode()), k])

    def change(prompt: list[int]) -> tuple[Tensor, Tensor, Tensor, float, float]:
        """(pos, d_sae) student − base feature activations, how often each fires (positions ≥ from_position, both
        models), the base's gradient, both models' log P(trait)."""
        acts, grads, b_lp = _grads(base, metric, prompt, [name])  # one base pass: residual, gradient, log P
        with hooks.capture(student, [name]) as res:
            s_lp = _score(student, metric, prompt)
        with torch.no_grad():
            f_s, f_b = sae.encode(res[name][0]), sae.encode(acts[name][0])
        fires = (f_s[from_position:] > 0).float().sum(0) + (f_b[from_position:] > 0).float().sum(0)
        return f_s - f_b, fires, grads[name][0], b_lp, s_lp

    attr = torch.zeros(w_dec.shape[0])
    for q in rank_questions:
        df, _, g, _, _ = change(trait_prompt(tok, q, category))
        df[:from_position] = 0
        attr += (df * (g @ w_dec.T)).sum(0)
    ranked = dict(lists)
    ranked["attribution"] = torch.argsort(attr, descending=True).tolist()
    sets: dict[str, list[list[int]]] = {key: [list(r[:k]) for k in ks] for key, r in ranked.items()}

    b_q, s_q = [], []  # per question: base and student log P(trait)
    prompts = [trait_prompt(tok, q, category) for q in questions]
    cached, cached0 = [], []  # per question: the change at positions ≥ from_position, and before it
    active = torch.zeros(w_dec.shape[0], dtype=torch.bool)
    fires, n_pos = torch.zeros(w_dec.shape[0]), 0
    for prompt in prompts:
        df, f, _, b_lp, s_lp = change(prompt)
        df0 = torch.zeros_like(df)
        df0[:from_position], df[:from_position] = df[:from_position], 0
        active |= (df != 0).any(0)
        cached.append(df)
        cached0.append(df0)
        fires += f
        n_pos += 2 * (len(metric.inputs(prompt)) - from_position)
        b_q.append(b_lp)
        s_q.append(s_lp)
    base_q, student_q = np.asarray(b_q), np.asarray(s_q)
    base_lp, student_lp = float(base_q.mean()), float(student_q.mean())
    gap = student_lp - base_lp
    gap_q = student_q - base_q
    pool = active.nonzero().flatten()
    bins = frequency_bins((fires / max(n_pos, 1)).numpy())
    sets["random"] = []
    for k in ks:
        gen = rng("random", k)
        sets["random"] += [
            pool[torch.from_numpy(gen.permutation(len(pool))[:k])].tolist() for _ in range(n_random)
        ]
    sets["all"] = [pool.tolist()]

    def score(lm: Any, sign: float, feats: list[int], deltas: list[Tensor]) -> np.ndarray:
        """Per question: log P(trait) with ``sign`` × the student's change in ``feats`` added."""
        out = []
        for prompt, df in zip(prompts, deltas, strict=True):
            delta = sign * df[:, feats] @ w_dec[feats]

            def add(h: Tensor, d: Tensor = delta) -> Tensor:
                return h + d

            with hooks.edit(lm, {name: add}):
                out.append(_score(lm, metric, prompt))
        return np.asarray(out)

    memo: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    def effects(feats: list[int], deltas: list[Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per question: what patching ``feats`` adds to the base, what ablating them takes from the student
        (their change in ``deltas``, default: at positions ≥ from_position; a set met twice is scored once)."""
        key = tuple(sorted(feats))
        if deltas is None and key in memo:
            return memo[key]
        d = cached if deltas is None else deltas
        got = score(base, 1.0, feats, d) - base_q, student_q - score(student, -1.0, feats, d)
        if deltas is None:
            memo[key] = got
        return got

    def frac(x: np.ndarray) -> float:
        return float(x.mean() / gap) if gap else float("nan")

    def report(gained: list[np.ndarray], removed: list[np.ndarray]) -> dict[str, Any]:
        return {
            "patch_fraction": [frac(g) for g in gained],
            "ablate_fraction": [frac(r) for r in removed],
            "patch_fraction_ci95": [bootstrap_ratio_ci95(g, gap_q) for g in gained],
            "ablate_fraction_ci95": [bootstrap_ratio_ci95(r, gap_q) for r in removed],
        }

    out: dict[str, Any] = {"layer": layer, "metric": metric.info(), "ks": list(ks), "gap": gap,
                           "base_logp": base_lp, "student_logp": student_lp, "n_active": len(pool),
                           "n_random": n_random, "first_position": from_position,
                           "top_attribution": ranked["attribution"][:20]}  # fmt: skip
    for set_name, fsets in sets.items():
        gained, removed = (list(x) for x in zip(*(effects(s) for s in fsets), strict=True))
        if set_name == "random":  # per k: the mean over the draws question by question, and the draws' spread
            per_k = [range(i * n_random, (i + 1) * n_random) for i in range(len(ks))]
            draws = {key: [[frac(x[j]) for j in r] for r in per_k] for key, x in
                     (("patch_fraction", gained), ("ablate_fraction", removed))}  # fmt: skip
            gained = [np.mean([gained[j] for j in r], 0) for r in per_k]
            removed = [np.mean([removed[j] for j in r], 0) for r in per_k]
            out[set_name] = report(gained, removed) | {
                f"{key}_p2_5_p97_5": [np.percentile(d, [2.5, 97.5]).tolist() for d in ds]
                for key, ds in draws.items()
            }
            continue
        out[set_name] = report(gained, removed)
        if set_name == "all":
            continue
        matched: dict[str, list[list[float]]] = {"patch_fraction": [], "ablate_fraction": []}
        for k, real in zip(ks, fsets, strict=True):
            # None: fewer features outside the set than in it (e.g. every feature), so no disjoint control
            ok, gen = 2 * len(set(real)) <= len(bins), rng(set_name, k)
            got = [effects(matched_draw(real, bins, gen)) for _ in range(n_random if ok else 0)]
            matched["patch_fraction"].append([frac(g) for g, _ in got])
            matched["ablate_fraction"].append([frac(r) for _, r in got])
        out[set_name]["random_matched"] = {
            key: [random_control(v, d) if d else None for v, d in zip(out[set_name][key], ds, strict=True)]
            for key, ds in matched.items()
        }
    if from_position:
        g0, r0 = effects(list(range(w_dec.shape[0])), cached0)
        out["all_position0"] = report([g0], [r0])
    return out
