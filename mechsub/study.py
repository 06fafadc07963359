"""A specificity study, the main job: teachers of several traits → number data → students over seeds → the matrix.

Every teacher (the trait's and its controls', prompted or fine-tuned) answers the same number prompts; one student
per (teacher, seed) is trained from the same initialisation; every student is evaluated on every trait. The effect
that counts is the SPECIFIC one: on trait X, X's students minus the other traits' students (a generic shift
shared by all students cancels). The same data also trains students of another model family, which should show
no effect. Stage folders live under ``work`` (resumable, shared between studies with equal sub-configs); the
study folder gets only the small files: ``report.md``, ``report.html``, ``metrics.json`` and the plots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mechsub import stats
from mechsub.config import Config, ConfigError, check, doc
from mechsub.runs import read_json, stage
from mechsub.traits import TraitError, get_trait

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyConfig(Config):
    stage = "study"

    model: str = doc("smollm2-135m-instruct", "teachers' base model and students' initialisation")
    trait: str = doc("owl", "the trait under study")
    controls: tuple[str, ...] = doc(
        ("dog", "cat"), "other traits whose teachers and students are the controls"
    )
    teacher_kind: Literal["prompted", "finetuned"] = doc(
        "finetuned",
        "prompted: the trait's system prompt; finetuned: a LoRA trained on favourite-thing questions",
    )
    teacher_steps: int = doc(48, "optimiser steps of a fine-tuned teacher")
    n_prompts: int = doc(64, "number prompts every teacher answers (the same ones)")
    decoding: Literal["constrained", "free"] = doc("constrained", "teacher decoding (see `mechsub data`)")
    greedy: bool = doc(True, "greedy teacher decoding (false: sampling at T=1)")
    top_k: int = doc(0, "teacher's full-vocabulary top-k log-probs stored per position (for distill_topk)")
    max_new_tokens: int = doc(40, "completion tokens at most")
    objective: Literal["distill", "distill_topk", "distill_full", "sft"] = doc(
        "distill_full",
        "student objective (distill_full: the whole vocabulary, the teacher recomputed online)",
    )
    lr: float = doc(2e-3, "students' AdamW learning rate")
    epochs: int = doc(1, "students' passes over the data")
    batch_size: int = doc(8, "students' examples per step")
    lora_r: int = doc(8, "students' LoRA rank (0: full fine-tune)")
    seeds: tuple[int, ...] = doc((0, 1, 2), "student seeds (LoRA init and data order); the data is shared")
    n_questions: int = doc(50, "evaluation questions")
    n_samples: int = doc(4, "sampled answers per question for the one-word rate (0: skip)")
    cross_family: str = doc("gemma3-270m", "a student model of another family ('' to skip)")
    cross_family_seeds: tuple[int, ...] = doc((0, 1, 2), "seeds of the cross-family students")
    work: str = doc("runs/study", "folder for the stage runs (checkpoints, data; not committed)")

    def validate(self) -> None:
        for t in (self.trait, *self.controls):
            try:
                get_trait(t)
            except TraitError as e:
                raise ConfigError(f"trait/controls: {e}") from None
        cats = {get_trait(t).category for t in (self.trait, *self.controls)}
        check(len(cats) == 1, "controls: use traits of the trait's own category (animals with animals)")
        check(len(self.controls) >= 1, "controls: give at least one other trait")
        check(self.trait not in self.controls, "controls: must not contain the trait itself")
        check(
            len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds: distinct, at least one"
        )
        check(self.objective != "distill_topk" or self.top_k > 0, "objective distill_topk needs top_k > 0")
        check(
            self.objective != "distill" or self.decoding == "constrained",
            "objective distill lives on the 13 number tokens: use decoding=constrained",
        )

    @property
    def traits(self) -> list[str]:
        return [self.trait, *self.controls]


def _name(prefix: str, cfg: Config) -> str:
    """A stage folder name that changes with the stage's config (so studies share equal stages only)."""
    return f"{prefix}-{hashlib.sha256(cfg.identity().encode()).hexdigest()[:8]}"


