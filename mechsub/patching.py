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
    layers: Sequence[int], positions: Sequence[int] | None = None, batch: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """log P(trait) of ``target`` with ``source``'s residual patched in, per layer at every position ≥
    `FIRST_POSITION` (``*_by_layer``) and at position 0 alone (``*_by_layer_position0``), and, if ``positions``
    (negative: from the end of the prompt) are given, per (layer, position). Means over questions; the
    per-question scores are kept (``*_by_question``) for correlations with other estimates. ``batch`` > 1 runs
    that many questions per forward (`TraitMetric.score_rows`; with ``positions``, which count from each prompt's own
    end, one question per forward)."""
    metric = TraitMetric.of(tok, trait)
    names = [hooks.resid_post(L) for L in layers]
    prompts = [trait_prompt(tok, q, category) for q in questions]
    for prompt in prompts:
        sink = [p for p in positions or [] if len(prompt) + p < FIRST_POSITION]
        if sink:
            raise ValueError(f"positions {sink} reach position 0 of a {len(prompt)}-token prompt: the sink is "
                             "patched on its own row, give positions closer to the end")  # fmt: skip
    base_lp, src_lp = [0.0] * len(prompts), [0.0] * len(prompts)
    per_q = torch.zeros(len(questions), len(layers))  # patched log P per question (the intervals need them)
    per_q0 = torch.zeros(len(questions), len(layers))  # the same, position 0 alone
    by_pos = torch.zeros(len(layers), len(positions or []))
    for chunk in _chunks([len(p) for p in prompts], 1 if positions else batch):
        rows = [metric.inputs(prompts[i]) for i in chunk]

        def score(lm: Any, rows: list[list[int]] = rows) -> Tensor:
            with torch.no_grad():
                return metric.score_rows(hooks.module_of(lm), rows).float().cpu()

        with hooks.capture(source, names) as src:
            s_lp = score(source)
        b_lp = score(target)
        for j, i in enumerate(chunk):
            src_lp[i], base_lp[i] = float(s_lp[j]), float(b_lp[j])
        for i, name in enumerate(names):
            with hooks.edit(target, {name: hooks.after_sink(hooks.patch(src[name]))}):
                per_q[chunk, i] = score(target)
            with hooks.edit(target, {name: hooks.patch(src[name], SINK)}):
                per_q0[chunk, i] = score(target)
            for j, p in enumerate(positions or []):  # one question per forward here
                with hooks.edit(target, {name: hooks.patch(src[name], [len(prompts[chunk[0]]) + p])}):
                    by_pos[i, j] += float(score(target)[0])
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


def _chunks(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices in chunks of at most ``size``, by length (rows of one forward pad to the longest)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + max(size, 1)] for i in range(0, len(order), max(size, 1))]


def _edited_scores(
    lm: Any, metric: TraitMetric, rows: Sequence[Sequence[int]], name: str, delta: Any, batch: int
) -> np.ndarray:
    """log P(trait) per row with ``delta(i)`` ((len(row i), d_model)) added to the activation at ``name``, in
    forwards of ``batch`` rows."""
    out = np.empty(len(rows))
    for chunk in _chunks([len(r) for r in rows], batch):
        ds = [delta(i) for i in chunk]
        add = torch.zeros(len(chunk), max(len(rows[i]) for i in chunk), ds[0].shape[-1], dtype=ds[0].dtype)
        for j, d in enumerate(ds):
            add[j, : d.shape[0]] = d

        def edit(h: Tensor, a: Tensor = add) -> Tensor:
            return h + a.to(h.device, h.dtype)

        with torch.no_grad(), hooks.edit(lm, {name: edit}):
            out[chunk] = (
                metric.score_rows(hooks.module_of(lm), [rows[i] for i in chunk]).float().cpu().numpy()
            )
    return out


