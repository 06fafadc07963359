"""The filter benchmark (issue 15, item 1): how much of the student's specific effect each data defence blocks,
as a function of the share of the data it keeps, at equal data kept.

For every replicate of the study (a trait teacher with its own data; its student and its control students are the
study's), owl students are trained as the study's on what each filter keeps:
  - random: a uniform draw of examples (--random-draws draws, each its own student);
  - entangled: without the examples with the most occurrences of the trait's 10 most entangled numbers
    (`mechsub.entangle`); ties by the mean entanglement of the example's numbers, then the earlier example;
  - divergence: the loss masked at the divergence tokens (`mechsub divergence`, counterfactual teachers: the
    study's control teachers by default), at its own share;
  - gradcos: without the examples whose SFT-loss descent direction is most aligned with ∇ log P(trait);
  - feature: without the examples whose largest activation of the chosen SAE latents is highest
    (feature_tokens: those positions masked instead);
  - mixture: a share of the prompts answered by the replicate's other teachers instead (stored 13-token
    log-probs: objective --mixture-objective, against that objective's own study students).
Shares: "matched" is divergence masking's natural share (per replicate); every filter is run there so that they
compare at equal data kept. Effect = the variant's Δ log P(trait) minus the replicate's control students', in the
held-out plain frame (the goal's) and the training prefill frame; blocked = 1 − effect / the study student's
effect; t-intervals over replicates (the unit). --share-controls dog also trains the dog students on a random
draw of their own data at each numeric share, and reads every cell at that share against them (removing data moves
the controls too; the mixture, with its other objective, is left out). Writes OUT/metrics.json, OUT/table.md, OUT/curves.png.

    .venv/bin/python analyses/filters.py [--dry-run] [--config analyses/configs/study_full.toml]
        [--shares matched,0.8,0.5] [--random-draws 3] [--filters random,entangled,divergence,gradcos,feature,mixture]
        [--share-controls dog]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mechsub import data, divergence, study, teacher
from mechsub import filterbench as fb
from mechsub.filter import write_mask
from mechsub.plots import save_figure
from mechsub.runs import atomic_write_text, is_finished, read_json, reuse_stale, write_json
from mechsub.study import StagePlan, StudyConfig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--config", default="", help="a StudyConfig (.toml/.json) or a study folder; default: the demo's"
    )
    ap.add_argument("--out", default="artifacts/filters")
    ap.add_argument("--filters", default=",".join(fb.DEFAULT_FILTERS), help=f"of {', '.join(fb.FILTERS)}")
    ap.add_argument(
        "--shares", default=fb.MATCHED, help="keep shares in (0, 1) and/or 'matched' (divergence's own)"
    )
    ap.add_argument(
        "--random-draws", type=int, default=3, help="random's draws, each its own student per replicate"
    )
    ap.add_argument(
        "--counterfactuals", default="", help="divergence's counterfactual traits (default: the controls)"
    )
    ap.add_argument(
        "--latents",
        default="artifacts/caft/latents-l27.json",
        help="a JSON list of latent ids, or a JSON object holding one (--latents-key); default: the layer-27 "
        "battery latents recurring across replicates (analyses/caft.py writes it)",
    )
    ap.add_argument(
        "--latents-key", default="recurrent", help="the list in a JSON object ('' for a bare list)"
    )
    ap.add_argument("--latents-k", type=int, default=20, help="the first k latents of the list (0: all)")
    ap.add_argument(
        "--sae",
        default="",
        help="the SAE folder (default: the latents object's 'sae', or the one the latents' folder config.json names)",
    )
    ap.add_argument(
        "--entangled-top", type=int, default=10, help="entangled: how many of the top numbers count"
    )
    ap.add_argument("--gradcos-questions", type=int, default=10, help="gradcos: questions of log P(trait)")
    ap.add_argument("--gradcos-params", default="linear", help="gradcos: all, linear (LoRA's), mlp or attn")
    ap.add_argument("--mixture-objective", default="distill", choices=["distill", "sft"])
    ap.add_argument(
        "--share-controls",
        default="",
        help="control traits (of the study's) whose students are also trained on a random draw of their own data "
        "at each numeric share: the effect read against controls that lost as much data (e.g. dog)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the random draws and the mixture")
    ap.add_argument(
        "--dry-run", action="store_true", help="print the plan and its estimated cost, run nothing"
    )
    ap.add_argument("--reuse-stale", action="store_true", help="reuse finished stage runs whose code changed")
    return ap.parse_args(argv)  # fmt: skip


def load_config(path: str) -> StudyConfig:
    """The study config: a TOML/JSON StudyConfig, a study folder or its config.json; none: the defaults."""
    if not path:
        return StudyConfig()
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if p.suffix == ".json" and p.is_file() and isinstance((d := read_json(p)), dict) and "config" in d:
        return StudyConfig.from_dict(d["config"])
    return StudyConfig.load(p)


@dataclass
class Bench:
    """The benchmark's settings, resolved and checked before anything runs."""

    args: argparse.Namespace
    cfg: StudyConfig
    filters: list[str]
    shares: list[float | str]
    arms: list[fb.Arm]
    cf: tuple[str, ...]  # divergence's counterfactual traits
    mix_cfg: StudyConfig  # the study under the mixture's objective (its reference students)
    latents: list[int]
    sae_dir: str
    blockers: list[str] = field(default_factory=list)  # what must exist before a run
    #: control traits whose students are also trained on a random draw of their data at each numeric share
    share_controls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.plan: StagePlan = study.stage_plan(self.cfg)
        self.cf_plan: StagePlan = study.stage_plan(self.cfg.replace(controls=self.cf))
        self.work = Path(self.cfg.work) / "filters"
        self.kinds = tuple(sorted({fb.SCORE_KINDS[f] for f in self.filters if f in fb.SCORE_KINDS}))

    @property
    def x(self) -> str:
        return self.cfg.trait

    @property
    def numeric_shares(self) -> list[float]:
        return [s for s in self.shares if isinstance(s, float)]

    def cf_specs(self, rep: int) -> tuple[str, ...]:
        """Counterfactual teachers of a replicate: fine-tuned teachers' checkpoints, or trait names (prompted)."""
        if self.cfg.teacher_kind == "finetuned":
            return tuple(self.cf_plan.teacher_model[(t, rep)] for t in self.cf)
        return self.cf

    def div_cfg(self, rep: int) -> tuple[divergence.DivergenceConfig, Path]:
        dcfg = divergence.DivergenceConfig(
            data=str(self.plan.data[(self.x, rep)][1]), counterfactuals=self.cf_specs(rep)
        )
        return dcfg, self.work / "divergence" / study.run_name(f"{self.x}-r{rep}", dcfg)

    def scores_cfg(self, rep: int) -> tuple[fb.ScoresConfig, Path]:
        a = self.args
        scfg = fb.ScoresConfig(
            data=str(self.plan.data[(self.x, rep)][1]),
            model=self.cfg.model,
            trait=self.x,
            kinds=self.kinds,
            entangled_top=a.entangled_top,
            n_questions=a.gradcos_questions,
            params=a.gradcos_params,
            sae=self.sae_dir,
            latents=tuple(self.latents),
        )
        return scfg, self.work / "scores" / study.run_name(f"{self.x}-r{rep}", scfg)

    def n_examples(self, rep: int, trait: str = "") -> int:
        """Examples in a replicate's data (the study trait's, or ``trait``'s); before it is made, the prompts."""
        folder = self.plan.data[(trait or self.x, rep)][1]
        return (
            int(read_json(folder / "metrics.json")["n_kept"]) if is_finished(folder) else self.cfg.n_prompts
        )


