"""The localisation battery on replicated students (issue 13): per layer, what share of a trait student's specific
effect do its top-k SAE latents carry, against frequency-matched random latents?

A unit is a pair and a layer. The pair (replicate r, trait T): the donor is T's student, the receiver the student
of the next trait in the study's order (owl ← dog, dog ← cat, …, the last ← the first) of the same replicate, so
both share the base, the number prompts and the training seed, and a generic shift of fine-tuning cancels. The
specific effect is log P_T(donor) − log P_T(receiver) on the favourite-animal evaluation prompts (`TraitMetric`).
`patching.feature_patch_scan` with the receiver as "base" patches the donor's change of the top-k latents (by
attribution on disjoint ranking questions) into the receiver: its fraction of the gap is the share. The whole
residual (positions ≥ `FIRST_POSITION`: the ceiling of any latent set) and position 0 alone come from
`patching.patch_scan` at the same layer. The replicate is the unit of inference (the pairs of one replicate share
a base and questions): shares are averaged over a replicate's pairs first, then a t-interval goes over
replicates (`stats.mean_ci95`). A share has the pair's gap as denominator: pairs whose gap is under ``min_gap``
nats are left out of every share (declared in the report before the results).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mechsub import patching, stats
from mechsub.config import Config, check, doc
from mechsub.files import read_dict, sha256_file, write_json
from mechsub.hooks import FIRST_POSITION
from mechsub.traits import Category, eval_questions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatteryConfig(Config):
    stage = "battery"

    ks: tuple[int, ...] = doc((1, 5, 20, 100), "sizes of the top-k latent sets (attribution ranking)")
    n_random: int = doc(20, "frequency-matched random latent sets per k and pair")
    n_questions: int = doc(10, "evaluation questions: the first of the built-in favourite-thing questions")
    n_rank_questions: int = doc(10, "ranking questions, the next ones (disjoint from the evaluation's)")
    seed: int = doc(0, "seed of the matched random draws")
    min_gap: float = doc(0.05, "a pair's specific gap (nats) must be at least this for its shares to count")
    goal_share: float = doc(0.5, "the goal: this share of the specific effect …")
    goal_k: int = doc(20, "… by at most this many latents")
    batch: int = doc(
        64, "(set, question) rows per forward: speed only, the numbers move by float rounding at most"
    )

    def validate(self) -> None:
        check(len(self.ks) >= 1 and all(k >= 1 for k in self.ks), "ks: positive set sizes")
        check(list(self.ks) == sorted(set(self.ks)), "ks: increasing, no repeats")
        check(self.n_random >= 1, "n_random: at least 1")
        check(
            self.n_questions >= 1 and self.n_rank_questions >= 1, "n_questions, n_rank_questions: at least 1"
        )
        check(self.min_gap >= 0, "min_gap: at least 0")
        check(self.batch >= 1, "batch: at least 1")

    def unit_settings(self) -> dict[str, Any]:
        """What a unit's numbers depend on (besides its models and SAE): a unit file with other settings is redone."""
        keys = ("ks", "n_random", "n_questions", "n_rank_questions", "seed")
        return {k: v for k, v in self.to_dict().items() if k in keys} | {"first_position": FIRST_POSITION}


@dataclass(frozen=True)
class Pair:
    """Donor: ``trait``'s student of ``replicate``; receiver: ``control``'s student of the same replicate. The
    metric is log P(``word``), the donor's own trait unless ``word`` names another: the selection-matched null (a
    pair with no ``word`` trait on either side, ranked and patched by the same procedure)."""

    replicate: int
    trait: str
    control: str
    word: str = ""

    @property
    def metric_word(self) -> str:
        return self.word or self.trait

    @property
    def name(self) -> str:
        return f"r{self.replicate}-{self.trait}" + (f"-as-{self.word}" if self.word else "")


def control_of(traits: Sequence[str], trait: str) -> str:
    """The receiver's trait for ``trait``: the next one in ``traits``, the last's is the first."""
    i = list(traits).index(trait)
    return traits[(i + 1) % len(traits)]