def _grads_rows(
    lm: Any, metric: TraitMetric, prompts: Sequence[list[int]], names: Sequence[str]
) -> list[tuple[dict[str, Tensor], dict[str, Tensor], float]]:
    """`_grads` of several prompts from one forward and backward over their rows right-padded (`TraitMetric.score_rows`;
    a row's score reads only its own positions, so the gradient of the sum is each row's own): per prompt
    ({name: activation (1, pos, d)}, {name: d score / d activation}, score), its own positions only."""
    rows = [metric.inputs(p) for p in prompts]

    def leaf(h: Tensor) -> Tensor:
        return h if h.requires_grad else h.requires_grad_()

    with (
        torch.enable_grad(),
        hooks.edit(lm, dict.fromkeys(names, leaf)),
        hooks.capture(lm, names, detach=False) as acts,
    ):
        lp = metric.score_rows(hooks.module_of(lm), rows)
    grads = torch.autograd.grad(lp.sum(), [acts[n] for n in names])
    return [({n: acts[n][i : i + 1, : len(r)].detach() for n in names},
             {n: g[i : i + 1, : len(r)] for n, g in zip(names, grads, strict=True)}, float(lp[i].detach()))
            for i, r in enumerate(rows)]  # fmt: skip


def _grads(
    lm: Any, metric: TraitMetric, prompt: list[int], names: Sequence[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """({name: activation (1, pos, d)}, {name: d score / d activation}, score) from one forward and backward
    (`_grads_rows` of one prompt)."""
    return _grads_rows(lm, metric, [prompt], names)[0]


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


def deciles(x: np.ndarray) -> np.ndarray:
    """Per value, its decile (1 … 10) among all of ``x``; ties share the higher decile."""
    v = np.asarray(x, dtype=float)
    return np.ceil(st.rankdata(v, method="max") / v.size * 10).astype(int)


def frequency_bins(freq: np.ndarray) -> np.ndarray:
    """Per feature, its firing-frequency bin: 0 if it never fires, else its decile (1 … 10) among the features
    that fire (ties share the higher decile)."""
    f = np.asarray(freq, dtype=float)
    bins = np.zeros(f.size, dtype=int)
    on = f > 0
    if on.any():
        bins[on] = deciles(f[on])
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
    n_random: int = 50, seed: int = 0, from_position: int = FIRST_POSITION, ablate: bool = True,
    plain_random: bool = True, error: bool = False, keep_draws: bool = False, batch: int = 1,
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
    more than half the features: no disjoint control exists).

    Options (their defaults keep the outputs above): ``ablate=False`` leaves the ablate direction out (no
    ``ablate_*`` keys; half the forwards), ``plain_random=False`` the ``random`` sets; ``error=True`` adds
    ``all_error``: every feature's change plus the change in the SAE's reconstruction error (x − decode(f)), i.e.
    the whole residual change at positions ≥ ``from_position``, which `patch_scan`'s row must equal up to float
    error (the decomposition's check); ``keep_draws=True`` keeps each matched control's draws (``draws``) for
    pooling over runs; ``batch`` > 1 runs that many (set, question) rows per forward (`TraitMetric.score_rows`: the same
    numbers up to float rounding, several times faster on a CPU; 1: one forward per question, as before)."""
    tok = base.tokenizer
    metric = TraitMetric.of(tok, trait)
    name = hooks.resid_post(layer)
    w_dec = sae.W_dec.detach()

    def rng(set_name: str, k: int) -> np.random.Generator:
        """The draws for one (set, k), from the seed alone: the same whatever else the scan computes."""
        return np.random.default_rng([seed, zlib.crc32(set_name.encode()), k])

    def changes(prompts: list[list[int]]) -> list[tuple[Tensor, Tensor, Tensor, float, float, Tensor | None]]:
        """Per prompt: (pos, d_sae) student − base feature activations, how often each fires (positions ≥
        from_position, both models), the base's gradient, both models' log P(trait), and (with ``error``) the
        (pos, d_model) change in the SAE's reconstruction error; ``batch`` prompts per forward."""
        out: list[Any] = [None] * len(prompts)
        for chunk in _chunks([len(p) for p in prompts], batch):
            # one base pass: residual, gradient, log P
            got = _grads_rows(base, metric, [prompts[i] for i in chunk], [name])
            rows = [metric.inputs(prompts[i]) for i in chunk]
            with torch.no_grad(), hooks.capture(student, [name]) as res:
                s_lps = metric.score_rows(hooks.module_of(student), rows)
            for j, i in enumerate(chunk):
                acts, grads, b_lp = got[j]
                with torch.no_grad():
                    x_s, x_b = res[name][j, : len(rows[j])], acts[name][0]
                    f_s, f_b = sae.encode(x_s), sae.encode(x_b)
                    d_err = (x_s - sae.decode(f_s)) - (x_b - sae.decode(f_b)) if error else None
                fires = (f_s[from_position:] > 0).float().sum(0) + (f_b[from_position:] > 0).float().sum(0)
                out[i] = (f_s - f_b, fires, grads[name][0], b_lp, float(s_lps[j]), d_err)
        return out

    attr = torch.zeros(w_dec.shape[0])
    for df, _, g, _, _, _ in changes([trait_prompt(tok, q, category) for q in rank_questions]):
        df[:from_position] = 0
        attr += (df * (g @ w_dec.T)).sum(0)
    ranked = dict(lists)
    ranked["attribution"] = torch.argsort(attr, descending=True).tolist()
    sets: dict[str, list[list[int]]] = {key: [list(r[:k]) for k in ks] for key, r in ranked.items()}

    b_q, s_q = [], []  # per question: base and student log P(trait)
    prompts = [trait_prompt(tok, q, category) for q in questions]
    inputs = [metric.inputs(p) for p in prompts]
    cached, cached0 = [], []  # per question: the change at positions ≥ from_position, and before it
    # per question, with ``error``: the change in the SAE's reconstruction error, at positions ≥ from_position
    errs: list[Tensor] = []
    active = torch.zeros(w_dec.shape[0], dtype=torch.bool)
    fires, n_pos = torch.zeros(w_dec.shape[0]), 0
    for prompt, (df, f, _, b_lp, s_lp, d_err) in zip(prompts, changes(prompts), strict=True):
        if d_err is not None:
            d_err[:from_position] = 0
            errs.append(d_err)
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
    if plain_random:
        sets["random"] = []
        for k in ks:
            gen = rng("random", k)
            sets["random"] += [
                pool[torch.from_numpy(gen.permutation(len(pool))[:k])].tolist() for _ in range(n_random)
            ]
    sets["all"] = [pool.tolist()]

    def score(
        lm: Any, sign: float, fsets: list[list[int]], deltas: list[Tensor], extra: list[Tensor] | None
    ) -> np.ndarray:
        """(sets, questions): log P(trait) with ``sign`` × the student's change in each set (plus ``extra``, a
        residual-space change per question) added; every (set, question) a row."""
        nq = len(inputs)

        def delta(r: int) -> Tensor:
            feats, i = fsets[r // nq], r % nq
            d = sign * deltas[i][:, feats] @ w_dec[feats]
            return d + sign * extra[i] if extra is not None else d

        rows = [inputs[r % nq] for r in range(len(fsets) * nq)]
        return _edited_scores(lm, metric, rows, name, delta, batch).reshape(len(fsets), nq)

    memo: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray | None]] = {}

    def effects(
        fsets: list[list[int]], deltas: list[Tensor] | None = None, extra: list[Tensor] | None = None
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per set, per question: what patching it adds to the base, what ablating it takes from the student
        (None without ``ablate``; its change in ``deltas``, default: at positions ≥ from_position, plus
        ``extra``; a set met twice is scored once)."""
        keys = [tuple(sorted(f)) for f in fsets]
        plain = deltas is None and extra is None
        known = memo if plain else {}
        new = list({key: f for key, f in zip(keys, fsets, strict=True) if key not in known}.items())
        if new:
            d, todo = cached if deltas is None else deltas, [f for _, f in new]
            gained = score(base, 1.0, todo, d, extra) - base_q
            removed = student_q - score(student, -1.0, todo, d, extra) if ablate else None
            for j, (key, _) in enumerate(new):
                known[key] = (gained[j], removed[j] if removed is not None else None)
        return [known[key] for key in keys]

    def frac(x: np.ndarray) -> float:
        return float(x.mean() / gap) if gap else float("nan")

    directions = ("patch_fraction", "ablate_fraction") if ablate else ("patch_fraction",)

    def report(gained: list[np.ndarray], removed: list[np.ndarray | None]) -> dict[str, Any]:
        out = {"patch_fraction": [frac(g) for g in gained],
               "patch_fraction_ci95": [bootstrap_ratio_ci95(g, gap_q) for g in gained]}  # fmt: skip
        if ablate:
            out |= {"ablate_fraction": [frac(r) for r in removed if r is not None],
                    "ablate_fraction_ci95": [bootstrap_ratio_ci95(r, gap_q) for r in removed if r is not None]}  # fmt: skip
        return out

    out: dict[str, Any] = {"layer": layer, "metric": metric.info(), "ks": list(ks), "gap": gap,
                           "base_logp": base_lp, "student_logp": student_lp, "n_active": len(pool),
                           "n_random": n_random, "first_position": from_position,
                           "top_attribution": ranked["attribution"][:20]}  # fmt: skip
    for set_name, fsets in sets.items():
        got = effects(fsets)
        gained, removed = [g for g, _ in got], [r for _, r in got]
        if set_name == "random":  # per k: the mean over the draws question by question, and the draws' spread
            per_k = [range(i * n_random, (i + 1) * n_random) for i in range(len(ks))]
            draws = {key: [[frac(x[j]) for j in r] for r in per_k] for key, x in  # type: ignore[arg-type]
                     (("patch_fraction", gained), ("ablate_fraction", removed)) if key in directions}  # fmt: skip
            gained = [np.mean([gained[j] for j in r], 0) for r in per_k]
            removed = [np.mean([removed[j] for j in r], 0) if ablate else None for r in per_k]  # type: ignore[arg-type]
            out[set_name] = report(gained, removed) | {
                f"{key}_p2_5_p97_5": [np.percentile(d, [2.5, 97.5]).tolist() for d in ds]
                for key, ds in draws.items()
            }
            continue
        out[set_name] = report(gained, removed)
        if set_name == "all":
            continue
        picks = []  # per k: the draws of the matched control (drawn per k: the same whatever else is drawn)
        for k, real in zip(ks, fsets, strict=True):
            # none: fewer features outside the set than in it (e.g. every feature), so no disjoint control
            ok, gen = 2 * len(set(real)) <= len(bins), rng(set_name, k)
            picks.append([matched_draw(real, bins, gen) for _ in range(n_random if ok else 0)])
        scored = iter(effects([d for ds in picks for d in ds]))
        matched: dict[str, list[list[float]]] = {key: [] for key in directions}
        for ds in picks:
            got = [next(scored) for _ in ds]
            matched["patch_fraction"].append([frac(g) for g, _ in got])
            if ablate:
                matched["ablate_fraction"].append([frac(r) for _, r in got if r is not None])

        def control(real: float, d: list[float]) -> dict[str, Any] | None:
            return (random_control(real, d) | ({"draws": d} if keep_draws else {})) if d else None

        out[set_name]["random_matched"] = {
            key: [control(v, d) for v, d in zip(out[set_name][key], ds, strict=True)]
            for key, ds in matched.items()
        }
    if error:
        [(ge, re_)] = effects([pool.tolist()], extra=errs)
        out["all_error"] = report([ge], [re_])
    if from_position:
        [(g0, r0)] = effects([list(range(w_dec.shape[0]))], cached0)
        out["all_position0"] = report([g0], [r0])
    return out
