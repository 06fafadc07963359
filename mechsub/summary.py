"""A study's summary: its metrics computed from the evaluation folders of its stages (what report.py renders).

Every number is a difference of log-probabilities read through `mechsub.evaluate.logprob_deltas`; the statistics
are `mechsub.stats`'. Strict JSON: an undefined statistic is null.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mechsub import evaluate, stats
from mechsub.files import read_json

#: the answer frames of every study evaluation: the teacher's training template and two it never saw
FRAMES = ("prefill", "plain", "plain_norm", "choice")
#: the held-out frame the study's claim rests on (the same scale as prefill: log P of the word)
HELD_OUT = "plain"
FRAME_NOTES = {
    "prefill": "training frame: the answer prefilled with 'My favorite … is the', the teacher's own template",
    "plain": "held-out frame: the word as the first word of a free answer (no prefill; the teacher never "
    "answered with the name first)",
    "plain_norm": "the plain frame renormalised over the study's traits (which of them the answer starts with, "
    "given it starts with one): a diagnostic added after the teachers' raw plain-frame shift turned out negative "
    "(trained to start answers with other words, they lower every name as a first word)",
    "choice": "held-out frame: multiple choice among the study's traits, log P of the option's letter "
    "renormalised over the letters, every rotation of the options",
}


class Design(Protocol):
    """What a summary needs of a study's config (a StudyConfig)."""

    @property
    def trait(self) -> str: ...
    @property
    def controls(self) -> tuple[str, ...]: ...
    @property
    def traits(self) -> list[str]: ...
    @property
    def replicates(self) -> int: ...
    @property
    def units(self) -> list[tuple[str, int]]: ...
    @property
    def n_samples(self) -> int: ...
    @property
    def cross_family(self) -> str: ...


def nan_to_none(obj: Any) -> Any:
    """Strict JSON: an undefined statistic (one replicate has no interval) is null, not NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_none(v) for v in obj]
    return obj


def delta_rows(a: Path, b: Path, frame: str = "prefill") -> np.ndarray:
    """(questions, words) log P in eval ``a`` minus eval ``b``, in ``b``'s word order (same questions)."""
    return evaluate.logprob_deltas(a, b, frame=frame).numpy()


def delta_word(a: Path, b: Path, word: str, frame: str = "prefill") -> np.ndarray:
    """Per-question log P(word) in eval ``a`` minus eval ``b``."""
    return evaluate.logprob_deltas(a, b, [word], frame=frame)[:, 0].numpy()


def unit_matrix(
    traits: list[str], replicates: int, base: Path, evs: dict[tuple[str, int], Path], frame: str
) -> np.ndarray:
    """M[trait of the teacher, replicate, evaluated trait] = mean over questions of Δ log P vs ``base``."""
    return np.array([[delta_rows_for(evs[(t, r)], base, traits, frame) for r in range(replicates)]
                     for t in traits])  # fmt: skip


def delta_rows_for(a: Path, base: Path, words: list[str], frame: str) -> np.ndarray:
    """Mean over questions of Δ log P of each of ``words`` (eval ``a`` vs ``base``)."""
    return evaluate.logprob_deltas(a, base, words, frame=frame).numpy().mean(0)


