"""A specificity study, the main job: replicated teachers of several traits → number data → students → the matrix.

The independent unit is a teacher with its own data: for every trait and replicate r, a teacher (seed r, its own
draw of training questions) answers its own number prompts (prompt seed r, shared by the traits of replicate r)
and one student (seed r) is trained on them from the same initialisation. Every student is evaluated on every
trait in three answer frames (the teacher's training template and two it never saw). The effect that counts is
the SPECIFIC one: on trait X, X's student minus the same replicate's other students (a generic shift shared by
all students cancels); intervals are over replicates and the diagonal is tested by an exact permutation of the
trait labels of the teachers within each replicate. The same data also trains students of another model family, which should show no
effect. Stage folders live under ``work`` (resumable, shared between studies with equal sub-configs: a study with
fewer replicates reuses the first ones); the study folder gets only the small files: ``report.md``,
``report.html``, ``metrics.json`` and the plots.
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
    inputs = ("model", "cross_family", "questions")

    model: str = doc("smollm2-135m-instruct", "teachers' base model and students' initialisation")
    trait: str = doc("owl", "the trait whose effect is the headline (every trait gets its own row)")
    controls: tuple[str, ...] = doc(
        ("dog", "cat", "lion"), "the other traits: their teachers and students are the trait's controls"
    )
    replicates: int = doc(
        2,
        "independent replicates: replicate r has, per trait, its own teacher (seed r, its own draw of training "
        "questions), its own number prompts (prompt seed r, shared by the traits of that replicate) and its own "
        "student (seed r). Effects and intervals are over replicates; the permutation test moves the trait "
        "labels of the teachers within each replicate: its floor is 1/(traits!)^replicates",
    )
    teacher_kind: Literal["prompted", "finetuned"] = doc(
        "finetuned",
        "prompted: the trait's system prompt; finetuned: a LoRA trained on favourite-thing questions",
    )
    teacher_steps: int = doc(48, "optimiser steps of a fine-tuned teacher")
    n_prompts: int = doc(64, "number prompts every teacher of a replicate answers (the same ones)")
    decoding: Literal["constrained", "free"] = doc("constrained", "teacher decoding (see `mechsub data`)")
    greedy: bool = doc(True, "greedy teacher decoding (false: sampling at T=1)")
    top_k: int = doc(0, "teacher's full-vocabulary top-k log-probs stored per position (for distill_topk)")
    max_new_tokens: int = doc(40, "completion tokens at most")
    objective: Literal["distill", "distill_topk", "distill_full", "distill_full_notrait", "sft"] = doc(
        "distill_full_notrait",
        "student objective (distill_full_notrait: the whole vocabulary but every trait word's first token, "
        "renormalised, so the trait word's own logit cannot be copied; see `mechsub student`)",
    )
    lr: float = doc(2e-3, "students' AdamW learning rate")
    epochs: int = doc(1, "students' passes over the data")
    batch_size: int = doc(8, "students' examples per step")
    lora_r: int = doc(8, "students' LoRA rank (0: full fine-tune)")
    lora_alpha: int = doc(16, "students' LoRA alpha (the update is scaled by alpha / rank)", optional=True)
    n_questions: int = doc(50, "evaluation questions (of the built-in 50, or of `questions`)")
    questions: str = doc(
        "", "a question file (JSON list or TOML `questions = [...]`) replacing the built-in 50", optional=True
    )
    n_samples: int = doc(4, "sampled answers per question for the one-word rate (0: skip)")
    cross_family: str = doc("gemma3-270m", "a student model of another family ('' to skip)")
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
        check(
            self.trait not in self.controls and len(set(self.controls)) == len(self.controls),
            "controls: distinct traits, not the trait itself",
        )
        check(self.replicates >= 1, "replicates: at least 1")
        check(self.objective != "distill_topk" or self.top_k > 0, "objective distill_topk needs top_k > 0")
        check(
            self.objective != "distill" or self.decoding == "constrained",
            "objective distill lives on the 13 number tokens: use decoding=constrained",
        )

    @property
    def traits(self) -> list[str]:
        return [self.trait, *self.controls]

    @property
    def units(self) -> list[Unit]:
        """Every independent teacher of the design: (trait, replicate)."""
        return [(t, r) for t in self.traits for r in range(self.replicates)]


#: an independent unit of a study: a trait's teacher of one replicate, with its own data and student
Unit = tuple[str, int]


def run_name(prefix: str, cfg: Config) -> str:
    """A stage folder name that changes with the stage's config (so studies share equal stages only)."""
    return f"{prefix}-{hashlib.sha256(cfg.identity().encode()).hexdigest()[:8]}"