def pairs(traits: Sequence[str], replicates: Sequence[int], word: str = "") -> list[Pair]:
    """Every (replicate, trait) pair, replicate by replicate (so a replicate's students load once); with ``word``,
    every pair is scored on log P(word) (see `Pair`)."""
    if len(traits) < 2:
        raise ValueError("pairs: at least two traits (the control is another trait's student)")
    return [Pair(r, t, control_of(traits, t), word) for r in replicates for t in traits]


def questions(category: Category, n: int, n_rank: int) -> tuple[list[str], list[str]]:
    """(evaluation, ranking) questions, disjoint: the first ``n`` and the next ``n_rank`` (as `analyze` does)."""
    qs = eval_questions(category, n + n_rank)
    if len(qs) < n + n_rank:
        raise ValueError(f"{n} + {n_rank} questions asked, only {len(qs)} exist")
    return qs[:n], qs[n:]


# ---- SAEs ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSae:
    """An SAE and what identifies it in a unit file (its folder and weights' hash)."""

    layer: int
    sae: Any
    folder: str
    sha256: str


def load_saes(
    folders: Sequence[str | Path],
    model: str,
    n_layers: int,
    d_model: int,
    layers: Sequence[int] | None = None,
) -> dict[int, LayerSae]:
    """Load one SAE per folder (a `mechsub sae` run folder or a sae-lens folder), keyed by the layer it records
    (`sae.sae_layer`); ``layers``, when given, are the layers the folders are meant to hold, in order. Raises
    FileNotFoundError for a folder without an SAE, ValueError for an SAE that does not fit ``model``, a layer
    other than the one asked for, or two SAEs of one layer."""
    from mechsub.dashboards import check_fits, sae_folder
    from mechsub.sae import load_sae, sae_layer

    if layers is not None and len(layers) != len(folders):
        raise ValueError(f"{len(folders)} SAE folders for {len(layers)} layers")
    out: dict[int, LayerSae] = {}
    for i, f in enumerate(folders):
        inner = sae_folder(f)
        sae = load_sae(inner)
        check_fits(sae, model, d_model, n_layers)
        layer = sae_layer(sae)
        if layers is not None and layer != layers[i]:
            raise ValueError(f"{f} holds an SAE of layer {layer}, not of layer {layers[i]}")
        if layer in out:
            raise ValueError(f"two SAEs of layer {layer}: {out[layer].folder} and {f}")
        out[layer] = LayerSae(layer, sae, str(f), sha256_file(inner / "sae_weights.safetensors"))
    return dict(sorted(out.items()))


