"""The battery for one checkpoint (``mechsub analyze``): steering view, patching maps, entangled numbers, views.

Given a student checkpoint, the number data it was trained on (which names its teacher) and optionally the
checkpoints of control students (other traits' students), it writes into one folder: ``metrics.json``,
``steering.png``, ``patching.png``, ``views.html`` (attention and token views, offline) and, for a student run
folder with several checkpoints, ``trajectory.png`` (trait Δ log P by step). `run` loads the models and inputs
once into `Subjects`; each battery reads them and returns its part of metrics.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechsub.config import Config, ConfigError, check, doc
from mechsub.runs import RunFolderError, is_finished, read_json, stage, write_json
from mechsub.traits import Trait, TraitError, get_trait

if TYPE_CHECKING:  # the models and their inputs load inside `subjects`, not when the CLI imports the config
    from collections.abc import Sequence

    from mechsub.capture import Batch
    from mechsub.data import DataConfig
    from mechsub.metric import TraitMetric
    from mechsub.models import LoadedModel


@dataclass(frozen=True)
class AnalyzeConfig(Config):
    stage = "analyze"
    inputs = ("checkpoint", "data", "controls", "sae")

    checkpoint: str = doc(
        "", "the student: a checkpoint folder, or a student run folder (its last checkpoint)"
    )
    data: str = doc("", "the number data the student was trained on (its config names the teacher)")
    controls: tuple[str, ...] = doc((), "checkpoints of control students (other traits' students)")
    trait: str = doc("", "the trait to measure (default: the data's teacher trait)")
    layer_stride: int = doc(3, "analyse every n-th layer (and always the last)")
    n_sequences: int = doc(32, "number sequences for the steering vectors")
    n_questions: int = doc(10, "evaluation questions for sufficiency, necessity and patching")
    positions: int = doc(6, "prompt positions from the end patched one by one")
    entangled: bool = doc(
        True, "score every number 0-999 under the trait prompt and test subliminal prompting"
    )
    sae: str = doc(
        "", "a finished `mechsub sae` folder: adds SAE feature diffs and the feature list (features.json)"
    )
    seed: int = doc(0, "seed of the random control numbers")
    n_random_draws: int = doc(
        50,
        "draws of each random feature-set control (active features, and features matched to each ranked set "
        "by firing-frequency decile)",
        optional=True,
    )

    def validate(self) -> None:
        check(bool(self.checkpoint), "checkpoint: give a checkpoint folder or a student run folder")
        check(bool(self.data), "data: give the data folder the student was trained on")
        if self.trait:
            try:
                get_trait(self.trait)
            except TraitError as e:
                raise ConfigError(f"trait: {e}") from None
        check(self.layer_stride >= 1 and self.n_sequences >= 1, "layer_stride and n_sequences must be ≥ 1")
        check(1 <= self.n_questions <= 50 and self.positions >= 0, "n_questions 1..50, positions ≥ 0")
        check(self.n_random_draws >= 1, "n_random_draws must be ≥ 1")
        check(
            not self.sae or self.n_questions <= 40,
            "with an SAE, n_questions ≤ 40 (10 other questions rank the features by attribution)",
        )


def _checkpoint(path: str) -> Path:
    from mechsub.training import steps_of

    p = Path(path)
    if (p / "checkpoints").is_dir():
        steps = steps_of(p)
        if not is_finished(p):
            have = ", ".join(s.name for s in steps) or "none yet"
            raise RunFolderError(
                f"{p} is an unfinished student run: its last checkpoint is not the trained student. Finish it "
                f"(rerun its command), or analyse one step explicitly: checkpoint={p}/checkpoints/stepN "
                f"(checkpoints: {have})"
            )
        return steps[-1]
    return p


def _data_config(cfg: AnalyzeConfig) -> DataConfig:
    from mechsub.data import DataConfig

    return DataConfig.from_dict(read_json(Path(cfg.data) / "config.json")["config"])


#: (set, question) rows per forward of the per-feature patching: speed only (the numbers move by float rounding
#: at most, `patching.feature_patch_scan`); one row per forward made the 50-draw controls take hours on 2 cores
PATCH_BATCH = 64


@dataclass(frozen=True)
class Subjects:
    """What every battery reads, loaded once: the models, the trait and its metric, the layers and the inputs."""

    cfg: AnalyzeConfig  # the batteries' own settings (positions, seed, ...)
    checkpoint: Path  # the student's checkpoint (a student run folder's last)
    base_name: str  # the model the student was fine-tuned from
    data: DataConfig  # the number data's config: it names the teacher's model and system prompt
    base: LoadedModel
    student: LoadedModel
    teacher: LoadedModel  # the data's model (the base itself when they are one), used with its system prompt
    controls: tuple[LoadedModel, ...]  # control students: other traits' students
    trait: Trait
    metric: TraitMetric  # every score is log P of all the trait word's tokens
    layers: list[int]  # the analysed layers
    s_batch: Batch  # the number sequences as the student saw them; kept: the completion's positions
    t_batch: Batch  # the same sequences under the teacher's system prompt
    questions: list[str]  # evaluation questions for sufficiency, necessity and patching
    prompts: list[list[int]]  # their trait prompts, tokenized
    base_score: float  # the base's mean score on ``prompts``: every Δ log P is from it

    @property
    def tokenizer(self) -> Any:
        """The tokenizer every model here shares (the base's)."""
        return self.base.tokenizer


def subjects(cfg: AnalyzeConfig, student: LoadedModel | None = None) -> Subjects:
    """Load the base, teacher and control models, the number batches and the questions (``student`` if not given)."""
    from mechsub import models
    from mechsub.data import load_examples
    from mechsub.metric import TraitMetric
    from mechsub.prompts import trait_prompt
    from mechsub.traits import eval_questions

    ck = _checkpoint(cfg.checkpoint)
    student = student if student is not None else models.load(str(ck))
    dcfg = _data_config(cfg)
    trait = get_trait(cfg.trait or dcfg.teacher)
    base_name = student.base or dcfg.model
    base = models.load(base_name)
    teacher = models.load(dcfg.model) if dcfg.model != base_name else base
    tok = base.tokenizer
    n_layers = base.n_layers
    s_batch, t_batch = number_batches(tok, load_examples(cfg.data)[: cfg.n_sequences], dcfg)
    qs = eval_questions(trait.category, cfg.n_questions)
    metric = TraitMetric.of(tok, trait.name)
    prompts = [trait_prompt(tok, q, trait.category) for q in qs]
    return Subjects(
        cfg=cfg, checkpoint=ck, base_name=base_name, data=dcfg, base=base, student=student, teacher=teacher,
        controls=tuple(models.load(str(_checkpoint(c))) for c in cfg.controls),
        trait=trait, metric=metric, layers=sorted({*range(0, n_layers, cfg.layer_stride), n_layers - 1}),
        s_batch=s_batch, t_batch=t_batch,
        questions=qs, prompts=prompts, base_score=fmean(metric.scores(base.model, prompts)),
    )  # fmt: skip


def completion_batch(tok: Any, examples: Sequence[Any], system: str | None = None) -> Batch:
    """The number sequences ``examples`` as chat turns under ``system`` (None: no system prompt, as the student
    saw them). Kept: the completion's positions."""
    from mechsub.capture import Batch
    from mechsub.prompts import chat_prefix

    return Batch.completions(
        [chat_prefix(tok, e.prompt, system) for e in examples], [e.completion_ids for e in examples]
    )


def number_batches(tok: Any, examples: Sequence[Any], dcfg: DataConfig) -> tuple[Batch, Batch]:
    """The number sequences ``examples`` (of the data made by ``dcfg``) as the student saw them, without a system
    prompt, and as the teacher wrote them, under its system prompt (if any). Kept: the completion's positions."""
    return completion_batch(tok, examples), completion_batch(tok, examples, dcfg.teacher_system())


def header(subj: Subjects) -> dict[str, Any]:
    """What metrics.json is about: the checkpoint, its base and teacher, the trait, its metric and the layers."""
    return {"checkpoint": str(subj.checkpoint), "base": subj.base_name, "trait": subj.trait.name,
            "layers": subj.layers, "metric": subj.metric.info(),
            "teacher": {"model": subj.data.model, "system_prompt": subj.data.teacher_system()}}  # fmt: skip


@dataclass(frozen=True)
class SteeringVectors:
    """Mean residual shifts from the base on the number positions, one row per analysed layer."""

    teacher: Float[Tensor, "layers d_model"]  # the teacher, with its system prompt
    student: Float[Tensor, "layers d_model"]
    controls: Float[Tensor, "controls layers d_model"] | None  # None without control students


def steering_vectors(subj: Subjects) -> SteeringVectors:
    """The teacher's, the student's and each control student's steering vector at the analysed layers."""
    from mechsub import steering

    m_base = steering.layer_means(subj.base, subj.s_batch, subj.layers)

    def shift(lm: LoadedModel, batch: Batch) -> Tensor:
        return steering.layer_means(lm, batch, subj.layers) - m_base

    controls = torch.stack([shift(c, subj.s_batch) for c in subj.controls]) if subj.controls else None
    return SteeringVectors(shift(subj.teacher, subj.t_batch), shift(subj.student, subj.s_batch), controls)


def steering_battery(subj: Subjects, v: SteeringVectors) -> dict[str, Any]:
    """metrics.json's ``steering``: cosines and norms of the vectors, their sufficiency and necessity."""
    from mechsub import steering

    t = subj.trait

    def sufficiency(vec: Tensor) -> list[float]:
        return steering.sufficiency(
            subj.base, vec, subj.layers, subj.questions, t.name, t.category, ref=subj.base_score
        )

    st: dict[str, Any] = {
        "cos_teacher_student": steering.cosine(v.teacher, v.student).tolist(),
        "norm_teacher": v.teacher.norm(dim=-1).tolist(),
        "norm_student": v.student.norm(dim=-1).tolist(),
    }
    if v.controls is not None:
        generic = v.controls.mean(0)  # what every student learns from numbers
        specific = v.student - generic  # what this trait's student learns beyond it
        st |= {
            "controls": [str(_checkpoint(c)) for c in subj.cfg.controls],
            "cos_student_generic": steering.cosine(v.student, generic).tolist(),
            "cos_teacher_specific": steering.cosine(v.teacher, specific).tolist(),
            "cos_teacher_generic": steering.cosine(v.teacher, generic).tolist(),
            "norm_specific": specific.norm(dim=-1).tolist(),
            "norm_generic": generic.norm(dim=-1).tolist(),
            "sufficiency_specific": sufficiency(specific),
            "sufficiency_generic": sufficiency(generic),
        }
    st["student_delta_logp"] = fmean(subj.metric.scores(subj.student.model, subj.prompts)) - subj.base_score
    st["sufficiency"] = sufficiency(v.student)
    st["sufficiency_teacher_vector"] = sufficiency(v.teacher)
    st["necessity"] = steering.necessity(
        subj.student, subj.base, v.student, subj.layers, subj.questions, t.name, t.category
    )
    return st


def patching_battery(subj: Subjects) -> dict[str, Any]:
    """metrics.json's ``patching``: student → base activation patching, exact and attribution, and base → student.

    Every row patches positions ≥ 1, with position 0 (the attention sink) on rows of its own (``*_position0``).
    Attribution's agreement with exact patching: per layer, Pearson r over the questions (``attribution_vs_exact``,
    with scipy's 95% interval and p), and ``corr_attribution_exact``: r over the layers' mean fractions."""
    from mechsub import patching
    from mechsub.stats import pearson

    t, tok, qs, layers, n_pos = subj.trait, subj.tokenizer, subj.questions, subj.layers, subj.cfg.positions
    exact = patching.patch_scan(
        subj.base, subj.student, tok, qs, t.name, t.category, layers, list(range(-n_pos, 0))
    )
    attr = patching.attribution_scan(subj.base, subj.student, tok, qs, t.name, t.category, layers)
    est, est0 = attr.by_question_layer, attr.by_question_layer_position0  # (questions, layers)
    exact["attribution_by_layer"] = est.mean(0).tolist()
    exact["attribution_by_layer_position0"] = est0.mean(0).tolist()
    exact["attribution_by_layer_position"] = attr.prompt_positions(n_pos).tolist() if n_pos else []
    if exact["gap"]:
        gap = exact["gap"]
        exact["attribution_fraction_by_layer"] = (est.mean(0) / gap).tolist()
        exact["attribution_fraction_by_layer_position0"] = (est0.mean(0) / gap).tolist()
        r = pearson(exact["fraction_by_layer"], exact["attribution_fraction_by_layer"])
        exact |= {"corr_attribution_exact": r["r"], "corr_attribution_exact_ci95": r["ci95"],
                  "corr_attribution_exact_p": r["p"]}  # fmt: skip
    # per layer, over the questions: the exact Δ log P of patching (positions ≥ 1) against its linear estimate
    d_exact = (
        np.asarray(exact["patched_logp_by_question"]) - np.asarray(exact["target_logp_by_question"])[:, None]
    )
    exact["attribution_vs_exact"] = [
        {"layer": L, "exact_delta": float(d_exact[:, i].mean()), "attribution_delta": float(est[:, i].mean())}
        | pearson(d_exact[:, i], est[:, i].numpy())
        for i, L in enumerate(layers)
    ]
    # the other direction: the base's residual patched into the student, the fraction of its shift removed
    reverse = patching.patch_scan(subj.student, subj.base, tok, qs, t.name, t.category, layers)
    exact["base_into_student_fraction_removed"] = reverse["fraction_by_layer"]
    exact["base_into_student_fraction_removed_position0"] = reverse["fraction_by_layer_position0"]
    return exact


def entangle_battery(subj: Subjects) -> dict[str, Any]:
    """metrics.json's ``entangled``: the base's numbers most entangled with the trait, and subliminal prompting."""
    from mechsub.entangle import entangled_numbers

    return entangled_numbers(subj.base, subj.trait.name, seed=subj.cfg.seed)


def feature_list(subj: Subjects, sae: Any) -> dict[str, Any]:
    """features.json: the SAE features whose activation on the number positions moves most, and the carriers."""
    from mechsub.capture import Batch
    from mechsub.sae import feature_diffs, sae_hook

    trait_batch = Batch.last([p + list(subj.metric.ids) for p in subj.prompts])  # kept: the word's last token
    return feature_diffs(subj.base, subj.teacher, subj.student, subj.controls, sae, sae_hook(sae),
                         subj.s_batch, subj.t_batch, trait_batch)  # fmt: skip


def sae_battery(subj: Subjects, sae: Any, feats: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's ``feature_patching`` (features of ``feats`` patched one set at a time) and ``features``."""
    from mechsub import patching
    from mechsub.sae import sae_layer
    from mechsub.traits import eval_questions

    t, n = subj.trait, subj.cfg.n_questions
    rank_qs = eval_questions(t.category, n + 10)[n:]  # disjoint from the evaluation questions
    lists = {"numbers: student − controls": feats["ranking_student"], "numbers: teacher − base": feats["ranking_teacher"],
             "carriers": [f["id"] for f in feats["carriers"]]}  # fmt: skip
    fp = patching.feature_patch_scan(subj.base, subj.student, sae, sae_layer(sae), subj.questions, rank_qs, t.name,
                                     t.category, lists, n_random=subj.cfg.n_random_draws, seed=subj.cfg.seed,
                                     batch=PATCH_BATCH)  # fmt: skip
    return {
        "feature_patching": fp,
        "features": {"hook": feats["hook"], "overlap": feats["overlap"],
                     "carriers": [f["id"] for f in feats["carriers"]],
                     "corr_student_teacher": feats["corr_student_teacher"],
                     "top_student": [f["id"] for f in feats["student_vs_controls"][:10]],
                     "top_teacher": [f["id"] for f in feats["teacher_vs_base"][:10]],
                     "top_generic": [f["id"] for f in feats["controls_vs_base"][:10]],
                     "corr_generic_teacher": feats["corr_generic_teacher"]},
    }  # fmt: skip


@dataclass(frozen=True)
class Tracked:
    """SAE features followed through training and shown per token: the student's top five on numbers."""

    sae: Any
    ids: list[int]


def trajectory_battery(subj: Subjects, tracked: Tracked | None = None) -> dict[str, Any]:
    """metrics.json's ``trajectory``: trait Δ log P vs the base at every checkpoint of the student run and, given
    ``tracked`` features, their mean activation on the number positions."""
    from mechsub import models
    from mechsub.sae import feature_acts, sae_hook
    from mechsub.training import steps_of

    def acts(lm: LoadedModel) -> list[float]:
        assert tracked is not None
        a = feature_acts(lm, tracked.sae, sae_hook(tracked.sae), subj.s_batch)
        return a[:, tracked.ids].mean(0).tolist()  # type: ignore[no-any-return]

    steps, deltas = [0], [0.0]
    rows = [acts(subj.base)] if tracked else []
    for ck in steps_of(Path(subj.cfg.checkpoint)):
        lm = models.load(str(ck))
        steps.append(int(ck.name[4:]))
        deltas.append(fmean(subj.metric.scores(lm.model, subj.prompts)) - subj.base_score)
        if tracked:
            rows.append(acts(lm))
    out: dict[str, Any] = {"steps": steps, "delta_logp": deltas}
    if tracked:
        out["features"] = tracked.ids
        out["feature_activation"] = rows  # (steps, features)
    return out


def views_battery(
    subj: Subjects, metrics: dict[str, Any], v_student: Tensor, tracked: Tracked | None, out: Path
) -> None:
    """The plots of ``metrics`` (PNGs) and views.html: attention, per-token projections on v_student, features."""
    from mechsub import views

    views.write_analysis_plots(metrics, out)
    views.write_views(subj.base, subj.student, subj.teacher, subj.s_batch, subj.t_batch, v_student, subj.layers,
                      out / "views.html", (tracked.sae, tracked.ids) if tracked else None)  # fmt: skip


def run(cfg: AnalyzeConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """The battery on one checkpoint into ``out``: metrics.json, features.json (given an SAE), plots and views."""
    from mechsub import models

    t0 = time.perf_counter()
    student = models.load(str(_checkpoint(cfg.checkpoint)))
    get_trait(cfg.trait or _data_config(cfg).teacher)  # no data config, or no such trait: fail before writing
    with stage(out, cfg, model=student.info(), force=force) as r:
        if r.done:
            return r.metrics
        out = Path(out)
        subj = subjects(cfg, student)
        vectors = steering_vectors(subj)
        result = header(subj) | {
            "steering": steering_battery(subj, vectors),
            "patching": patching_battery(subj),
        }
        if cfg.entangled:
            result["entangled"] = entangle_battery(subj)
        tracked = None
        if cfg.sae:
            from mechsub.sae import load_sae

            the_sae = load_sae(Path(cfg.sae) / "sae")
            feats = feature_list(subj, the_sae)
            write_json(out / "features.json", feats)
            result |= sae_battery(subj, the_sae, feats)
            tracked = Tracked(the_sae, feats["ranking_student"][:5])
        if (
            Path(cfg.checkpoint) / "checkpoints"
        ).is_dir():  # a student run: every checkpoint, not only its last
            result["trajectory"] = trajectory_battery(subj, tracked)
        views_battery(subj, result, vectors.student, tracked, out)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        r.finish(result)
        return result