@dataclass
class StagePlan:
    """Every stage of a study with its config and folder, per unit (trait, replicate): what ``run`` executes and
    analyses look up."""

    teachers: dict[Unit, tuple[TeacherConfig, Path]]  # fine-tuned teachers only
    teacher_model: dict[Unit, str]  # unit → the teacher's model (name or checkpoint)
    data: dict[Unit, tuple[DataConfig, Path]]
    students: dict[Unit, tuple[StudentConfig, Path]]

    def checkpoint(self, trait: str, replicate: int = 0) -> Path:
        steps = steps_of(self.students[(trait, replicate)][1])
        if not steps:
            raise FileNotFoundError(
                f"the student of {trait} (replicate {replicate}) has not been trained yet"
            )
        return steps[-1]


def _suffix(r: int) -> str:
    return f"-r{r}" if r else ""  # replicate 0 keeps the folder names of single-teacher studies


def stage_plan(cfg: StudyConfig) -> StagePlan:
    """The stage configs and folders of a study (nothing runs)."""
    work = Path(cfg.work)
    tplan: dict[Unit, tuple[TeacherConfig, Path]] = {}
    tmodel: dict[Unit, str] = {}
    dplan: dict[Unit, tuple[DataConfig, Path]] = {}
    splan: dict[Unit, tuple[StudentConfig, Path]] = {}
    for t, r in cfg.units:
        if cfg.teacher_kind == "finetuned":
            tcfg = TeacherConfig(model=cfg.model, trait=t, steps=cfg.teacher_steps, seed=r)
            folder = work / "teachers" / run_name(t + _suffix(r), tcfg)
            tplan[(t, r)] = (tcfg, folder)
            tmodel[(t, r)] = str(folder / "checkpoints" / f"step{cfg.teacher_steps}")
        else:
            tmodel[(t, r)] = cfg.model
        dcfg = DataConfig(
            model=tmodel[(t, r)], teacher=t, system_prompt=cfg.teacher_kind == "prompted", n_prompts=cfg.n_prompts,
            prompt_seed=r, decoding=cfg.decoding, greedy=cfg.greedy, top_k=cfg.top_k,
            max_new_tokens=cfg.max_new_tokens, seed=r,
        )  # fmt: skip
        dplan[(t, r)] = (dcfg, work / "data" / run_name(t + _suffix(r), dcfg))
        scfg = StudentConfig(
            model=cfg.model, data=str(dplan[(t, r)][1]), objective=cfg.objective, lr=cfg.lr, epochs=cfg.epochs,
            batch_size=cfg.batch_size, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, seed=r,
        )  # fmt: skip
        splan[(t, r)] = (scfg, work / "students" / run_name(f"{t}-s{r}", scfg))
    return StagePlan(tplan, tmodel, dplan, splan)