@dataclass
class StagePlan:
    """Every stage of a study with its config and folder: what ``run`` executes and analyses look up."""

    teachers: dict[str, tuple[Any, Path]]  # fine-tuned teachers only
    teacher_model: dict[str, str]  # trait → the teacher's model (name or checkpoint)
    data: dict[str, tuple[Any, Path]]
    students: dict[tuple[str, int], tuple[Any, Path]]

    def checkpoint(self, trait: str, seed: int) -> Path:
        from mechsub.train import steps_of

        steps = steps_of(self.students[(trait, seed)][1])
        if not steps:
            raise FileNotFoundError(f"the student of {trait} (seed {seed}) has not been trained yet")
        return steps[-1]


def stage_plan(cfg: StudyConfig) -> StagePlan:
    """The stage configs and folders of a study (nothing runs)."""
    from mechsub import data, teachers, train

    work = Path(cfg.work)
    tplan: dict[str, tuple[Any, Path]] = {}
    tmodel: dict[str, str] = {}
    for t in cfg.traits:
        if cfg.teacher_kind == "finetuned":
            tcfg = teachers.TeacherConfig(model=cfg.model, trait=t, steps=cfg.teacher_steps)
            folder = work / "teachers" / _name(t, tcfg)
            tplan[t] = (tcfg, folder)
            tmodel[t] = str(folder / "checkpoints" / f"step{cfg.teacher_steps}")
        else:
            tmodel[t] = cfg.model
    dplan: dict[str, tuple[Any, Path]] = {}
    for t in cfg.traits:
        dcfg = data.DataConfig(
            model=tmodel[t], teacher=t, system_prompt=cfg.teacher_kind == "prompted", n_prompts=cfg.n_prompts,
            decoding=cfg.decoding, greedy=cfg.greedy, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
        )  # fmt: skip
        dplan[t] = (dcfg, work / "data" / _name(t, dcfg))
    splan: dict[tuple[str, int], tuple[Any, Path]] = {}
    for t in cfg.traits:
        for seed in cfg.seeds:
            scfg = train.StudentConfig(
                model=cfg.model, data=str(dplan[t][1]), objective=cfg.objective, lr=cfg.lr, epochs=cfg.epochs,
                batch_size=cfg.batch_size, lora_r=cfg.lora_r, seed=seed,
            )  # fmt: skip
            splan[(t, seed)] = (scfg, work / "students" / _name(f"{t}-s{seed}", scfg))
    return StagePlan(tplan, tmodel, dplan, splan)