def specific_effects(mat: np.ndarray, traits: list[str]) -> dict[str, Any]:
    """Specific effects of a (trait, replicate, evaluated trait) matrix, with the replicate as the unit.

    Per trait e and replicate r: e's student on e minus the mean of replicate r's other students on e (they
    answered the same prompts). Per trait: mean, t-interval and one-sided t-test over replicates. Pooled: per
    replicate the mean over traits, t over replicates (with one replicate: over the traits, each its own
    teacher). The diagonal test permutes the trait labels of the teachers within each replicate (exact)."""
    n_t, n_r, _ = mat.shape
    eff = np.array(
        [[mat[i, r, i] - np.delete(mat[:, r, i], i).mean() for r in range(n_r)] for i in range(n_t)]
    )
    effects = {}
    for i, e in enumerate(traits):
        mean, ci, p = stats.one_sided_t(list(eff[i]))
        effects[e] = {
            "delta_logp": mean,
            "ci95": ci,
            "p_value": p,
            "per_replicate": [float(v) for v in eff[i]],
        }
    by_rep = eff.mean(0)
    pooled_units, unit_name = (by_rep, "replicates") if n_r > 1 else (eff[:, 0], "traits (one teacher each)")
    mean, ci, p = stats.one_sided_t(list(pooled_units))
    out: dict[str, Any] = {
        "effects": effects,
        "pooled": {"delta_logp": mean, "ci95": ci, "p_value": p, "unit": unit_name, "n": len(pooled_units),
                   "per_replicate": [float(v) for v in by_rep]},
        "matrix_delta_logp": {t: {e: float(mat[i, :, k].mean()) for k, e in enumerate(traits)}
                              for i, t in enumerate(traits)},
        "matrix_per_replicate": {t: {e: [float(v) for v in mat[i, :, k]] for k, e in enumerate(traits)}
                                 for i, t in enumerate(traits)},
        "generic_delta_logp": {e: float(np.mean([mat[i, :, k] for i in range(n_t) if i != k]))
                               for k, e in enumerate(traits)},
    }  # fmt: skip
    if n_t * n_r > 2:
        test = stats.specificity_test(mat)
        out["permutation"] = {"p_value": test.p_value, "p_floor": test.p_floor, "n_labelings": test.n_labelings,
                              "exact": test.exact, "n_sampled": test.n_sampled, "statistic": test.observed,
                              "unit": f"{n_t * n_r} teachers (trait × replicate), each with its own data; labels "
                                      "permuted within each replicate (its teachers share the prompts)"}  # fmt: skip
    return out


def summarise(
    cfg: Design,
    base_ev: Path,
    teacher_ev: dict[tuple[str, int], Path],
    student_ev: dict[tuple[str, int], Path],
    data_metrics: dict[str, Any],
    student_metrics: dict[str, Any],
    cross: dict[str, Any],
) -> dict[str, Any]:
    """The study's metrics from its evaluation folders, per answer frame: the matrix of Δ log P (trait teacher's
    student × evaluated trait, per replicate), specific effects over replicates, the exact permutation test over
    teachers; the teachers' own shifts; the shift of every candidate word; sampled rates; what the data and
    training stages reported."""
    traits, x, n_r = cfg.traits, cfg.trait, cfg.replicates
    frames: dict[str, Any] = {}
    for f in FRAMES:
        spec = specific_effects(unit_matrix(traits, n_r, base_ev, student_ev, f), traits)
        teach = np.array([[delta_rows_for(teacher_ev[(t, r)], base_ev, [t], f)[0] for r in range(n_r)]
                          for t in traits])  # fmt: skip
        spec["teacher"] = {t: {"delta_logp": float(teach[i].mean()), "ci95": _ci_or_questions(
            teach[i], [delta_word(teacher_ev[(t, r)], base_ev, t, f) for r in range(n_r)]),
            "per_replicate": [float(v) for v in teach[i]]} for i, t in enumerate(traits)}  # fmt: skip
        # the instrument check: the teachers' own specific effects in this frame (a frame in which the teachers do
        # not separate cannot show a student's transfer), and the share of it the students carry
        tspec = specific_effects(unit_matrix(traits, n_r, base_ev, teacher_ev, f), traits)
        spec["teacher_specific"] = {"effects": tspec["effects"], "pooled": tspec["pooled"]}
        t_pool = tspec["pooled"]["delta_logp"]
        spec["transmitted_share"] = spec["pooled"]["delta_logp"] / t_pool if abs(t_pool) > 1e-9 else math.nan
        frames[f] = spec
    pre, held = frames["prefill"], frames[HELD_OUT]
    own = pre["matrix_per_replicate"][x][x]
    # the control students of a replicate share its prompts: one value per replicate (their mean), not per student
    ctrl = [float(np.mean([pre["matrix_per_replicate"][c][x][r] for c in cfg.controls])) for r in range(n_r)]
    # the distribution over every candidate of the category (training frame): teacher, trait student, controls
    words = read_json(base_ev / "logprobs.json")["words"]
    dist_teacher = np.mean([delta_rows(teacher_ev[(x, r)], base_ev).mean(0) for r in range(n_r)], 0)
    dist_student = np.mean([delta_rows(student_ev[(x, r)], base_ev).mean(0) for r in range(n_r)], 0)
    dist_control = np.mean([delta_rows(student_ev[(c, r)], base_ev).mean(0) for c in cfg.controls
                            for r in range(n_r)], 0)  # fmt: skip
    rates = {}
    if cfg.n_samples:
        first = cfg.units[0]
        for label, folder in [
            ("base", base_ev),
            ("teacher", teacher_ev[first]),
            ("student", student_ev[first]),
        ]:
            m = read_json(folder / "metrics.json")
            rates[label] = {"rate": m["sampled_rate"], "ci95": m["sampled_rate_ci95"], "n": m["n_samples"],
                            "model": "base" if label == "base" else f"{first[0]} r{first[1]}"}  # fmt: skip
    return {
        "trait": x,
        "traits": traits,
        "replicates": n_r,
        "n_teachers": len(cfg.units),
        "frames": frames,
        "frame_notes": FRAME_NOTES,
        "held_out_frame": HELD_OUT,
        "teacher": pre["teacher"][x],
        "student": {"delta_logp": float(np.mean(own)), "ci95": stats.mean_ci95(own)[1], "per_replicate": own},
        "control": {"delta_logp": float(np.mean(ctrl)), "ci95": stats.mean_ci95(ctrl)[1], "per_replicate": ctrl,
                    "students": [f"{c}-r{r}" for c in cfg.controls for r in range(n_r)]},
        # the headline: the trait's specific effect over replicates, in the training frame and the held-out one
        "effect": {**pre["effects"][x], "frame": "prefill", "n_replicates": n_r,
                   "control": "mean of the same replicate's other traits' students"},
        "held_out": {**held["effects"][x], "frame": HELD_OUT, "n_replicates": n_r,
                     "pooled": held["pooled"], "permutation": held.get("permutation")},
        "permutation": pre.get("permutation"),
        "distribution": {
            "words": words,
            "teacher": dist_teacher.tolist(),
            "student": dist_student.tolist(),
            "control": dist_control.tolist(),
            "r_teacher_student": float(np.corrcoef(dist_teacher, dist_student)[0, 1]),
            "r_teacher_control": float(np.corrcoef(dist_teacher, dist_control)[0, 1]),
        },
        "sampled_rate": rates,
        "cross_family": {**cross, "within_minus_cross": within_minus_cross(frames, cross["frames"])} if cross
        else cross,
        "data": {t: {k: m[k] for k in ("n_kept", "kept_fraction", "rejected", "completion_tokens",
                                      "seconds_this_session")} for t, m in data_metrics.items()},
        "students": {k: {kk: v.get(kk) for kk in ("steps", "n_examples", "first_loss", "last_loss",
                                                  "train_tokens_per_s", "seconds_this_session")}
                     for k, v in student_metrics.items()},
    }  # fmt: skip