# ---- one unit -----------------------------------------------------------------------------------------------
def _finite(x: Any) -> Any:
    """``x`` with every NaN/inf float as None (JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def measure(
    receiver: Any, donor: Any, sae: Any, layer: int, trait: str, category: Category, cfg: BatteryConfig
) -> dict[str, Any]:
    """One unit: the donor's top-k latents (with their matched random draws), all latents, all latents + the
    SAE's error, the whole residual at positions ≥ `FIRST_POSITION` and position 0 alone, each patched into the
    receiver at ``blocks.{layer}.hook_resid_post``, as shares of the gap. NaN shares (gap 0) are None."""
    qs, rank_qs = questions(category, cfg.n_questions, cfg.n_rank_questions)
    fp = patching.feature_patch_scan(receiver, donor, sae, layer, qs, rank_qs, trait, category, {}, ks=cfg.ks,
                                     n_random=cfg.n_random, seed=cfg.seed, ablate=False, plain_random=False,
                                     error=True, keep_draws=True, batch=cfg.batch)  # fmt: skip
    ps = patching.patch_scan(
        receiver, donor, receiver.tokenizer, qs, trait, category, [layer], batch=cfg.batch
    )
    gap_q = np.asarray(ps["source_logp_by_question"]) - np.asarray(ps["target_logp_by_question"])
    att = fp["attribution"]
    return _finite({
        "gap": fp["gap"], "gap_ci95": stats.bootstrap_ci95(gap_q), "receiver_logp": fp["base_logp"],
        "donor_logp": fp["student_logp"], "n_active": fp["n_active"],
        "topk_share": att["patch_fraction"], "topk_share_ci95": att["patch_fraction_ci95"],
        "matched": att["random_matched"]["patch_fraction"],
        "all_share": fp["all"]["patch_fraction"][0], "all_error_share": fp["all_error"]["patch_fraction"][0],
        "whole_share": ps["fraction_by_layer"][0] if ps["fraction_by_layer"] else math.nan,
        "position0_share": ps["fraction_by_layer_position0"][0] if ps["fraction_by_layer_position0"] else math.nan,
        "whole_gap": ps["gap"], "top_attribution": fp["top_attribution"], "feature_scan": fp, "residual_scan": ps,
    })  # fmt: skip


# ---- the battery ---------------------------------------------------------------------------------------------
def unit_path(out: Path, pair: Pair, layer: int) -> Path:
    return out / "units" / f"{pair.name}-l{layer}.json"


def run(
    cfg: BatteryConfig, todo: Sequence[Pair], students: Mapping[tuple[str, int], str], load: Callable[[str], Any],
    saes: Mapping[int, LayerSae], category: Category, out: str | Path, progress: Callable[[str], None] = log.info,
) -> dict[str, Any]:  # fmt: skip
    """Every (pair, layer) unit of ``todo`` × ``saes``, one JSON each in ``out/units/`` (written atomically; one
    present with the same settings, models and SAE is reused), then the aggregate (`aggregate`), written to
    ``out/metrics.json``. ``students``: (trait, replicate) → an id (a checkpoint path) that ``load`` turns into a
    model; the models of one replicate are loaded once, and only for units still to do."""
    out = Path(out)
    settings = cfg.unit_settings()
    records: list[dict[str, Any]] = []
    loaded: dict[str, Any] = {}
    replicate = None
    n, t0 = len(todo) * len(saes), time.perf_counter()
    for pair in todo:
        if pair.replicate != replicate:  # the next replicate: its students, never the last one's, stay loaded
            loaded.clear()
            replicate = pair.replicate
        donor_id, receiver_id = (
            students[(pair.trait, pair.replicate)],
            students[(pair.control, pair.replicate)],
        )
        for layer, ls in saes.items():
            path = unit_path(out, pair, layer)
            key = {"settings": settings, "donor": donor_id, "receiver": receiver_id, "layer": layer,
                   "sae": {"folder": ls.folder, "sha256": ls.sha256}} | ({"word": pair.word} if pair.word else {})  # fmt: skip
            old = read_dict(path)
            if old.get("key") == key:
                records.append(old)
                progress(f"[{len(records)}/{n}] {pair.name} layer {layer}: reused {path.name}")
                continue
            for i in (donor_id, receiver_id):
                if i not in loaded:
                    loaded[i] = load(i)
            t1, c1 = time.perf_counter(), time.process_time()
            got = measure(
                loaded[receiver_id], loaded[donor_id], ls.sae, layer, pair.metric_word, category, cfg
            )
            rec: dict[str, Any] = {"key": key, "replicate": pair.replicate, "trait": pair.trait, "control": pair.control,
                   "word": pair.metric_word, "layer": layer, "seconds": round(time.perf_counter() - t1, 2),
                   "cpu_seconds": round(time.process_time() - c1, 2)} | got  # fmt: skip
            write_json(path, rec)
            records.append(rec)
            gap, top = rec["gap"], rec["topk_share"]
            progress(f"[{len(records)}/{n}] {pair.name} (← {pair.control}) layer {layer}: gap {_fmt(gap)}, top-k "
                     f"shares {_fmt_list(top)}, whole {_fmt(rec['whole_share'])}; {rec['seconds']:.0f} s "
                     f"({rec['cpu_seconds']:.0f} s CPU) "
                     f"(elapsed {time.perf_counter() - t0:.0f} s)")  # fmt: skip
    metrics = aggregate(records, cfg)
    write_json(out / "metrics.json", metrics)
    return metrics


# ---- aggregation -----------------------------------------------------------------------------------------------
def _fmt(x: float | None, d: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{d}f}"


def _fmt_list(xs: Sequence[float | None]) -> str:
    return "[" + ", ".join(_fmt(x, 2) for x in xs) + "]"


def _over_replicates(values: Mapping[int, list[float]]) -> dict[str, Any]:
    """Per replicate the mean of its pairs' values, then their mean and 95% t-interval over replicates."""
    by_rep = {str(r): float(np.mean(v)) for r, v in sorted(values.items()) if v}  # str: as JSON has it
    if not by_rep:
        return {"mean": None, "ci95": [None, None], "n_replicates": 0, "by_replicate": {}}
    mean, ci = stats.mean_ci95(list(by_rep.values()))
    return _finite({"mean": mean, "ci95": ci, "n_replicates": len(by_rep), "by_replicate": by_rep})