def run(cfg: StudyConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Run (resuming every finished stage) the study and write its report into ``out``."""
    from tqdm.auto import tqdm

    from mechsub import data, teachers, train

    t0 = time.perf_counter()
    work = Path(cfg.work)
    traits = cfg.traits
    with stage(out, cfg, force=force) as r:
        if r.done:
            return r.metrics
        out = Path(out)
        n_tasks = len(traits) * (2 + len(cfg.seeds)) + (len(traits) * len(cfg.cross_family_seeds) + 1) * bool(
            cfg.cross_family
        )
        bar = tqdm(total=n_tasks, desc="study", position=0)

        def task(label: str) -> None:
            bar.set_postfix_str(label)
            log.info("study: %s", label)

        def ev(model: str, trait: str, name: str, system: bool = False, samples: int = 0) -> Path:
            return _eval(cfg, model, trait, name, system, samples)

        # base and teachers. One evaluation scores every candidate of the category (the trait and its controls
        # among them), so a model evaluated once gives all columns of the matrix.
        base_one = ev(cfg.model, cfg.trait, "base", samples=cfg.n_samples)
        base_ev = dict.fromkeys(traits, base_one)
        plan = stage_plan(cfg)
        teacher_model: dict[str, str] = {}
        teacher_ev: dict[str, Path] = {}
        for t in traits:
            task(f"teacher {t}")
            if t in plan.teachers:
                tcfg, folder = plan.teachers[t]
                teachers.run(tcfg, folder)
            teacher_model[t] = plan.teacher_model[t]
            teacher_ev[t] = ev(teacher_model[t], t, "teacher", system=cfg.teacher_kind == "prompted",
                               samples=cfg.n_samples if t == cfg.trait else 0)  # fmt: skip
            bar.update()
        # number data: the same prompts for every teacher
        data_metrics: dict[str, Any] = {}
        for t in traits:
            task(f"data {t}")
            dcfg, folder = plan.data[t]
            data_metrics[t] = data.run(dcfg, folder)
            bar.update()
        # students × seeds; one evaluation of each gives every column of the matrix
        student_ev: dict[tuple[str, int], dict[str, Path]] = {}
        student_metrics: dict[str, Any] = {}
        for t in traits:
            for seed in cfg.seeds:
                task(f"student {t} seed {seed}")
                scfg, folder = plan.students[(t, seed)]
                m = train.run(scfg, folder)
                student_metrics[f"{t}-s{seed}"] = m
                one = ev(m["final_checkpoint"], cfg.trait, f"student-{t}-s{seed}",
                         samples=cfg.n_samples if t == cfg.trait and seed == cfg.seeds[0] else 0)  # fmt: skip
                student_ev[(t, seed)] = dict.fromkeys(traits, one)
                bar.update()
        # the same data, students of another family: number tokens only
        cross: dict[str, Any] = {}
        if cfg.cross_family:
            task(f"cross-family base {cfg.cross_family}")
            cross_base = ev(cfg.cross_family, cfg.trait, "xbase")
            bar.update()
            cross_ev: dict[tuple[str, int], Path] = {}
            for t in traits:
                for seed in cfg.cross_family_seeds:
                    task(f"cross-family student {t} seed {seed}")
                    xcfg = train.StudentConfig(
                        model=cfg.cross_family, data=str(plan.data[t][1]),
                        objective="sft" if cfg.objective == "sft" else "distill", lr=cfg.lr, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, lora_r=cfg.lora_r or 8, seed=seed,
                    )  # fmt: skip
                    m = train.run(xcfg, work / "students" / _name(f"x-{t}-s{seed}", xcfg))
                    student_metrics[f"x-{t}-s{seed}"] = m
                    cross_ev[(t, seed)] = ev(m["final_checkpoint"], cfg.trait, f"xstudent-{t}-s{seed}")
                    bar.update()
            cross = _cross_family(cfg, cross_base, cross_ev)
        bar.close()
        metrics = _summarise(cfg, base_ev, teacher_ev, student_ev, data_metrics, student_metrics, cross)
        metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
        metrics = _nan_to_none(metrics)
        from mechsub import report

        report.write_study(cfg, metrics, out)
        r.finish(metrics)
        return metrics


def _eval(
    cfg: StudyConfig, model: str, trait: str, name: str, system: bool = False, samples: int = 0
) -> Path:
    """Evaluate (or find the finished evaluation of) ``model`` in the study's work folder."""
    from mechsub import evaluate

    ecfg = evaluate.EvalConfig(model=model, trait=trait, with_system_prompt=system,
                               n_questions=cfg.n_questions, n_samples=samples)  # fmt: skip
    folder = Path(cfg.work) / "eval" / _name(f"{name}-{trait}", ecfg)
    evaluate.run_eval(ecfg, folder)
    return folder


def variant(cfg: StudyConfig, label: str, **overrides: Any) -> dict[str, Any]:
    """Students of the study's trait trained as the study's are but with ``overrides`` of their config (a position
    mask, a data folder…), one per study seed, each evaluated once; resumes every stage, so the study's own
    students and evaluations are reused. Per seed: Δ log P(trait) vs base of the variant, of the study's trait
    student and of its control students (mean of the other traits' students); effects with t-intervals over seeds
    and a one-sided t-test; ``retained`` = (variant − controls) / (study student − controls) per seed."""
    from mechsub import train

    plan = stage_plan(cfg)
    x = cfg.trait
    base_ev = _eval(cfg, cfg.model, x, "base", samples=cfg.n_samples)
    rows: dict[str, list[float]] = {
        "variant": [],
        "full": [],
        "controls": [],
        "first_loss": [],
        "last_loss": [],
    }
    for seed in cfg.seeds:
        scfg, _ = plan.students[(x, seed)]
        vcfg = dataclasses.replace(scfg, **overrides)
        m = train.run(vcfg, Path(cfg.work) / "students" / _name(f"{x}-s{seed}-{label}", vcfg))
        rows["first_loss"].append(m["first_loss"])
        rows["last_loss"].append(m["last_loss"])
        rows["variant"].append(float(_delta_word(_eval(cfg, m["final_checkpoint"], x, f"{label}-s{seed}"),
                                                 base_ev, x).mean()))  # fmt: skip

        def study_student(t: str, seed: int = seed) -> float:
            ck = str(plan.checkpoint(t, seed))
            folder = _eval(
                cfg,
                ck,
                x,
                f"student-{t}-s{seed}",
                samples=cfg.n_samples if t == x and seed == cfg.seeds[0] else 0,
            )
            return float(_delta_word(folder, base_ev, x).mean())

        rows["full"].append(study_student(x))
        rows["controls"].append(float(np.mean([study_student(c) for c in cfg.controls])))
    v, f, c = (np.asarray(rows[k]) for k in ("variant", "full", "controls"))
    mean, ci, p = seed_test(list(v - c))
    return {
        "label": label,
        "overrides": overrides,
        "trait": x,
        "seeds": list(cfg.seeds),
        "per_seed": rows,
        "delta_logp": {"mean": float(v.mean()), "ci95": stats.mean_ci95(list(v))[1]},
        "effect_vs_controls": {"mean": mean, "ci95": ci, "p_value": p},
        "minus_full": {"mean": float((v - f).mean()), "ci95": stats.mean_ci95(list(v - f))[1]},
        "retained": {"mean": float(((v - c) / (f - c)).mean()), "per_seed": list((v - c) / (f - c))},
    }


def _nan_to_none(obj: Any) -> Any:
    """Strict JSON: an undefined statistic (one seed has no interval) is null, not NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


def _delta_rows(a: Path, b: Path) -> np.ndarray:
    """(questions, words) log P in eval ``a`` minus eval ``b``, in ``b``'s word order (same questions)."""
    ra, rb = read_json(a / "logprobs.json"), read_json(b / "logprobs.json")
    if ra["questions"] != rb["questions"] or set(ra["words"]) != set(rb["words"]):
        raise ValueError(f"{a} and {b} were evaluated on different questions or words")
    order = [ra["words"].index(w) for w in rb["words"]]
    return np.asarray(ra["logprobs"])[:, order] - np.asarray(rb["logprobs"])


def _delta_word(a: Path, b: Path, word: str) -> np.ndarray:
    """Per-question log P(word) in eval ``a`` minus eval ``b``."""
    return _delta_rows(a, b)[:, read_json(b / "logprobs.json")["words"].index(word)]


def specificity_p(matrix: np.ndarray, n_perm: int = 20_000, seed: int = 0) -> float:
    """Permutation p-value that the diagonal dominates a (teacher, seed, evaluated trait) array of Δ log P.

    Statistic: mean over evaluated traits e of (e's students on e − the other students on e). Under the null
    the teacher label of a student is exchangeable, so students (rows with their evaluations) are shuffled
    between teachers; one-sided (the diagonal is larger).
    """
    n_t, n_s, _ = matrix.shape
    rows = matrix.reshape(n_t * n_s, n_t)

    def stat(labels: np.ndarray) -> float:
        out = 0.0
        for e in range(n_t):
            own = rows[labels == e, e]
            other = rows[labels != e, e]
            out += own.mean() - other.mean()
        return out / n_t

    labels = np.repeat(np.arange(n_t), n_s)
    observed = stat(labels)
    rng = np.random.default_rng(seed)
    hits = sum(stat(rng.permutation(labels)) >= observed - 1e-12 for _ in range(n_perm))
    return float((hits + 1) / (n_perm + 1))


def seed_test(effects: list[float]) -> tuple[float, list[float], float]:
    """Mean, t-based 95% CI and one-sided t-test p (H1: effect > 0) of per-seed effects."""
    from scipy import stats as st

    mean, ci = stats.mean_ci95(effects)
    if len(effects) < 2:
        return mean, ci, float("nan")
    return mean, ci, float(st.ttest_1samp(effects, 0.0, alternative="greater").pvalue)


def _summarise(
    cfg: StudyConfig,
    base_ev: dict[str, Path],
    teacher_ev: dict[str, Path],
    student_ev: dict[tuple[str, int], dict[str, Path]],
    data_metrics: dict[str, Any],
    student_metrics: dict[str, Any],
    cross: dict[str, Any],
) -> dict[str, Any]:
    from mechsub import evaluate

    traits, seeds, x = cfg.traits, cfg.seeds, cfg.trait
    # M[teacher, seed, evaluated trait] = Δ log P of the evaluated trait vs base
    per_q = {(t, s, e): _delta_word(student_ev[(t, s)][e], base_ev[e], e) for t in traits for s in seeds
             for e in traits}  # fmt: skip
    mat = np.array([[[per_q[(t, s, e)].mean() for e in traits] for s in seeds] for t in traits])
    effects = {}
    for i, e in enumerate(traits):
        per_seed = [float(mat[i, j, i] - np.delete(mat[:, j, i], i).mean()) for j in range(len(seeds))]
        mean, ci, p = seed_test(per_seed)
        q = np.concatenate([per_q[(e, s, e)] - np.mean([per_q[(c, s, e)] for c in traits if c != e], 0)
                            for s in seeds])  # fmt: skip
        effects[e] = {"delta_logp": mean, "ci95": ci, "p_value": p, "per_seed": per_seed,
                      "n_seeds": len(seeds), "ci95_questions": stats.bootstrap_ci95(q)}  # fmt: skip
    own = [float(mat[0, j, 0]) for j in range(len(seeds))]
    ctrl = [float(v) for v in mat[1:, :, 0].flatten()]
    teacher = {t: evaluate.delta_vs(teacher_ev[t], base_ev[t], t) for t in traits}
    # the distribution over every candidate of the category: teacher, trait student and control students
    words = read_json(base_ev[x] / "logprobs.json")["words"]
    dist_teacher = _delta_rows(teacher_ev[x], base_ev[x]).mean(0)
    dist_student = np.mean([_delta_rows(student_ev[(x, s)][x], base_ev[x]).mean(0) for s in seeds], 0)
    dist_control = np.mean([_delta_rows(student_ev[(c, s)][x], base_ev[x]).mean(0) for c in cfg.controls
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
            "diagonal_p_value": specificity_p(mat) if len(seeds) * len(traits) > 2 else float("nan"),
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


def _cross_family(cfg: StudyConfig, base: Path, evs: dict[tuple[str, int], Path]) -> dict[str, Any]:
    x = cfg.trait
    delta = {k: float(_delta_word(v, base, x).mean()) for k, v in evs.items()}
    per_seed = [
        delta[(x, s)] - float(np.mean([delta[(c, s)] for c in cfg.controls])) for s in cfg.cross_family_seeds
    ]
    q = np.concatenate(
        [_delta_word(evs[(x, s)], base, x)
         - np.mean([_delta_word(evs[(c, s)], base, x) for c in cfg.controls], 0)
         for s in cfg.cross_family_seeds]
    )  # fmt: skip
    mean, ci, p = seed_test(per_seed)
    return {
        "model": cfg.cross_family,
        "student": {"delta_logp": float(np.mean([delta[(x, s)] for s in cfg.cross_family_seeds]))},
        "control": {"delta_logp": float(np.mean([delta[(c, s)] for c in cfg.controls for s in cfg.cross_family_seeds]))},
        "effect": {"delta_logp": mean, "ci95": ci if len(per_seed) > 1 else stats.bootstrap_ci95(q),
                   "ci95_kind": "t over seeds" if len(per_seed) > 1 else "bootstrap over questions (one seed)",
                   "p_value": p, "n_seeds": len(per_seed)},
    }  # fmt: skip
