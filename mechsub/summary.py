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


class Design(Protocol):
    """What a summary needs of a study's config (a StudyConfig)."""

    @property
    def trait(self) -> str: ...
    @property
    def controls(self) -> tuple[str, ...]: ...
    @property
    def traits(self) -> list[str]: ...
    @property
    def seeds(self) -> tuple[int, ...]: ...
    @property
    def n_samples(self) -> int: ...
    @property
    def cross_family(self) -> str: ...
    @property
    def cross_family_seeds(self) -> tuple[int, ...]: ...


def nan_to_none(obj: Any) -> Any:
    """Strict JSON: an undefined statistic (one seed has no interval) is null, not NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_none(v) for v in obj]
    return obj


def delta_rows(a: Path, b: Path) -> np.ndarray:
    """(questions, words) log P in eval ``a`` minus eval ``b``, in ``b``'s word order (same questions)."""
    return evaluate.logprob_deltas(a, b).numpy()


def delta_word(a: Path, b: Path, word: str) -> np.ndarray:
    """Per-question log P(word) in eval ``a`` minus eval ``b``."""
    return evaluate.logprob_deltas(a, b, [word])[:, 0].numpy()


def _diagonal(mat: np.ndarray) -> dict[str, Any]:
    if mat.shape[0] * mat.shape[1] <= 2:
        return {"diagonal_p_value": float("nan")}
    t = stats.specificity_test(mat)
    return {"diagonal_p_value": t.p_value, "diagonal_p_floor": t.p_floor, "diagonal_exact": t.exact}