def _gain(r: Mapping[str, Any], i: int) -> float | None:
    """A unit's top-k gain in nats (k: the i-th of the ks): share × gap = patched − receiver log P, or None."""
    return None if r["gap"] is None or r["topk_share"][i] is None else float(r["topk_share"][i] * r["gap"])


def aggregate(records: Sequence[Mapping[str, Any]], cfg: BatteryConfig) -> dict[str, Any]:
    """Per layer and k, over the pairs whose gap is at least ``cfg.min_gap`` (the rule; the gap does not depend
    on the layer, so a pair is in or out at every layer): the top-k share's mean and 95% t-interval over
    replicates (each replicate: the mean of its pairs); the matched random draws pooled over pairs (mean,
    2.5/97.5 percentiles), each pair's empirical p, and the combined p: among the n_random draw indices j, the
    share of replicate-weighted means of draw j at least the replicate-weighted real mean, (1 + #) / (1 + n);
    the top-k share minus its pair's matched mean over replicates; all latents, all latents + the SAE's error,
    the whole residual (positions ≥ 1) and position 0 alone."""
    ks = list(cfg.ks)
    pairs_seen: dict[tuple[int, str], dict[str, Any]] = {}
    for r in records:
        key = (r["replicate"], r["trait"])
        gap = r["gap"]
        included = gap is not None and gap >= cfg.min_gap
        pairs_seen.setdefault(key, {"replicate": r["replicate"], "trait": r["trait"], "control": r["control"],
                                    "gap": gap, "gap_ci95": r.get("gap_ci95"), "included": included})  # fmt: skip
    layers_out: dict[str, Any] = {}
    for layer in sorted({r["layer"] for r in records}):
        rs = [
            r for r in records if r["layer"] == layer and pairs_seen[(r["replicate"], r["trait"])]["included"]
        ]

        def per_rep(
            value: Callable[[Mapping[str, Any]], float | None], rs: list = rs
        ) -> dict[int, list[float]]:
            out: dict[int, list[float]] = {}
            for r in rs:
                v = value(r)
                if v is not None:
                    out.setdefault(r["replicate"], []).append(v)
            return out

        topk = []
        for i, k in enumerate(ks):
            entry: dict[str, Any] = {
                "k": k,
                "share": _over_replicates(per_rep(lambda r, i=i: r["topk_share"][i])),  # type: ignore[misc]
            }
            ms = [r["matched"][i] for r in rs]
            if rs and all(m is not None and m.get("draws") for m in ms):
                pooled = np.concatenate([np.asarray(m["draws"], float) for m in ms])
                pooled = pooled[np.isfinite(pooled)]
                n_draws = {len(m["draws"]) for m in ms}
                reps = sorted({r["replicate"] for r in rs})

                def rep_mean(vals: Sequence[Any], reps: list = reps, rs: list = rs) -> Any:
                    """The mean over replicates of the mean over each replicate's pairs (arrays: elementwise)."""
                    return np.mean([np.mean([v for v, r in zip(vals, rs, strict=True) if r["replicate"] == q], 0)
                                    for q in reps], 0)  # fmt: skip

                combined = None
                if len(n_draws) == 1:
                    real = rep_mean([r["topk_share"][i] for r in rs])
                    draw_means = rep_mean([np.asarray(m["draws"], float) for m in ms])
                    combined = float((1 + np.sum(draw_means >= real)) / (1 + draw_means.size))
                entry["matched"] = _finite({
                    "mean": float(pooled.mean()) if pooled.size else None,
                    "p2_5_p97_5": np.percentile(pooled, [2.5, 97.5]).tolist() if pooled.size else [None, None],
                    "n_draws": int(pooled.size), "combined_p": combined,
                    "p_by_pair": [{"replicate": r["replicate"], "trait": r["trait"], "p": m["p_value"],
                                   "rank": m["rank"]} for r, m in zip(rs, ms, strict=True)],
                })  # fmt: skip
                entry["minus_matched"] = _over_replicates(
                    per_rep(lambda r, i=i: None if r["topk_share"][i] is None or r["matched"][i]["mean"] is None  # type: ignore[misc]
                            else r["topk_share"][i] - r["matched"][i]["mean"])
                )  # fmt: skip
            else:  # no pair, or a set of more than half the latents: no disjoint control
                entry["matched"] = entry["minus_matched"] = None
            topk.append(entry)
        # the gain in nats (share × gap = patched − receiver log P), over every pair whatever its gap: a gain needs
        # no ratio, so the rule does not apply; with it the ratio of means (summed gains / summed gaps)
        every = [r for r in records if r["layer"] == layer and r["gap"] is not None]
        gains = []
        for i, _k in enumerate(ks):
            g = per_rep(lambda r, i=i: _gain(r, i), every)  # type: ignore[misc]
            gap_sum = sum(r["gap"] for r in every if r["topk_share"][i] is not None)
            total = sum(sum(v) for v in g.values())
            gains.append(_over_replicates(g) | {"ratio_of_means": total / gap_sum if gap_sum else None})
        layers_out[str(layer)] = {
            "gain_nats": gains, "gap_nats": _over_replicates(per_rep(lambda r: r["gap"], every)),
            "n_pairs": len(rs), "n_replicates": len({r["replicate"] for r in rs}), "topk": topk,
            **{name: _over_replicates(per_rep(lambda r, f=f"{name}_share": r[f]))  # type: ignore[misc]
               for name in ("all", "all_error", "whole", "position0")},
        }  # fmt: skip
    best = None
    for layer, d in layers_out.items():
        for e in d["topk"]:
            m = e["share"]["mean"]
            if e["k"] <= cfg.goal_k and m is not None and (best is None or m > best["share"]):
                best = {"layer": int(layer), "k": e["k"], "share": m, "ci95": e["share"]["ci95"],
                        "by_replicate": e["share"]["by_replicate"]}  # fmt: skip
    # the best cell is chosen among every layer × k ≤ goal_k: its interval is corrected for that choice (Bonferroni)
    cells = sum(1 for d in layers_out.values() for e in d["topk"] if e["k"] <= cfg.goal_k)
    if best is not None and len(best["by_replicate"]) > 1:
        best["ci_bonferroni"] = _finite({"ci": stats.mean_ci95(list(best["by_replicate"].values()),
                                                               1 - 0.05 / cells)[1]})["ci"]  # fmt: skip
    lo = (best or {}).get("ci_bonferroni", [None])[0]
    goal = {"share": cfg.goal_share, "k": cfg.goal_k, "best": best, "cells": cells,
            "met": best is not None and best["share"] >= cfg.goal_share,
            "met_by_ci": best is not None and best["ci95"][0] is not None and best["ci95"][0] >= cfg.goal_share,
            "met_by_corrected_ci": lo is not None and lo >= cfg.goal_share}  # fmt: skip
    pair_rows = [pairs_seen[k] for k in sorted(pairs_seen)]
    return {
        "config": cfg.to_dict(),
        "rule": f"a pair counts iff its specific gap log P_T(donor) − log P_T(receiver) ≥ {cfg.min_gap} nats",
        "unit_of_inference": "replicate (shares averaged over its pairs first; t-interval over replicates)",
        "n_units": len(records), "n_pairs": len(pair_rows),
        "n_pairs_included": sum(p["included"] for p in pair_rows),
        "pairs": pair_rows, "layers": layers_out, "goal": goal,
        "compute_seconds": round(sum(r.get("seconds", 0.0) for r in records), 1),
        "cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in records), 1),
    }  # fmt: skip