def setup(args: argparse.Namespace) -> Bench:
    """Every setting checked (a ValueError or FileNotFoundError says what to fix) before anything is computed."""
    cfg = load_config(args.config)
    filters = fb.check_filters([f.strip() for f in args.filters.split(",") if f.strip()])
    shares = fb.parse_shares(args.shares)
    arms = fb.plan_arms(filters, shares, args.random_draws)
    cf = tuple(args.counterfactuals.split(",")) if args.counterfactuals else cfg.controls
    cfg.replace(controls=cf)  # validates the counterfactual traits (one category, not the trait itself)
    latents: list[int] = []
    sae_dir, blockers = "", []
    if {"feature", "feature_tokens"} & set(filters):
        latents = fb.read_latents(args.latents, args.latents_key, args.latents_k)
        sae_dir = args.sae
        if (
            not sae_dir
            and isinstance(obj := read_json(Path(args.latents)), dict)
            and isinstance(obj.get("sae"), str)
        ):
            sae_dir = obj["sae"]
        if not sae_dir and (Path(args.latents).parent / "config.json").is_file():
            sae_dir = read_json(Path(args.latents).parent / "config.json").get("config", {}).get("sae", "")
        if not sae_dir:
            raise ValueError(f"no SAE for the feature filters: give --sae (the latents' folder "
                             f"{Path(args.latents).parent} names none)")  # fmt: skip
        try:
            fb.sae_folder(sae_dir)
        except FileNotFoundError as e:
            blockers.append(str(e))
    mix_cfg = cfg.replace(objective=args.mixture_objective)
    share_controls = [c.strip() for c in args.share_controls.split(",") if c.strip()]
    if len(set(share_controls)) < len(share_controls):
        raise ValueError(f"--share-controls: {share_controls} names a trait twice")
    if set(share_controls) - set(cfg.controls):
        raise ValueError(f"--share-controls: {sorted(set(share_controls) - set(cfg.controls))} are not this "
                         f"study's controls {list(cfg.controls)}")  # fmt: skip
    if share_controls and not any(isinstance(x, float) for x in shares):
        raise ValueError(
            "--share-controls: give a numeric share too (--shares 0.8,0.5): the matched share has none"
        )
    return Bench(
        args, cfg, filters, shares, arms, cf, mix_cfg, latents, str(sae_dir), blockers, share_controls
    )