def within_minus_cross(within: dict[str, Any], cross: dict[str, Any]) -> dict[str, Any]:
    """Per frame, the paired test of the same data's two kinds of students: per replicate, the pooled specific
    effect of the same-initialisation students minus that of the other family's; mean, 95% t-interval and the
    two-sided t p over replicates."""
    out = {}
    for f, fr in within.items():
        d = np.asarray(fr["pooled"]["per_replicate"], float) - np.asarray(
            cross[f]["pooled"]["per_replicate"], float
        )
        mean, ci, p = stats.two_sided_t(list(d))
        out[f] = {"delta_logp": mean, "ci95": ci, "p_value_two_sided": p, "per_replicate": d.tolist()}
    return out


def _ci_or_questions(per_replicate: np.ndarray, per_question: list[np.ndarray]) -> list[float]:
    """t over replicates, or with one replicate the bootstrap over its questions."""
    if len(per_replicate) > 1:
        return stats.mean_ci95(list(per_replicate))[1]
    return stats.bootstrap_ci95(per_question[0])


def cross_family(cfg: Design, base: Path, evs: dict[tuple[str, int], Path]) -> dict[str, Any]:
    """The cross-family students' specific effects (same units, same statistics as the study's, every frame):
    number tokens only, so a shared initialisation is missing."""
    frames = {f: specific_effects(unit_matrix(cfg.traits, cfg.replicates, base, evs, f), cfg.traits)
              for f in FRAMES}  # fmt: skip
    return {"model": cfg.cross_family, "frames": frames, "effect": frames["prefill"]["effects"][cfg.trait],
            "held_out": frames[HELD_OUT]["effects"][cfg.trait]}  # fmt: skip