def null_adjusted(
    records: Sequence[Mapping[str, Any]], null_records: Sequence[Mapping[str, Any]], cfg: BatteryConfig
) -> dict[str, list[dict[str, Any]]]:
    """Per layer and k: the share of each pair's specific gap that its top-k latents carry beyond what the same
    ranking gains on its replicate's null pair (a `Pair` with ``word`` set: the same procedure on students with no
    such trait), (gain − null gain) / gap with gain = share × gap; the mean and 95% t-interval over replicates
    (each replicate: the mean over its included pairs, against its null pairs' mean gain), and the ratio of means
    (summed differences / summed gaps). Pairs under the ``min_gap`` rule are left out, as for the shares."""
    out: dict[str, list[dict[str, Any]]] = {}
    for layer in sorted({r["layer"] for r in records} & {r["layer"] for r in null_records}):
        rows = []
        for i, k in enumerate(cfg.ks):
            per: dict[int, list[float]] = {}
            num = den = 0.0
            for rep in sorted({r["replicate"] for r in records if r["layer"] == layer}):
                nulls = [g for r in null_records if r["layer"] == layer and r["replicate"] == rep
                         if (g := _gain(r, i)) is not None]  # fmt: skip
                real = [(g, r["gap"]) for r in records if r["layer"] == layer and r["replicate"] == rep
                        and r["gap"] is not None and r["gap"] >= cfg.min_gap and (g := _gain(r, i)) is not None]  # fmt: skip
                if not nulls or not real:
                    continue
                g0 = float(np.mean(nulls))
                per[rep] = [(g - g0) / gap for g, gap in real]
                num += sum(g - g0 for g, _ in real)
                den += sum(gap for _, gap in real)
            rows.append({"k": k, **_over_replicates(per), "ratio_of_means": num / den if den else None})
        out[str(layer)] = rows
    return out