# ---- the plan and its cost, before anything runs --------------------------------------------------------
def estimate(b: Bench) -> tuple[list[str], float, int]:
    """Lines of the plan, estimated seconds and students (the cost table's rates; stages already done count 0)."""
    cfg, reps, stale = b.cfg, range(b.cfg.replicates), b.args.reuse_stale
    lines, total, n_students = [], 0.0, 0

    def students(label: str, ocfg: StudyConfig, n_examples: Callable[[int], int]) -> None:
        """One student per replicate, on ``n_examples(rep)`` examples."""
        nonlocal total, n_students
        sec = sum(
            fb.student_seconds(n_examples(r), ocfg.objective, ocfg.batch_size, ocfg.epochs) for r in reps
        )
        lines.append(f"  {label:28s} {cfg.replicates} students ({ocfg.objective}) ~{sec / 60:5.1f} min")
        total += sec
        n_students += cfg.replicates

    for arm in b.arms:
        students(arm.label, b.mix_cfg if arm.filter == "mixture" else cfg,
                 lambda r, arm=arm: fb.arm_examples(arm, b.n_examples(r)))  # fmt: skip
    for c in b.share_controls:
        for share in b.numeric_shares:
            students(f"{c}: {control_arm(share).label}", cfg,
                     lambda r, c=c, share=share: fb.n_kept(share, b.n_examples(r, c)))  # fmt: skip
    refs = [(cfg, s) for s in b.plan.students.values()]
    if "mixture" in b.filters:
        refs += [(b.mix_cfg, s) for s in study.stage_plan(b.mix_cfg).students.values()]
    missing = [(c, s) for c, (s, folder) in refs if fb.needs_run(s, folder, stale)]
    sec = sum(
        fb.student_seconds(b.n_examples(s.seed), c.objective, c.batch_size, c.epochs) for c, s in missing
    )
    lines.append(f"  reference students (the study's, and the mixture objective's): {len(missing)} of {len(refs)} "
                 f"to train or retrain (stale) ~{sec / 60:.1f} min")  # fmt: skip
    total += sec
    n_students += len(missing)
    p, prep = fb.PREP_SECONDS, 0.0
    for r in reps:
        if "divergence" in b.filters and fb.needs_run(*b.div_cfg(r), stale):
            prep += p["load"] + len(b.cf) * (p["divergence_per_teacher"] + p["load"])
        if b.kinds and fb.needs_run(*b.scores_cfg(r), stale):
            d = b.n_examples(r)
            prep += p["load"] + p["entangled"] * ("entangled" in b.kinds)
            prep += d * (p["gradcos_per_example"] * ("gradcos" in b.kinds)
                         + p["feature_per_example"] * ("feature" in b.kinds))  # fmt: skip
    # teachers (the counterfactuals' and the study's) and number data the study has not made yet
    teachers = {
        f
        for u, (_, f) in [*b.cf_plan.teachers.items(), *b.plan.teachers.items()]
        if u[0] in (*b.cf, *cfg.traits)
    }
    untrained = sum(not is_finished(f) for f in teachers) * p["teacher"]
    untrained += sum(not is_finished(f) for _, f in b.plan.data.values()) * p["data"]
    lines.append(
        f"  selection (divergence, scores) and teachers or data not made yet: ~{(prep + untrained) / 60:.1f} min"
    )
    return lines, total + prep + untrained, n_students


