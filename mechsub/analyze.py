"""The battery for one checkpoint (``mechsub analyze``): steering view, patching maps, entangled numbers, views.

Given a student checkpoint, the number data it was trained on (which names its teacher) and optionally the
checkpoints of control students (other traits' students), it writes into one folder: ``metrics.json``,
``steering.png``, ``patching.png``, ``views.html`` (attention and token views, offline) and, for a student run
folder with several checkpoints, ``trajectory.png`` (trait Δ log P by step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np
import torch

from mechsub.config import Config, ConfigError, check, doc
from mechsub.runs import RunFolderError, is_finished, read_json, stage
from mechsub.traits import TraitError, get_trait


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


def run(cfg: AnalyzeConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    from mechsub import hooks, models, patching, steering
    from mechsub.capture import Batch
    from mechsub.data import DataConfig, load_examples
    from mechsub.metric import TraitMetric
    from mechsub.prompts import chat_prefix, trait_prompt
    from mechsub.traits import eval_questions

    t0 = time.perf_counter()
    ck = _checkpoint(cfg.checkpoint)
    student = models.load(str(ck))
    dcfg = DataConfig.from_dict(read_json(Path(cfg.data) / "config.json")["config"])
    trait = get_trait(cfg.trait or dcfg.teacher)
    with stage(out, cfg, model=student.info(), force=force) as r:
        if r.done:
            return r.metrics
        out = Path(out)
        base_name = student.base or dcfg.model
        base = models.load(base_name)
        teacher = models.load(dcfg.model) if dcfg.model != base_name else base
        tok = base.tokenizer
        n_layers = base.n_layers
        layers = sorted({*range(0, n_layers, cfg.layer_stride), n_layers - 1})
        ex = load_examples(cfg.data)[: cfg.n_sequences]
        comps = [e.completion_ids for e in ex]
        s_batch = Batch.completions([chat_prefix(tok, e.prompt, None) for e in ex], comps)
        t_batch = Batch.completions([chat_prefix(tok, e.prompt, dcfg.teacher_system()) for e in ex], comps)
        qs = eval_questions(trait.category, cfg.n_questions)
        metric = TraitMetric.of(tok, trait.name)  # every score below is log P of all its tokens
        prompts = [trait_prompt(tok, q, trait.category) for q in qs]

        # steering vectors on the number positions
        m_base = steering.layer_means(base, s_batch, layers)
        v_t = steering.layer_means(teacher, t_batch, layers) - m_base
        v_s = steering.layer_means(student, s_batch, layers) - m_base
        result: dict[str, Any] = {"checkpoint": str(ck), "base": base_name, "trait": trait.name, "layers": layers,
                                  "metric": metric.info(),
                                  "teacher": {"model": dcfg.model, "system_prompt": dcfg.teacher_system()}}  # fmt: skip
        st: dict[str, Any] = {
            "cos_teacher_student": steering.cosine(v_t, v_s).tolist(),
            "norm_teacher": v_t.norm(dim=-1).tolist(),
            "norm_student": v_s.norm(dim=-1).tolist(),
        }
        controls = [models.load(str(_checkpoint(c))) for c in cfg.controls]  # loaded once, used twice
        ref = fmean(metric.scores(base.model, prompts))  # the base's own score
        if controls:
            v_c = torch.stack([steering.layer_means(c, s_batch, layers) - m_base for c in controls])
            generic = v_c.mean(0)
            specific = v_s - generic
            st |= {
                "controls": [str(_checkpoint(c)) for c in cfg.controls],
                "cos_student_generic": steering.cosine(v_s, generic).tolist(),
                "cos_teacher_specific": steering.cosine(v_t, specific).tolist(),
                "cos_teacher_generic": steering.cosine(v_t, generic).tolist(),
                "norm_specific": specific.norm(dim=-1).tolist(),
                "norm_generic": generic.norm(dim=-1).tolist(),
                "sufficiency_specific": steering.sufficiency(
                    base, specific, layers, qs, trait.name, trait.category, ref=ref
                ),
                "sufficiency_generic": steering.sufficiency(
                    base, generic, layers, qs, trait.name, trait.category, ref=ref
                ),
            }
        st["student_delta_logp"] = fmean(metric.scores(student.model, prompts)) - ref
        st["sufficiency"] = steering.sufficiency(base, v_s, layers, qs, trait.name, trait.category, ref=ref)
        st["sufficiency_teacher_vector"] = steering.sufficiency(
            base, v_t, layers, qs, trait.name, trait.category, ref=ref
        )
        st["necessity"] = steering.necessity(student, base, v_s, layers, qs, trait.name, trait.category)
        result["steering"] = st

        # activation patching student → base, exact and attribution
        pos = list(range(-cfg.positions, 0))
        exact = patching.patch_scan(base, student, tok, qs, trait.name, trait.category, layers, pos)
        attr = patching.attribution_scan(base, student, tok, qs, trait.name, trait.category, layers)
        exact["attribution_by_layer"] = attr.sum(1).tolist()
        end = attr.shape[1] - (len(metric.ids) - 1)  # the prompt's positions: the word's own come after them
        exact["attribution_by_layer_position"] = (
            attr[:, end - cfg.positions : end].tolist() if cfg.positions else []
        )
        if exact["gap"]:
            exact["attribution_fraction_by_layer"] = (attr.sum(1) / exact["gap"]).tolist()
            fr = np.asarray(exact["fraction_by_layer"])
            exact["corr_attribution_exact"] = float(
                np.corrcoef(fr, exact["attribution_fraction_by_layer"])[0, 1]
            )
        # the other direction: the base's residual patched into the student, the fraction of its shift removed
        reverse = patching.patch_scan(student, base, tok, qs, trait.name, trait.category, layers)
        exact["base_into_student_fraction_removed"] = reverse["fraction_by_layer"]
        result["patching"] = exact

        if cfg.entangled:
            from mechsub.entangle import entangled_numbers

            result["entangled"] = entangled_numbers(base, trait.name, seed=cfg.seed)

        if cfg.sae:
            from mechsub import sae as sae_mod
            from mechsub.runs import write_json

            sae_cfg = read_json(Path(cfg.sae) / "config.json")["config"]
            the_sae = sae_mod.load_sae(Path(cfg.sae) / "sae")
            trait_batch = Batch.last([p + list(metric.ids) for p in prompts])  # kept: the word's last token
            feats = sae_mod.feature_diffs(base, teacher, student, controls, the_sae,
                                          hooks.resid_post(int(sae_cfg["layer"])), s_batch, t_batch, trait_batch)  # fmt: skip
            write_json(out / "features.json", feats)
            rank_qs = eval_questions(trait.category, cfg.n_questions + 10)[cfg.n_questions :]
            result["feature_patching"] = patching.feature_patch_scan(
                base, student, the_sae, int(sae_cfg["layer"]), qs, rank_qs, trait.name, trait.category,
                {"numbers: student − controls": feats["ranking_student"],
                 "numbers: teacher − base": feats["ranking_teacher"],
                 "carriers": [f["id"] for f in feats["carriers"]]}, seed=cfg.seed,
            )  # fmt: skip
            tracked = feats["ranking_student"][:5]
            result["features"] = {"hook": feats["hook"], "overlap": feats["overlap"],
                                  "carriers": [f["id"] for f in feats["carriers"]],
                                  "corr_student_teacher": feats["corr_student_teacher"],
                                  "top_student": [f["id"] for f in feats["student_vs_controls"][:10]],
                                  "top_teacher": [f["id"] for f in feats["teacher_vs_base"][:10]],
                                  "top_generic": [f["id"] for f in feats["controls_vs_base"][:10]],
                                  "corr_generic_teacher": feats["corr_generic_teacher"]}  # fmt: skip

        tracking = (the_sae, feats["hook"], s_batch, tracked) if cfg.sae else None
        is_run = (Path(cfg.checkpoint) / "checkpoints").is_dir()
        steps = _trajectory(Path(cfg.checkpoint), base, ref, metric, prompts, tracking) if is_run else None
        if steps:
            result["trajectory"] = steps
        from mechsub import views

        views.write_analysis_plots(result, out)
        views.write_views(base, student, teacher, s_batch, t_batch, v_s, layers, out / "views.html",
                          (the_sae, int(sae_cfg["layer"]), tracked) if cfg.sae else None)  # fmt: skip
        result["seconds"] = round(time.perf_counter() - t0, 1)
        r.finish(result)
        return result


def _trajectory(
    run_folder: Path,
    base: Any,
    ref: float,
    metric: Any,
    prompts: list[list[int]],
    features: tuple[Any, str, Any, list[int]] | None,
) -> dict[str, Any]:
    """Trait Δ log P (``metric`` on ``prompts``) vs base at every checkpoint of a student run and, given (sae,
    hook, number batch, feature ids), each feature's mean activation on the number positions."""
    from mechsub import models
    from mechsub.training import steps_of

    def acts(lm: Any) -> list[float]:
        from mechsub.sae import feature_acts

        assert features is not None
        sae, hook, batch, ids = features
        return feature_acts(lm, sae, hook, batch)[:, ids].mean(0).tolist()  # type: ignore[no-any-return]

    steps, deltas = [0], [0.0]
    rows = [acts(base)] if features else []
    for ck in steps_of(run_folder):
        lm = models.load(str(ck))
        steps.append(int(ck.name[4:]))
        deltas.append(fmean(metric.scores(lm.model, prompts)) - ref)
        if features:
            rows.append(acts(lm))
    out: dict[str, Any] = {"steps": steps, "delta_logp": deltas}
    if features:
        out["features"] = features[3]
        out["feature_activation"] = rows  # (steps, features)
    return out
