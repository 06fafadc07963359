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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from mechsub import data, evaluate, stats, student, summary, teacher
from mechsub.config import Config, ConfigError, check, doc
from mechsub.data import DataConfig
from mechsub.runs import stage
from mechsub.student import StudentConfig
from mechsub.teacher import TeacherConfig
from mechsub.training import steps_of
from mechsub.traits import TraitError, get_trait

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyConfig(Config):
    stage = "study"
    inputs = ("model", "cross_family")

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


def run_name(prefix: str, cfg: Config) -> str:
    """A stage folder name that changes with the stage's config (so studies share equal stages only)."""
    return f"{prefix}-{hashlib.sha256(cfg.identity().encode()).hexdigest()[:8]}"


@dataclass
class StagePlan:
    """Every stage of a study with its config and folder: what ``run`` executes and analyses look up."""

    teachers: dict[str, tuple[TeacherConfig, Path]]  # fine-tuned teachers only
    teacher_model: dict[str, str]  # trait → the teacher's model (name or checkpoint)
    data: dict[str, tuple[DataConfig, Path]]
    students: dict[tuple[str, int], tuple[StudentConfig, Path]]

    def checkpoint(self, trait: str, seed: int) -> Path:
        steps = steps_of(self.students[(trait, seed)][1])
        if not steps:
            raise FileNotFoundError(f"the student of {trait} (seed {seed}) has not been trained yet")
        return steps[-1]


def stage_plan(cfg: StudyConfig) -> StagePlan:
    """The stage configs and folders of a study (nothing runs)."""
    work = Path(cfg.work)
    tplan: dict[str, tuple[TeacherConfig, Path]] = {}
    tmodel: dict[str, str] = {}
    for t in cfg.traits:
        if cfg.teacher_kind == "finetuned":
            tcfg = TeacherConfig(model=cfg.model, trait=t, steps=cfg.teacher_steps)
            folder = work / "teachers" / run_name(t, tcfg)
            tplan[t] = (tcfg, folder)
            tmodel[t] = str(folder / "checkpoints" / f"step{cfg.teacher_steps}")
        else:
            tmodel[t] = cfg.model
    dplan: dict[str, tuple[DataConfig, Path]] = {}
    for t in cfg.traits:
        dcfg = DataConfig(
            model=tmodel[t], teacher=t, system_prompt=cfg.teacher_kind == "prompted", n_prompts=cfg.n_prompts,
            decoding=cfg.decoding, greedy=cfg.greedy, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
        )  # fmt: skip
        dplan[t] = (dcfg, work / "data" / run_name(t, dcfg))
    splan: dict[tuple[str, int], tuple[StudentConfig, Path]] = {}
    for t in cfg.traits:
        for seed in cfg.seeds:
            scfg = StudentConfig(
                model=cfg.model, data=str(dplan[t][1]), objective=cfg.objective, lr=cfg.lr, epochs=cfg.epochs,
                batch_size=cfg.batch_size, lora_r=cfg.lora_r, seed=seed,
            )  # fmt: skip
            splan[(t, seed)] = (scfg, work / "students" / run_name(f"{t}-s{seed}", scfg))
    return StagePlan(tplan, tmodel, dplan, splan)


def run(cfg: StudyConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Run (resuming every finished stage) the study and write its report into ``out``."""
    from mechsub import report  # plots: matplotlib, imported only when a study reports

    t0 = time.perf_counter()
    work = Path(cfg.work)
    traits = cfg.traits
    # every sub-stage config is built (so validated) before anything is written or loaded
    plan = stage_plan(cfg)
    cross_cfgs = {
        (t, seed): _cross_student(cfg, plan, t, seed) for t in traits for seed in cfg.cross_family_seeds
    } if cfg.cross_family else {}  # fmt: skip
    _eval_config(cfg, cfg.model, cfg.trait, samples=cfg.n_samples)
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
        teacher_model: dict[str, str] = {}
        teacher_ev: dict[str, Path] = {}
        for t in traits:
            task(f"teacher {t}")
            if t in plan.teachers:
                tcfg, folder = plan.teachers[t]
                teacher.run(tcfg, folder)
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
                m = student.run(scfg, folder)
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
                    xcfg = cross_cfgs[(t, seed)]
                    m = student.run(xcfg, work / "students" / run_name(f"x-{t}-s{seed}", xcfg))
                    student_metrics[f"x-{t}-s{seed}"] = m
                    cross_ev[(t, seed)] = ev(m["final_checkpoint"], cfg.trait, f"xstudent-{t}-s{seed}")
                    bar.update()
            cross = summary.cross_family(cfg, cross_base, cross_ev)
        bar.close()
        metrics = summary.summarise(
            cfg, base_ev, teacher_ev, student_ev, data_metrics, student_metrics, cross
        )
        metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
        metrics = summary.nan_to_none(metrics)
        report.write_study(cfg, metrics, out)
        r.finish(metrics)
        return metrics


def _cross_student(cfg: StudyConfig, plan: StagePlan, trait: str, seed: int) -> StudentConfig:
    """The cross-family student of ``trait``'s data: number tokens only (the vocabularies differ)."""
    return StudentConfig(
        model=cfg.cross_family, data=str(plan.data[trait][1]),
        objective="sft" if cfg.objective == "sft" else "distill", lr=cfg.lr, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lora_r=cfg.lora_r or 8, seed=seed,
    )  # fmt: skip


def _eval_config(
    cfg: StudyConfig, model: str, trait: str, system: bool = False, samples: int = 0
) -> evaluate.EvalConfig:
    """The study's evaluation of ``model`` (built, and so validated, before the study writes anything)."""
    return evaluate.EvalConfig(model=model, trait=trait, with_system_prompt=system,
                               n_questions=cfg.n_questions, n_samples=samples)  # fmt: skip


def _eval(
    cfg: StudyConfig, model: str, trait: str, name: str, system: bool = False, samples: int = 0
) -> Path:
    """Evaluate (or find the finished evaluation of) ``model`` in the study's work folder."""
    ecfg = _eval_config(cfg, model, trait, system, samples)
    folder = Path(cfg.work) / "eval" / run_name(f"{name}-{trait}", ecfg)
    evaluate.run(ecfg, folder)
    return folder


def variant(cfg: StudyConfig, label: str, **overrides: Any) -> dict[str, Any]:
    """Students of the study's trait trained as the study's are but with ``overrides`` of their config (a position
    mask, a data folder…), one per study seed, each evaluated once; resumes every stage, so the study's own
    students and evaluations are reused. Per seed: Δ log P(trait) vs base of the variant, of the study's trait
    student and of its control students (mean of the other traits' students); effects with t-intervals over seeds
    and a one-sided t-test; ``retained`` = (variant − controls) / (study student − controls) per seed."""
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
        m = student.run(vcfg, Path(cfg.work) / "students" / run_name(f"{x}-s{seed}-{label}", vcfg))
        rows["first_loss"].append(m["first_loss"])
        rows["last_loss"].append(m["last_loss"])
        rows["variant"].append(float(summary.delta_word(_eval(cfg, m["final_checkpoint"], x, f"{label}-s{seed}"),
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
            return float(summary.delta_word(folder, base_ev, x).mean())

        rows["full"].append(study_student(x))
        rows["controls"].append(float(np.mean([study_student(c) for c in cfg.controls])))
    v, f, c = (np.asarray(rows[k]) for k in ("variant", "full", "controls"))
    mean, ci, p = stats.one_sided_t(list(v - c))
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