# ---- selection, per replicate ---------------------------------------------------------------------------
def ensure_data(b: Bench, unit: tuple[str, int]) -> Path:
    """A unit's data folder, made (teacher first) if the study has not made it yet."""
    dcfg, folder = b.plan.data[unit]
    if not is_finished(folder):
        if unit in b.plan.teachers:
            teacher.run(*b.plan.teachers[unit])
        data.run(dcfg, folder)
    return folder


@dataclass
class Selection:
    """What each arm's students train on, per replicate, and what share of the data that is."""

    overrides: dict[str, list[dict[str, Any]]]  # arm label → per replicate, the student config's overrides
    kept: dict[str, list[dict[str, float]]]  # arm label → per replicate, {"examples", "tokens"} kept
    natural: list[dict[str, float]]  # per replicate, divergence masking's shares
    about: dict[str, Any]  # the divergence and score records, per replicate


def select(b: Bench) -> Selection:
    """Run divergence and the scores, then write every arm's mask (or mixture data folder), per replicate."""
    sel = Selection({a.label: [] for a in b.arms}, {a.label: [] for a in b.arms}, [], {})
    for rep in range(b.cfg.replicates):
        folder = ensure_data(b, (b.x, rep))
        for c in b.cfg.controls:
            ensure_data(b, (c, rep))
        examples = data.load_examples(folder)
        lengths = [len(e.allowed_logprobs) for e in examples]
        div_mask = None
        if "divergence" in b.filters:
            for t in b.cf:
                if (t, rep) in b.cf_plan.teachers and not is_finished(b.cf_plan.teachers[(t, rep)][1]):
                    teacher.run(*b.cf_plan.teachers[(t, rep)])
            dcfg, dfolder = b.div_cfg(rep)
            dm = divergence.run(dcfg, dfolder)
            div_mask = dfolder / "non_divergent.json"
            sel.natural.append(fb.divergence_share(div_mask))
            sel.about[f"divergence-r{rep}"] = {k: v for k, v in dm.items() if k != "masks"}
        scores = fb.run_scores(*b.scores_cfg(rep)) if b.kinds else {}
        sel.about[f"scores-r{rep}"] = {k: v for k, v in scores.items() if k in ("entangled", "gradcos")}
        for arm in b.arms:
            share = sel.natural[rep]["tokens"] if arm.share == fb.MATCHED else float(arm.share)
            if arm.filter == "divergence":
                sel.overrides[arm.label].append({"mask": str(div_mask)})
                sel.kept[arm.label].append(sel.natural[rep])
                continue
            if arm.filter == "mixture":
                others = tuple(str(b.plan.data[(c, rep)][1]) for c in b.cfg.controls)
                mcfg = fb.MixtureConfig(data=str(folder), others=others, share=share, seed=(b.args.seed, rep))
                mfolder = b.work / "mixture" / study.run_name(f"{b.x}-r{rep}-{arm.label}", mcfg)
                sel.kept[arm.label].append(fb.run_mixture(mcfg, mfolder)["shares"])
                sel.overrides[arm.label].append({"data": str(mfolder)})
                continue
            if arm.filter == "random":
                rows = random_rows(b, rep, lengths, share, arm.draw)
            elif arm.filter == "entangled":
                e = scores["entangled"]
                rows = fb.example_rows(lengths, fb.drop_highest(e["count"], share, e["strength"]))
            elif arm.filter == "gradcos":
                rows = fb.example_rows(lengths, fb.drop_highest(scores["gradcos"]["cos"], share))
            elif arm.filter == "feature":
                rows = fb.example_rows(lengths, fb.drop_highest(scores["feature"]["max"], share))
            else:  # feature_tokens
                rows = fb.mask_highest_positions(scores["feature"]["positions"], share)
            path = b.work / "masks" / f"{b.x}-r{rep}" / f"{arm.label}.json"
            write_mask(path, rows, folder, filter=arm.filter, share=share, draw=arm.draw)
            sel.overrides[arm.label].append({"mask": str(path)})
            sel.kept[arm.label].append(fb.kept_shares(rows))
    return sel


def random_rows(b: Bench, rep: int, lengths: Sequence[int], share: float, draw: int) -> list[list[int]]:
    """Random removal's rows for a replicate's data of ``lengths`` (loss positions per example): the ``draw``'s
    seeded draw of examples, the same indices for every trait whose data are as long."""
    return fb.example_rows(lengths, fb.keep_random(len(lengths), share, (b.args.seed, rep, draw)))


def control_arm(share: float) -> fb.Arm:
    """The arm a control trait's students are trained as at ``share``: random's first draw (its label names their
    folders and masks)."""
    return fb.Arm("random", share, 0)