def run(cfg: StudyConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Run (resuming every finished stage) the study and write its report into ``out``."""
    from mechsub import report  # plots: matplotlib, imported only when a study reports

    t0 = time.perf_counter()
    work = Path(cfg.work)
    units = cfg.units
    # every sub-stage config is built (so validated) before anything is written or loaded
    plan = stage_plan(cfg)
    cross_cfgs = {u: _cross_student(cfg, plan, u) for u in units} if cfg.cross_family else {}
    _eval_config(cfg, cfg.model, samples=cfg.n_samples)
    with stage(out, cfg, force=force) as r:
        if r.done:
            return r.metrics
        out = Path(out)
        n_tasks = 1 + 3 * len(units) + (len(units) + 1) * bool(cfg.cross_family)
        bar = tqdm(total=n_tasks, desc="study", position=0)

        def task(label: str) -> None:
            bar.set_postfix_str(label)
            log.info("study: %s", label)

        def ev(model: str, name: str, system: str = "", samples: int = 0) -> Path:
            return _eval(cfg, model, name, system, samples)

        # One evaluation scores every candidate of the category in every frame, so a model evaluated once gives
        # all columns of the matrix.
        task("base")
        base_ev = ev(cfg.model, "base", samples=cfg.n_samples)
        bar.update()
        teacher_ev: dict[Unit, Path] = {}
        data_metrics: dict[str, Any] = {}
        for t, rep in units:
            task(f"teacher {t} r{rep}")
            if (t, rep) in plan.teachers:
                tcfg, folder = plan.teachers[(t, rep)]
                teacher.run(tcfg, folder)
            sample = cfg.n_samples if (t, rep) == units[0] else 0
            teacher_ev[(t, rep)] = ev(plan.teacher_model[(t, rep)], f"teacher-{t}{_suffix(rep)}",
                                      t if cfg.teacher_kind == "prompted" else "", sample)  # fmt: skip
            bar.update()
            task(f"data {t} r{rep}")
            dcfg, folder = plan.data[(t, rep)]
            data_metrics[f"{t}-r{rep}"] = data.run(dcfg, folder)
            bar.update()
        # one student per teacher; one evaluation of each gives every column of the matrix
        student_ev: dict[Unit, Path] = {}
        student_metrics: dict[str, Any] = {}
        for t, rep in units:
            task(f"student {t} r{rep}")
            scfg, folder = plan.students[(t, rep)]
            m = student.run(scfg, folder)
            student_metrics[f"{t}-r{rep}"] = m
            sample = cfg.n_samples if (t, rep) == units[0] else 0
            student_ev[(t, rep)] = ev(m["final_checkpoint"], f"student-{t}-s{rep}", samples=sample)
            bar.update()
        # the same data, students of another family: number tokens only
        cross: dict[str, Any] = {}
        if cfg.cross_family:
            task(f"cross-family base {cfg.cross_family}")
            cross_base = ev(cfg.cross_family, "xbase")
            bar.update()
            cross_ev: dict[Unit, Path] = {}
            for t, rep in units:
                task(f"cross-family student {t} r{rep}")
                xcfg = cross_cfgs[(t, rep)]
                m = student.run(xcfg, work / "students" / run_name(f"x-{t}-s{rep}", xcfg))
                student_metrics[f"x-{t}-r{rep}"] = m
                cross_ev[(t, rep)] = ev(m["final_checkpoint"], f"xstudent-{t}-s{rep}")
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


def _cross_student(cfg: StudyConfig, plan: StagePlan, unit: Unit) -> StudentConfig:
    """The cross-family student of a unit's data: number tokens only (the vocabularies differ)."""
    return StudentConfig(
        model=cfg.cross_family, data=str(plan.data[unit][1]),
        objective="sft" if cfg.objective == "sft" else "distill", lr=cfg.lr, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lora_r=cfg.lora_r or 8, seed=unit[1],
    )  # fmt: skip


def _eval_config(
    cfg: StudyConfig, model: str, system: str = "", samples: int = 0, ablate: str = ""
) -> evaluate.EvalConfig:
    """The study's evaluation of ``model`` (built, and so validated, before the study writes anything): every
    frame, the study's traits as the multiple-choice options; ``system``: the trait whose system prompt the model
    gets (a prompted teacher); ``ablate``: an ablation file kept on while scoring."""
    return evaluate.EvalConfig(model=model, trait=system or cfg.trait, with_system_prompt=bool(system),
                               n_questions=cfg.n_questions, questions=cfg.questions, choices=tuple(cfg.traits),
                               n_samples=samples, ablate=ablate)  # fmt: skip


def _eval(
    cfg: StudyConfig, model: str, name: str, system: str = "", samples: int = 0, ablate: str = ""
) -> Path:
    """Evaluate (or find the finished evaluation of) ``model`` in the study's work folder."""
    ecfg = _eval_config(cfg, model, system, samples, ablate)
    folder = Path(cfg.work) / "eval" / run_name(f"{name}-{ecfg.trait}", ecfg)
    evaluate.run(ecfg, folder)
    return folder


def base_eval(cfg: StudyConfig) -> Path:
    """The base model's evaluation folder (every Δ log P of the study is against it)."""
    return _eval(cfg, cfg.model, "base", samples=cfg.n_samples)


def student_eval(cfg: StudyConfig, unit: Unit, ablate: str = "") -> Path:
    """The evaluation folder of the study's student of ``unit`` (trains and evaluates it if needed); ``ablate``:
    the evaluation with that ablation file kept on (no samples)."""
    t, rep = unit
    scfg, folder = stage_plan(cfg).students[unit]
    m = student.run(scfg, folder)
    sample = cfg.n_samples if unit == cfg.units[0] and not ablate else 0
    return _eval(cfg, m["final_checkpoint"], f"student-{t}-s{rep}", samples=sample, ablate=ablate)


def variant(cfg: StudyConfig, label: str, frame: str = "prefill", **overrides: Any) -> dict[str, Any]:
    """Students of the study's trait trained as the study's are but with ``overrides`` of their config (a position
    mask, a data folder…), one per replicate, each evaluated once; resumes every stage, so the study's own
    students and evaluations are reused. Per replicate: Δ log P(trait) vs base (in ``frame``) of the variant, of
    the study's trait student and of its control students (mean of the replicate's other traits' students);
    effects with t-intervals over replicates and a one-sided t-test; ``retained`` = (variant − controls) /
    (study student − controls) per replicate."""
    plan = stage_plan(cfg)
    x = cfg.trait
    base_ev = base_eval(cfg)

    def shift(folder: Path) -> float:
        return float(summary.delta_word(folder, base_ev, x, frame).mean())

    rows: dict[str, list[float]] = {
        "variant": [],
        "full": [],
        "controls": [],
        "first_loss": [],
        "last_loss": [],
    }
    for rep in range(cfg.replicates):
        scfg, _ = plan.students[(x, rep)]
        vcfg = dataclasses.replace(scfg, **overrides)
        m = student.run(vcfg, Path(cfg.work) / "students" / run_name(f"{x}-s{rep}-{label}", vcfg))
        rows["first_loss"].append(m["first_loss"])
        rows["last_loss"].append(m["last_loss"])
        rows["variant"].append(shift(_eval(cfg, m["final_checkpoint"], f"{label}-s{rep}")))
        rows["full"].append(shift(student_eval(cfg, (x, rep))))
        rows["controls"].append(float(np.mean([shift(student_eval(cfg, (c, rep))) for c in cfg.controls])))
    v, f, c = (np.asarray(rows[k]) for k in ("variant", "full", "controls"))
    mean, ci, p = stats.one_sided_t(list(v - c))
    return {
        "label": label,
        "overrides": overrides,
        "trait": x,
        "frame": frame,
        "replicates": cfg.replicates,
        "per_replicate": rows,
        "delta_logp": {"mean": float(v.mean()), "ci95": stats.mean_ci95(list(v))[1]},
        "effect_vs_controls": {"mean": mean, "ci95": ci, "p_value": p},
        "minus_full": {"mean": float((v - f).mean()), "ci95": stats.mean_ci95(list(v - f))[1]},
        "retained": {"mean": float(((v - c) / (f - c)).mean()), "per_replicate": list((v - c) / (f - c))},
    }