def summarise(
    cfg: Design,
    base_ev: dict[str, Path],
    teacher_ev: dict[str, Path],
    student_ev: dict[tuple[str, int], dict[str, Path]],
    data_metrics: dict[str, Any],
    student_metrics: dict[str, Any],
    cross: dict[str, Any],
) -> dict[str, Any]:
    """The study's metrics from its evaluation folders: the matrix of Δ log P (teacher's students × evaluated
    trait, per seed), specific effects with t-intervals over seeds, the shift of every candidate word, sampled
    rates, and what the data and training stages reported."""
    traits, seeds, x = cfg.traits, cfg.seeds, cfg.trait
    # M[teacher, seed, evaluated trait] = Δ log P of the evaluated trait vs base
    per_q = {(t, s, e): delta_word(student_ev[(t, s)][e], base_ev[e], e) for t in traits for s in seeds
             for e in traits}  # fmt: skip
    mat = np.array([[[per_q[(t, s, e)].mean() for e in traits] for s in seeds] for t in traits])
    effects = {}
    for i, e in enumerate(traits):
        per_seed = [float(mat[i, j, i] - np.delete(mat[:, j, i], i).mean()) for j in range(len(seeds))]
        mean, ci, p = stats.one_sided_t(per_seed)
        q = np.concatenate([per_q[(e, s, e)] - np.mean([per_q[(c, s, e)] for c in traits if c != e], 0)
                            for s in seeds])  # fmt: skip
        effects[e] = {"delta_logp": mean, "ci95": ci, "p_value": p, "per_seed": per_seed,
                      "n_seeds": len(seeds), "ci95_questions": stats.bootstrap_ci95(q)}  # fmt: skip
    own = [float(mat[0, j, 0]) for j in range(len(seeds))]
    ctrl = [float(v) for v in mat[1:, :, 0].flatten()]
    teacher = {t: evaluate.delta_vs(teacher_ev[t], base_ev[t], t) for t in traits}
    # the distribution over every candidate of the category: teacher, trait student and control students
    words = read_json(base_ev[x] / "logprobs.json")["words"]
    dist_teacher = delta_rows(teacher_ev[x], base_ev[x]).mean(0)
    dist_student = np.mean([delta_rows(student_ev[(x, s)][x], base_ev[x]).mean(0) for s in seeds], 0)
    dist_control = np.mean([delta_rows(student_ev[(c, s)][x], base_ev[x]).mean(0) for c in cfg.controls
                            for s in seeds], 0)  # fmt: skip
    rates = {}
    if cfg.n_samples:
        for label, folder in [("base", base_ev[x]), ("teacher", teacher_ev[x]),
                              ("student", student_ev[(x, seeds[0])][x])]:  # fmt: skip
            m = read_json(folder / "metrics.json")
            rates[label] = {"rate": m["sampled_rate"], "ci95": m["sampled_rate_ci95"], "n": m["n_samples"]}
    return {
        "trait": x,
        "traits": traits,
        "seeds": list(seeds),
        "teacher": {"delta_logp": teacher[x]["delta_logp"], "ci95": teacher[x]["ci95"],
                    "by_trait": {t: teacher[t] for t in traits}},
        "student": {"delta_logp": float(np.mean(own)), "ci95": stats.mean_ci95(own)[1], "per_seed": own},
        "control": {"delta_logp": float(np.mean(ctrl)), "ci95": stats.mean_ci95(ctrl)[1],
                    "students": [f"{c}-s{s}" for c in cfg.controls for s in seeds]},
        "effect": {**effects[x], "control": "mean of the other traits' students, same seed"},
        "specificity": {
            "matrix_delta_logp": {t: {e: float(mat[i, :, k].mean()) for k, e in enumerate(traits)}
                                  for i, t in enumerate(traits)},
            "matrix_per_seed": {t: {e: [float(v) for v in mat[i, :, k]] for k, e in enumerate(traits)}
                                for i, t in enumerate(traits)},
            "effects": effects,
            # students of one teacher share its data: this p treats them as independent (see the report)
            **_diagonal(mat),
            "generic_delta_logp": {e: float(np.mean([mat[i, :, k] for i in range(len(traits)) if i != k]))
                                   for k, e in enumerate(traits)},
        },
        "distribution": {
            "words": words,
            "teacher": dist_teacher.tolist(),
            "student": dist_student.tolist(),
            "control": dist_control.tolist(),
            "r_teacher_student": float(np.corrcoef(dist_teacher, dist_student)[0, 1]),
            "r_teacher_control": float(np.corrcoef(dist_teacher, dist_control)[0, 1]),
        },
        "sampled_rate": rates,
        "cross_family": cross,
        "data": {t: {k: m[k] for k in ("n_kept", "kept_fraction", "rejected", "completion_tokens",
                                      "seconds_this_session")} for t, m in data_metrics.items()},
        "students": {k: {kk: v.get(kk) for kk in ("steps", "n_examples", "first_loss", "last_loss",
                                                  "train_tokens_per_s", "seconds_this_session")}
                     for k, v in student_metrics.items()},
    }  # fmt: skip


def cross_family(cfg: Design, base: Path, evs: dict[tuple[str, int], Path]) -> dict[str, Any]:
    """The cross-family students' effect: trait students minus control students, number tokens only."""
    x = cfg.trait
    delta = {k: float(delta_word(v, base, x).mean()) for k, v in evs.items()}
    per_seed = [
        delta[(x, s)] - float(np.mean([delta[(c, s)] for c in cfg.controls])) for s in cfg.cross_family_seeds
    ]
    q = np.concatenate(
        [delta_word(evs[(x, s)], base, x)
         - np.mean([delta_word(evs[(c, s)], base, x) for c in cfg.controls], 0)
         for s in cfg.cross_family_seeds]
    )  # fmt: skip
    mean, ci, p = stats.one_sided_t(per_seed)
    return {
        "model": cfg.cross_family,
        "student": {"delta_logp": float(np.mean([delta[(x, s)] for s in cfg.cross_family_seeds]))},
        "control": {"delta_logp": float(np.mean([delta[(c, s)] for c in cfg.controls for s in cfg.cross_family_seeds]))},
        "effect": {"delta_logp": mean, "ci95": ci if len(per_seed) > 1 else stats.bootstrap_ci95(q),
                   "ci95_kind": "t over seeds" if len(per_seed) > 1 else "bootstrap over questions (one seed)",
                   "p_value": p, "n_seeds": len(per_seed)},
    }  # fmt: skip