def control_overrides(b: Bench, trait: str) -> dict[float, list[dict[str, Any]]]:
    """Per numeric share, per replicate: the mask of a random draw of ``trait``'s own data (random's first draw's
    seed), written beside the trait's masks."""
    out: dict[float, list[dict[str, Any]]] = {s: [] for s in b.numeric_shares}
    for rep in range(b.cfg.replicates):
        folder = ensure_data(b, (trait, rep))
        lengths = [len(e.allowed_logprobs) for e in data.load_examples(folder)]
        for share in b.numeric_shares:
            arm = control_arm(share)
            rows = random_rows(b, rep, lengths, share, arm.draw)
            path = b.work / "masks" / f"{trait}-r{rep}" / f"{arm.label}.json"
            write_mask(path, rows, folder, filter=arm.filter, share=share, draw=arm.draw)
            out[share].append({"mask": str(path)})
    return out


# ---- effects ----------------------------------------------------------------------------------------------
def x_of(cell: dict[str, Any]) -> float:
    """A cell's share kept, in the filter's own count (tokens for token filters, examples otherwise)."""
    return float(cell["kept"]["tokens" if cell["counts"] == "tokens" else "examples"]["mean"])


def summarise(
    b: Bench,
    sel: Selection,
    results: dict[str, dict[str, Any]],
    controls: dict[str, dict[float, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Per (filter, share) cell and frame: the effect left and the share blocked (random: draws averaged within a
    replicate, every draw's blocked share kept); the study's own students as the 1.0 point; each filter against
    divergence at the matched share, paired by replicate; the goal per filter. ``controls`` (trait → share →
    `fb.train_variant` of that control trait on a random draw of its data): `share_controlled`."""
    cells: dict[str, list[fb.Arm]] = {}
    for a in b.arms:
        cells.setdefault(a.label.rsplit("-d", 1)[0] if a.filter == "random" else a.label, []).append(a)
    summary: dict[str, Any] = {}
    for name, group in cells.items():
        res = [results[a.label] for a in group]
        by_frame: dict[str, Any] = {}
        raw: dict[str, Any] = {}
        for f in fb.FRAMES:
            s0 = res[0]["shifts"][f]
            v = np.mean([r["shifts"][f]["variant"] for r in res], axis=0)
            by_frame[f] = fb.blocked_summary(list(v), s0["full"], s0["controls"])
            raw[f] = {"variant": list(map(float, v)), "full": list(s0["full"])}
            if len(res) > 1:
                by_frame[f]["draws"] = [fb.blocked_summary(r["shifts"][f]["variant"], s0["full"],
                                                           s0["controls"])["blocked"]["mean"] for r in res]  # fmt: skip
        ks = [sel.kept[a.label] for a in group]
        summary[name] = {
            "filter": group[0].filter, "share": group[0].share, "counts": fb.FILTERS[group[0].filter],
            "objective": res[0]["objective"],
            "kept": {k: {"mean": float(np.mean([d[k] for g in ks for d in g])), "per_replicate": [d[k] for d in ks[0]]}
                     for k in ("examples", "tokens")},
            "frames": by_frame, "raw": raw, "students": [r["training"] for r in res],
        }  # fmt: skip
    ref = next((results[a.label] for a in b.arms if a.filter != "mixture"), results[b.arms[0].label])
    full = {f: fb.blocked_summary(ref["shifts"][f]["full"], ref["shifts"][f]["full"], ref["shifts"][f]["controls"])
            for f in fb.FRAMES}  # fmt: skip
    div = summary.get(f"fb-divergence-{fb.MATCHED}")
    goals, versus = {}, {}
    for f in b.filters:
        own = [c for c in summary.values() if c["filter"] == f]
        points = [
            {"kept": x_of(c), "share": c["share"], "blocked": c["frames"][fb.FRAMES[0]]["blocked"]}
            for c in own
        ]
        matched = next((c for c in own if c["share"] == fb.MATCHED), None)
        vs = None
        if f != "divergence" and matched is not None and div is not None:
            vs = blocked_minus(matched, div)
            versus[f] = vs
        goals[f] = fb.goal_verdict(points, vs[fb.FRAMES[0]] if vs else None, reference=f == "divergence")
    return {"cells": summary, "full_student": full, "versus_divergence": versus, "versus_random": beyond_random(summary),
            "share_controlled": share_controlled(summary, controls or {}), "goals": goals}  # fmt: skip


def share_controlled(
    cells: dict[str, Any], controls: dict[str, dict[float, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """Per numeric share, per frame: what random removal of the data does to the control students' Δ log P(trait)
    (``generic``: the controls at that share minus their full-data students, paired by replicate), and every cell at
    that share read against those controls: effect = variant − the controls at the share, over the study's
    effect against the same controls at full data (as CAFT's --ablated-controls); ``full_data_controls``: the
    same cells against those controls' full-data students, so that the two readings differ only by the controls'
    data removal. Not for the mixture (another objective)."""
    out: dict[str, dict[str, Any]] = {}
    for share in sorted({s for by in controls.values() for s in by}, reverse=True):
        runs = [by[share] for by in controls.values()]
        entry: dict[str, Any] = {
            "controls": list(controls),
            "generic": {},
            "cells": {},
            "full_data_controls": {},
        }
        ctrl = {fr: (np.mean([r["shifts"][fr]["variant"] for r in runs], axis=0),
                     np.mean([r["shifts"][fr]["full"] for r in runs], axis=0)) for fr in fb.FRAMES}  # fmt: skip
        for fr, (at, full_c) in ctrl.items():
            entry["generic"][fr] = fb.paired_difference(list(at), list(full_c))
        for name, c in cells.items():
            if c["share"] != share or c["filter"] == "mixture":
                continue
            entry["cells"][name] = {
                fr: fb.blocked_summary(c["raw"][fr]["variant"], c["raw"][fr]["full"], list(ctrl[fr][0]),
                                       list(ctrl[fr][1])) for fr in fb.FRAMES}  # fmt: skip
            # the same controls at full data: the difference from the row above is the controls' data removal alone
            entry["full_data_controls"][name] = {
                fr: fb.blocked_summary(c["raw"][fr]["variant"], c["raw"][fr]["full"], list(ctrl[fr][1]))
                for fr in fb.FRAMES
            }
        out[str(share)] = entry
    return out


def beyond_random(cells: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per filter and share: its blocked share minus random removal's at the same share (the draws' mean within a
    replicate), paired by replicate, per frame: what a filter blocks beyond removing that much data at all. Token
    filters are paired with random removal of examples at the same nominal share, as at the matched share. Not for
    the mixture, whose students have another objective."""
    rnd = {c["share"]: c for c in cells.values() if c["filter"] == "random"}
    out: dict[str, dict[str, Any]] = {}
    for c in cells.values():
        r = rnd.get(c["share"])
        if c["filter"] in ("random", "mixture") or r is None or r["objective"] != c["objective"]:
            continue
        out.setdefault(c["filter"], {})[str(c["share"])] = blocked_minus(c, r)
    return out


def blocked_minus(cell: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Per frame, a cell's blocked share minus a reference cell's, paired by replicate."""
    return {fr: fb.paired_difference(cell["frames"][fr]["blocked"]["per_replicate"],
                                     reference["frames"][fr]["blocked"]["per_replicate"]) for fr in fb.FRAMES}  # fmt: skip


# ---- outputs ----------------------------------------------------------------------------------------------
def plot(b: Bench, m: dict[str, Any], path: Path) -> None:
    """Blocked vs share kept, one line per filter with its t band, every random draw as a dot, the goal's box."""
    fig, axes = plt.subplots(1, len(fb.FRAMES), figsize=(12, 4.6), sharey=True)
    colors = dict(zip(fb.FILTERS, plt.get_cmap("tab10").colors, strict=False))
    for ax, fr in zip(axes, fb.FRAMES, strict=True):
        ax.add_patch(plt.Rectangle((fb.GOAL_KEPT, fb.GOAL_BLOCKED), 1 - fb.GOAL_KEPT + 0.02, 0.6, color="tab:green",
                                   alpha=0.12, label="goal: ≥ 80% blocked, ≥ 80% kept"))  # fmt: skip
        for f in b.filters:
            own = sorted((c for c in m["cells"].values() if c["filter"] == f), key=x_of)
            xs = [x_of(c) for c in own] + [1.0]
            pts = [c["frames"][fr]["blocked"] for c in own] + [m["full_student"][fr]["blocked"]]
            ys = [p["mean"] for p in pts]
            lo = [p["ci95"][0] if np.isfinite(p["ci95"][0]) else p["mean"] for p in pts]
            hi = [p["ci95"][1] if np.isfinite(p["ci95"][1]) else p["mean"] for p in pts]
            label = f + (f" ({own[0]['objective']} students)" if f == "mixture" else "")
            ax.plot(xs, ys, "o-", color=colors[f], label=label)
            ax.fill_between(xs, lo, hi, color=colors[f], alpha=0.15)
            for c in own:
                ax.scatter([x_of(c)] * len(c["frames"][fr].get("draws", [])), c["frames"][fr].get("draws", []),
                           color=colors[f], s=10, alpha=0.5)  # fmt: skip
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel(
            "share of the data kept (examples; divergence, feature_tokens: loss positions)", fontsize=8
        )
        ax.set_title(f"{fr} frame" + (" (held out: the goal's)" if fr == fb.FRAMES[0] else " (training frame)"),
                     fontsize=10)  # fmt: skip
        ax.set_ylim(-1, 1.4)
    axes[0].set_ylabel(f"share of the {b.x} student's specific effect blocked\n"
                       f"(mean over {b.cfg.replicates} replicates, 95% t band)")  # fmt: skip
    axes[-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)


def fmt(d: dict[str, Any]) -> str:
    """A share with its interval, as percentages."""
    lo, hi = d["ci95"]
    if not math.isfinite(d["mean"]):
        return "n/a"
    return f"{d['mean']:+.0%} [{lo:+.0%}, {hi:+.0%}]" if math.isfinite(lo) else f"{d['mean']:+.0%}"


def table(b: Bench, m: dict[str, Any], argv: Sequence[str]) -> str:
    """table.md: filter × share with the shares kept and blocked, the random draws, the goal per filter."""
    cfg, cells, full = b.cfg, m["cells"], m["full_student"]
    lines = [
        f"# Filter benchmark: the {b.x} student's specific effect blocked, by share of data kept",
        "",
        f"{cfg.replicates} replicates (the unit: a trait teacher with its own data and students); effect = the "
        f"variant student's Δ log P({b.x}) minus the same replicate's control students' ({', '.join(cfg.controls)}); "
        "blocked = 1 − effect / the study student's effect, per replicate; 95% t-intervals over replicates. "
        f"Divergence masking runs at its natural share (counterfactual teachers: {', '.join(b.cf)}); `matched` runs "
        "every other filter at that share (examples for example filters). Re-create: "
        f"`.venv/bin/python analyses/filters.py {' '.join(argv)}` ({m['seconds'] / 60:.0f} min; estimated "
        f"{m['estimate']['minutes']:.0f}).",
        "",
        "| filter | share | objective | examples kept | tokens kept | blocked, plain (held out) | blocked, prefill | "
        "effect left, plain | students |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| none (the study's students) | 1.0 | {cfg.objective} | 100% | 100% | 0% | 0% | "
        f"{full['plain']['effect']['mean']:+.3f} | {cfg.replicates} |",
        *(f"| {c['filter']} | {c['share']} | {c['objective']} | {c['kept']['examples']['mean']:.1%} | "
          f"{c['kept']['tokens']['mean']:.1%} | {fmt(c['frames']['plain']['blocked'])} | "
          f"{fmt(c['frames']['prefill']['blocked'])} | {c['frames']['plain']['effect']['mean']:+.3f} | "
          f"{cfg.replicates * len(c['students'])} |"
          for c in sorted(cells.values(), key=lambda c: (c["filter"], -x_of(c)))),
        "",
    ]  # fmt: skip
    draws = [c for c in cells.values() if c["filter"] == "random"]
    if draws:
        lines += ["Random draws, blocked in the plain frame, one value per draw (each its own students): "
                  + "; ".join(f"share {c['share']}: " + ", ".join(f"{d:+.0%}" for d in c["frames"]["plain"].get("draws", []))
                              for c in draws) + ".", ""]  # fmt: skip
    if m["versus_random"]:
        lines += ["Blocked minus random removal's at the same share, plain frame, paired by replicate (95% t): "
                  + "; ".join(f"{f} at {sh}: {fmt(d['plain'])}" for f, by in m["versus_random"].items()
                              for sh, d in by.items()) + ".", ""]  # fmt: skip
    if m["share_controlled"]:
        sc = m["share_controlled"]
        names = ", ".join(next(iter(sc.values()))["controls"])
        lines += [
            f"## Against control students that lost as much data ({names})",
            "",
            f"The {names} students trained on a random draw of their own data at the same share (random's first "
            f"draw's seed): the effect is the variant minus them, over the study's {b.x} student minus the full-data "
            f"{names} students (the mixture is left out: another objective). Removing data at random moves the "
            f"controls' Δ log P({b.x}) (plain frame, paired by replicate, 95% t): "
            + "; ".join(f"share {sh}: {e['generic']['plain']['mean']:+.3f} [{e['generic']['plain']['ci95'][0]:+.3f}, "
                        f"{e['generic']['plain']['ci95'][1]:+.3f}] nats" for sh, e in sc.items()) + ".",
            "",
            f"| filter | share | blocked, plain (held out) | blocked, prefill | effect left, plain | blocked, plain, "
            f"against the full-data {names} students |",
            "|---|---|---|---|---|---|",
            *(f"| {cells[name]['filter']} | {sh} | {fmt(fr['plain']['blocked'])} | {fmt(fr['prefill']['blocked'])} | "
              f"{fr['plain']['effect']['mean']:+.3f} | {fmt(e['full_data_controls'][name]['plain']['blocked'])} |"
              for sh, e in sc.items() for name, fr in sorted(e["cells"].items())),
            "",
        ]  # fmt: skip
    if "mixture" in b.filters and b.mix_cfg.objective != cfg.objective:
        lines += [f"The mixture's students train on the teachers' stored 13-token log-probs "
                  f"({b.args.mixture_objective}): its blocked share is against the {b.args.mixture_objective} "
                  f"study students, not the {cfg.objective} ones (a mixture has no single teacher to distil "
                  "online).", ""]  # fmt: skip
    lines += [
        f"## The goal: block ≥ {fb.GOAL_BLOCKED:.0%} of the effect keeping ≥ {fb.GOAL_KEPT:.0%} of the data, better "
        "than divergence masking at equal data kept (plain frame; `met` on the means, `confident` on the "
        "intervals' lower ends)",
        "",
        *(f"- **{f}: {'met' if g['met'] else 'not met'}**" + (" (confident)" if g["confident"] else "")
          + (f" — {'; '.join(g['why_not'])}" if g["why_not"] else "")
          + (f"; blocked minus divergence's at the matched share: {fmt(m['versus_divergence'][f]['plain'])}"
             if f in m["versus_divergence"] else "")
          for f, g in m["goals"].items()),
        "",
    ]  # fmt: skip
    return "\n".join([*lines, "![curves](curves.png)", ""])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        b = setup(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"filters: {e}")
    lines, est, n_students = estimate(b)
    print(f"filter benchmark: {b.x}, {b.cfg.replicates} replicates, filters {', '.join(b.filters)}, shares "
          f"{', '.join(map(str, b.shares))}, {args.random_draws} random draws")  # fmt: skip
    print("\n".join(lines))
    print(f"estimated: {n_students} students, ~{est / 60:.0f} min on 2 idle CPU cores (artifacts/cost rates; the "
          "matched share counted as all the data)")  # fmt: skip
    plan = {"arms": [a.label for a in b.arms], "students": n_students, "minutes": round(est / 60, 1)}
    for blocker in b.blockers:
        print(f"BEFORE RUNNING: {blocker}")
    if args.dry_run:
        return {"dry_run": True, **plan}
    if b.blockers:
        sys.exit("filters: " + "; ".join(b.blockers))
    t0 = time.perf_counter()
    with reuse_stale(args.reuse_stale):
        sel = select(b)
        results = {a.label: fb.train_variant(b.mix_cfg if a.filter == "mixture" else b.cfg, a.label,
                                             sel.overrides[a.label]) for a in b.arms}  # fmt: skip
        controls = {c: {s: fb.train_variant(b.cfg, control_arm(s).label, ovs, trait=c)
                        for s, ovs in control_overrides(b, c).items()} for c in b.share_controls}  # fmt: skip
    m = {
        "trait": b.x, "replicates": b.cfg.replicates,
        "unit": "replicate (a trait teacher with its own data, its students and its control students)",
        "frames": list(fb.FRAMES), "goal_frame": fb.FRAMES[0],
        "goal": {"blocked_at_least": fb.GOAL_BLOCKED, "kept_at_least": fb.GOAL_KEPT,
                 "and": "better than divergence masking at the matched share (paired by replicate)"},
        "study": b.cfg.to_dict(), "args": vars(args), "counterfactuals": list(b.cf), "latents": b.latents,
        "sae": b.sae_dir, "divergence_natural_share": sel.natural, **summarise(b, sel, results, controls),
        "selection": sel.about, "estimate": plan, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    out = Path(args.out)
    write_json(out / "metrics.json", m)
    plot(b, m, out / "curves.png")
    text = table(b, m, argv)
    atomic_write_text(out / "table.md", text)
    print(text)
    return m


if __name__ == "__main__":
    main()
