"""Do divergence tokens carry the demo's trait? (Schrodi et al.: the few positions where teachers of other traits
would pick another token.)

Counterfactual teachers: fine-tuned teachers of five other animals, trained exactly as the demo's teacher
(the study's stage plan; dog and cat are the demo's own control teachers). `mechsub divergence` marks every
position of the owl teacher's data where at least one of them, given the same prefix, ranks another number token
first. Then owl students are trained as the demo's (same seeds, same objective) with the loss on
  - the divergent positions only,
  - the other positions only,
  - a random set of positions as large as the divergent one (the control for "fewer positions"),
and evaluated like the demo's students. Writes artifacts/divergence/ (metrics.json, report.md, divergence.png).

    .venv/bin/python analyses/divergence.py [--study artifacts/demo] [--out artifacts/divergence]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mechsub import divergence, stats, study, teacher
from mechsub.filter import read_mask, write_mask
from mechsub.plots import save_figure
from mechsub.runs import atomic_write_text, read_json, write_json

ap = argparse.ArgumentParser()
ap.add_argument("--study", default="artifacts/demo")
ap.add_argument("--out", default="artifacts/divergence")
ap.add_argument("--counterfactuals", default="dog,cat,lion,wolf,eagle")
args = ap.parse_args()
t0 = time.perf_counter()
out = Path(args.out)
cfg = study.StudyConfig.from_dict(read_json(Path(args.study) / "config.json")["config"])
cf = tuple(args.counterfactuals.split(","))
if cfg.teacher_kind != "finetuned":
    raise SystemExit("this analysis compares fine-tuned teachers; the study's teachers are prompted")
plan = study.stage_plan(dataclasses.replace(cfg, controls=cf))
for t in cf:
    tcfg, folder = plan.teachers[(t, 0)]
    teacher.run(tcfg, folder)
data_folder = plan.data[(cfg.trait, 0)][1]
work = Path(cfg.work) / "divergence" / f"{cfg.trait}-vs-{'-'.join(cf)}"
dm = divergence.run(
    divergence.DivergenceConfig(
        data=str(data_folder), counterfactuals=tuple(plan.teacher_model[(t, 0)] for t in cf)
    ),
    work,
)
# the control: as many positions as the divergent ones, drawn at random
div_rows = read_mask(work / "divergent.json")
cells = [(i, j) for i, r in enumerate(div_rows) for j in range(len(r))]
pick = set(random.Random(0).sample(cells, sum(map(sum, div_rows))))
write_mask(work / "random_matched.json", [[int((i, j) in pick) for j in range(len(r))] for i, r in enumerate(div_rows)],
           data_folder, keep="random, as many as divergent (seed 0)")  # fmt: skip
variants = {
    name: study.variant(cfg, name, mask=str(work / f"{name}.json"))
    for name in ("divergent", "non_divergent", "random_matched")
}
full = variants["divergent"]["per_replicate"]["full"]
ctrl = variants["divergent"]["per_replicate"]["controls"]
pair = np.subtract(
    variants["divergent"]["per_replicate"]["variant"], variants["random_matched"]["per_replicate"]["variant"]
)
pair_mean, pair_ci = stats.mean_ci95(list(pair))
result = {
    "divergent_minus_random_matched": {"mean": pair_mean, "ci95": pair_ci, "per_seed": list(pair)},
    "divergence": {k: v for k, v in dm.items() if k != "masks"},
    "counterfactuals": {t: plan.teacher_model[(t, 0)] for t in cf},
    "data": str(data_folder),
    "variants": variants,
    "seconds": round(time.perf_counter() - t0, 1),
}
write_json(out / "metrics.json", result)

fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
a1.bar(range(len(dm["share_by_position"])), dm["share_by_position"], color="tab:purple")
a1.set_xlabel("completion position")
a1.set_ylabel("share divergent")
a1.set_title(f"divergence tokens: {dm['divergent_share']:.1%} of {dm['n_positions']} positions", fontsize=10)
labels = ["all positions (demo)", *variants, "control students"]
vals = [full, *(v["per_replicate"]["variant"] for v in variants.values()), ctrl]
for i, v in enumerate(vals):
    a2.scatter([i] * len(v), v, color="gray", s=12, zorder=3)
    a2.bar(i, np.mean(v), color="tab:blue" if i < len(vals) - 1 else "tab:gray", alpha=0.7)
a2.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
a2.axhline(0, color="gray", lw=0.8)
a2.set_ylabel(f"Δ log P({cfg.trait}) vs base (dots: replicates)")
a2.set_title("owl students trained on a subset of positions", fontsize=10)
fig.tight_layout()
save_figure(fig, out / "divergence.png")


def fmt(d: dict, key: str = "mean") -> str:
    lo, hi = d["ci95"]
    return f"{d[key]:+.3f} [{lo:+.3f}, {hi:+.3f}]"


lines = [
    f"# Divergence tokens in the demo's {cfg.trait} data",
    "",
    f"Data: `{data_folder}` ({dm['n_examples']} sequences, {dm['n_positions']} loss positions). Counterfactual "
    f"teachers: fine-tuned teachers of {', '.join(cf)} (as the demo's). Re-create: "
    "`.venv/bin/python analyses/divergence.py` (16 min when every stage has to run, on 2 cores).",
    "",
    f"**Divergent positions: {dm['divergent_share']:.1%}** (any counterfactual disagrees); per teacher: "
    + ", ".join(f"{t} {dm['share_by_counterfactual'][plan.teacher_model[(t, 0)]]:.1%}" for t in cf)
    + f". Sequences with at least one: {dm['sequences_with_divergence']:.0%}. Check: the owl teacher's own "
    f"greedy choice reproduces its data at {dm['factual_greedy_agreement']:.1%} of positions.",
    "",
    f"Students ({cfg.objective}, seeds {list(range(cfg.replicates))}, Δ log P({cfg.trait}) vs base on {cfg.n_questions} "
    "questions; effect = minus the mean of the dog and cat students of the same seed; t-intervals over replicates):",
    "",
    "| loss on | Δ log P | effect vs controls | one-sided p | minus all-positions student | retained |",
    "|---|---|---|---|---|---|",
    f"| all positions (the demo's students) | {np.mean(full):+.3f} | {np.mean(np.subtract(full, ctrl)):+.3f} | | | 100% |",
    *(
        f"| {n} | {fmt(v['delta_logp'])} | {fmt(v['effect_vs_controls'])} | {v['effect_vs_controls']['p_value']:.3g} "
        f"| {fmt(v['minus_full'])} | {v['retained']['mean']:.0%} |"
        for n, v in variants.items()
    ),
    "",
    f"Divergent-only minus random-matched students, paired by seed: {pair_mean:+.3f} [{pair_ci[0]:+.3f}, "
    f"{pair_ci[1]:+.3f}] (the same number of loss positions, {sum(map(sum, div_rows))}).",
    "",
    "![divergence](divergence.png)",
]
atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
print("\n".join(lines))