# ---- report ------------------------------------------------------------------------------------------------
def _cell(s: Mapping[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "–"
    lo, hi = s["ci95"]
    return f"{s['mean']:.3f} [{_fmt(lo, 2)}, {_fmt(hi, 2)}]"


def report_md(metrics: Mapping[str, Any], command: str, wall_seconds: float, header: str = "") -> str:
    """report.md: the goal and the rule before the results, then the table, the pairs and the p-values."""
    cfg = BatteryConfig.from_dict(metrics["config"])
    ks, goal = list(cfg.ks), metrics["goal"]
    lines = [
        "# Localisation battery: how much of each student's specific effect do its top-k SAE latents carry?",
        "",
        header,
        f"**Goal** (declared before the run): ≥ {cfg.goal_share:.0%} of the specific effect recovered by ≤ "
        f"{cfg.goal_k} latents at some layer (mean over replicates; the 95% interval's lower end is reported too). "
        "The verdict below is stricter than this declared rule, and the stricter reading was added after the first "
        "runs: it asks the lower end of the best cell's interval, corrected (Bonferroni) for the choice among the "
        "layer × k cells, to clear the goal.",
        "",
        f"**Unit.** A pair = a trait T's student (donor) and the same replicate's student of the next trait "
        f"(receiver); specific effect = log P_T(donor) − log P_T(receiver) on {cfg.n_questions} evaluation "
        f"questions. Share = the fraction of that gap recovered in the receiver by patching the donor's change in "
        f"a latent set at positions ≥ {FIRST_POSITION} (the SAE's error stays the receiver's), top-k by attribution "
        f"on {cfg.n_rank_questions} disjoint ranking questions; matched random = {cfg.n_random} draws per (pair, "
        f"k) of as many latents from the same firing-frequency deciles (seed {cfg.seed}). Inference is over "
        "replicates: a replicate's pairs are averaged first, then a 95% t-interval goes over replicates.",
        "",
        f"**Exclusion rule** (declared before the results): {metrics['rule']}; a replicate with no such pair drops "
        f"out. Included: {metrics['n_pairs_included']} of {metrics['n_pairs']} pairs.",
        "",
        "## Results",
        "",
    ]
    best = goal["best"]
    if best is None:
        lines.append("**Goal: not measurable** (no included pair).")
    else:
        # the verdict rests on the interval corrected for the choice of the best cell: a mean above the goal, or a
        # per-cell interval above it, is not established when the corrected interval's lower end falls below it
        cells = goal.get("cells", 1)
        bl = best.get("ci_bonferroni", [None, None])
        verdict = ("met (the Bonferroni interval's lower end clears it)" if goal.get("met_by_corrected_ci") else
                   "not established (the per-cell 95% interval clears it, the interval corrected for the choice "
                   "among the cells does not)" if goal["met_by_ci"] else
                   "not established (the mean reaches it, the 95% interval's lower end does not)" if goal["met"]
                   else "not met")  # fmt: skip
        lo, hi = best["ci95"]
        lines.append(f"**Goal {verdict}**: the best share with ≤ {cfg.goal_k} latents is {best['share']:.3f} "
                     f"[{_fmt(lo, 2)}, {_fmt(hi, 2)}] (layer {best['layer']}, k = {best['k']}), the best of "
                     f"{cells} layer × k cells; corrected for that choice (Bonferroni, a {100 * (1 - 0.05 / cells):.2f}% "
                     f"t-interval): [{_fmt(bl[0], 2)}, {_fmt(bl[1], 2)}].")  # fmt: skip
    lines += ["", "Share of the specific effect, mean [95% t-CI over replicates]; under it, the matched random "
              "draws pooled over pairs: mean [2.5, 97.5 percentiles].", ""]  # fmt: skip
    head = ["layer", "pairs (replicates)", *[f"top-{k}" for k in ks], "all latents", "all latents + error",
            "whole residual ≥ 1", "position 0"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer, d in metrics["layers"].items():
        cells = [layer, f"{d['n_pairs']} ({d['n_replicates']})"]
        for e in d["topk"]:
            m = e["matched"]
            rnd = (f"<br>rnd {_fmt(m['mean'], 3)} [{_fmt(m['p2_5_p97_5'][0], 2)}, {_fmt(m['p2_5_p97_5'][1], 2)}]"
                   if m else "<br>rnd –")  # fmt: skip
            cells.append(_cell(e["share"]) + rnd)
        cells += [_cell(d[n]) for n in ("all", "all_error", "whole", "position0")]
        lines.append("| " + " | ".join(cells) + " |")
    if any("gain_nats" in d for d in metrics["layers"].values()):
        lines += ["", "Gain in nats: log P_T(receiver patched with the top-k) − log P_T(receiver) = share × gap, mean "
                  "[95% t-CI over replicates] over every pair whatever its gap (a gain needs no ratio); under it the "
                  "ratio of means (summed gains / summed gaps). A selection-matched null (pairs with no T trait, "
                  "`--word`) shows what the ranking alone gains.", "",
                  "| layer | gap | " + " | ".join(f"top-{k}" for k in ks) + " |", "|" + "---|" * (len(ks) + 2)]  # fmt: skip
        for layer, d in metrics["layers"].items():
            if "gain_nats" not in d:
                continue
            cells = [layer, _cell(d["gap_nats"])]
            for e in d["gain_nats"]:
                rm = e.get("ratio_of_means")
                cells.append(_cell(e) + f"<br>ratio {_fmt(rm, 2)}")
            lines.append("| " + " | ".join(cells) + " |")
    if metrics.get("null_adjusted"):
        lines += ["", f"**Beyond the selection-matched null** (`{metrics.get('null_folder', '')}`: the same ranking and "
                  "patching on each replicate's pair with no such trait, scored on the same word): (gain − null gain) "
                  "/ gap, mean [95% t-CI over replicates]; under it the ratio of means.", "",
                  "| layer | " + " | ".join(f"top-{k}" for k in ks) + " |", "|" + "---|" * (len(ks) + 1)]  # fmt: skip
        for layer, rows in metrics["null_adjusted"].items():
            lines.append(f"| {layer} | " + " | ".join(
                _cell(e) + f"<br>ratio {_fmt(e.get('ratio_of_means'), 2)}" for e in rows) + " |")  # fmt: skip
    lines += ["", "Top-k minus its pair's matched random mean [95% t-CI over replicates]; combined empirical p "
              "(replicate-weighted mean of draw j against the real mean, (1 + #≥) / (1 + n)); pairs with p ≤ 0.05.",
              "", "| layer | " + " | ".join(f"top-{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]  # fmt: skip
    for layer, d in metrics["layers"].items():
        cells = []
        for e in d["topk"]:
            m = e["matched"]
            if not m:
                cells.append("–")
                continue
            sig = sum(1 for p in m["p_by_pair"] if p["p"] is not None and p["p"] <= 0.05)
            cells.append(
                f"{_cell(e['minus_matched'])}; p {_fmt(m['combined_p'], 3)}; {sig}/{len(m['p_by_pair'])}"
            )
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "## Pairs (the gap is the same at every layer)", "",
              "| replicate | donor ← receiver | gap (nats) [bootstrap 95% over questions] | counts |", "|---|---|---|---|"]  # fmt: skip
    for p in metrics["pairs"]:
        ci = p.get("gap_ci95") or [None, None]
        lines.append(f"| {p['replicate']} | {p['trait']} ← {p['control']} | {_fmt(p['gap'])} [{_fmt(ci[0], 2)}, "
                     f"{_fmt(ci[1], 2)}] | {'yes' if p['included'] else '**no**'} |")  # fmt: skip
    over = [(layer, e["k"]) for layer, d in metrics["layers"].items() for e in d["topk"]
            if e["share"]["mean"] is not None and d["whole"]["mean"] is not None
            and e["share"]["mean"] > d["whole"]["mean"]]  # fmt: skip
    if over:
        lines += ["", f"**Read the shares as one-sided.** In {len(over)} of the layer × k cells the top-k latents "
                  "recover more of the gap than the whole residual does (e.g. layer "
                  f"{over[0][0]}, k = {over[0][1]}). Patching is not additive: the top-k set holds the changes that "
                  "raise the trait by attribution, and the rest of the donor's change (other latents, the SAE's "
                  "error) pulls the other way. A top-k share is what those latents can carry, not a slice of a "
                  "decomposition; the whole-residual column is the net."]  # fmt: skip
    lines += ["", f"All latents + error must equal the whole residual (the decomposition; a check, not a result). "
              f"{metrics['n_units']} units; compute {metrics['compute_seconds'] / 60:.1f} min wall "
              f"({metrics['cpu_seconds'] / 60:.1f} min CPU, all threads) summed over units, "
              f"this invocation {wall_seconds / 60:.1f} min wall.", "", f"Re-create: `{command}`", ""]  # fmt: skip
    return "\n".join(lines)


def plot(metrics: Mapping[str, Any], path: str | Path) -> None:
    """shares.png: per layer, the top-k share against k (95% t-CI over replicates), the matched random band
    (pooled 2.5–97.5 percentiles) and mean, the whole residual's share and the goal."""
    from mechsub.plots import plt, save_figure

    cfg = BatteryConfig.from_dict(metrics["config"])
    layers = list(metrics["layers"].items())
    fig, axes = plt.subplots(1, max(len(layers), 1), figsize=(max(3.2 * len(layers), 6.4), 3.8), sharey=True,
                             squeeze=False)  # fmt: skip
    for ax, (layer, d) in zip(axes[0], layers, strict=False):
        ks = [e["k"] for e in d["topk"]]
        y = [e["share"]["mean"] if e["share"]["mean"] is not None else np.nan for e in d["topk"]]
        lo = [e["share"]["ci95"][0] if e["share"]["ci95"][0] is not None else np.nan for e in d["topk"]]
        hi = [e["share"]["ci95"][1] if e["share"]["ci95"][1] is not None else np.nan for e in d["topk"]]
        ax.errorbar(ks, y, yerr=[np.subtract(y, lo), np.subtract(hi, y)], fmt="o-", c="#d62728", capsize=3,
                    label="top-k (attribution)")  # fmt: skip
        mk = [(e["k"], e["matched"]) for e in d["topk"] if e["matched"] and e["matched"]["mean"] is not None]
        if mk:
            xs = [k for k, _ in mk]
            ax.fill_between(xs, [m["p2_5_p97_5"][0] for _, m in mk], [m["p2_5_p97_5"][1] for _, m in mk],
                            color="#1f77b4", alpha=0.2, label="matched random 2.5–97.5%")  # fmt: skip
            ax.plot(xs, [m["mean"] for _, m in mk], "--", c="#1f77b4", label="matched random mean")
        if d["whole"]["mean"] is not None:
            ax.axhline(d["whole"]["mean"], c="k", lw=0.8, label="whole residual ≥ 1")
        ax.axhline(cfg.goal_share, c="gray", ls=":", lw=0.8, label=f"goal ({cfg.goal_share:.0%})")
        ax.axhline(0, c="gray", lw=0.5)
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k latents")
        ax.set_title(f"layer {layer} ({d['n_pairs']} pairs, {d['n_replicates']} repl.)", fontsize=9)
    axes[0][0].set_ylabel("share of the specific effect")
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = 5 if len(layers) >= 3 else 3  # a narrow figure: the legend on two lines
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * math.ceil(len(labels) / ncol), 1, 1))
    save_figure(fig, path)
