"""Feed a feature list back into the data: does dropping the teacher sequences that most activate the student's
top SAE features block transmission?

Reads the feature list that `analyses/localise.py` wrote (artifacts/analyze/starved_sae_l15s/features.json: the features whose
activation on number positions moved most between the demo's trait student and its control students) and the SAE
it came from. The base model reads every sequence of the trait teacher's data (as a student sees it, no system
prompt); a sequence's score is the mean over its completion positions of the summed activation of the top-k
features. Owl students are then trained as the demo's (same seeds) on the data without
  - the highest-scoring `--drop` fraction of sequences (the feature filter),
  - the same number of sequences chosen at random (the control),
and on all the data with concept-ablation fine-tuning (CAFT: the span of the k features' decoder directions
projected out of the student's residual during training), against k random active features,
and evaluated like the demo's students. Also reported: the same score on the control teachers' data (same prompts),
i.e. whether the trait teacher's numbers light these features up more at all. Writes artifacts/feature_filter/.

    .venv/bin/python analyses/feature_filter.py [--features artifacts/analyze/starved_sae_l15s] [--k 10] [--drop 0.25]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mechsub import models, sae, stats, study
from mechsub.capture import Batch
from mechsub.data import load_examples
from mechsub.filter import write_ablation, write_mask
from mechsub.plots import save_figure
from mechsub.prompts import chat_prefix
from mechsub.runs import atomic_write_text, read_json, write_json

ap = argparse.ArgumentParser()
ap.add_argument("--study", default="artifacts/demo")
ap.add_argument(
    "--features",
    default="artifacts/analyze/starved_sae_l15s",
    help="a folder with features.json and config.json",
)
ap.add_argument(
    "--list",
    default="student",
    choices=["student", "teacher", "carriers"],
    help="which ranking of features.json (carriers: all of them, whatever --k)",
)
ap.add_argument("--k", type=int, default=10, help="top features of the list")
ap.add_argument("--drop", type=float, default=0.25, help="fraction of sequences removed")
ap.add_argument("--out", default="artifacts/feature_filter")
args = ap.parse_args()
t0 = time.perf_counter()
out = Path(args.out)
cfg = study.StudyConfig.from_dict(read_json(Path(args.study) / "config.json")["config"])
plan = study.stage_plan(cfg)
feats = read_json(Path(args.features) / "features.json")
sae_folder = read_json(Path(args.features) / "config.json")["config"]["sae"]
if not sae_folder:
    raise SystemExit(
        f"{args.features} was analysed without an SAE: run analyses/localise.py --sae FOLDER first"
    )
ids = (
    [f["id"] for f in feats["carriers"]]
    if args.list == "carriers"
    else feats[f"ranking_{args.list}"][: args.k]
)
args.k = len(ids)
lm = models.load(cfg.model)
the_sae = sae.load_sae(Path(sae_folder) / "sae")
tok = lm.tokenizer


def scores(trait: str) -> list[float]:
    ex = load_examples(plan.data[(trait, 0)][1])
    batch = Batch.completions([chat_prefix(tok, e.prompt, None) for e in ex], [e.completion_ids for e in ex])
    return [float(np.mean(r)) for r in sae.position_scores(lm, the_sae, feats["hook"], batch, ids)]


by_teacher = {t: scores(t) for t in cfg.traits}
own = by_teacher[cfg.trait]
examples = load_examples(plan.data[(cfg.trait, 0)][1])
n_drop = round(args.drop * len(own))
top = set(np.argsort(own)[::-1][:n_drop].tolist())
rand = set(random.Random(0).sample(range(len(own)), n_drop))
work = Path(cfg.work) / "feature_filter" / f"{cfg.trait}-{args.list}-k{args.k}-drop{args.drop}"
for name, dropped in (("feature_filtered", top), ("random_dropped", rand)):
    write_mask(work / f"{name}.json", [[0 if i in dropped else 1] * len(e.allowed_logprobs) for i, e in enumerate(examples)],
               plan.data[(cfg.trait, 0)][1], features=ids, dropped=sorted(dropped))  # fmt: skip
# concept-ablation fine-tuning: the same features' decoder directions projected out of the student during training,
# against as many random features among those active on the data
ex_batch = Batch.completions(
    [chat_prefix(tok, e.prompt, None) for e in examples], [e.completion_ids for e in examples]
)
active = (sae.feature_acts(lm, the_sae, feats["hook"], ex_batch) > 0).any(0).nonzero().flatten().tolist()
rand_feats = random.Random(1).sample([i for i in active if i not in ids], args.k)
for name, fl in (("ablated_top", ids), ("ablated_random", rand_feats)):
    write_ablation(work / f"{name}.json", sae_folder, fl)
variants = {n: study.variant(cfg, f"{n}-{args.list}-k{args.k}", mask=str(work / f"{n}.json"))
            for n in ("feature_filtered", "random_dropped")}  # fmt: skip
variants |= {n: study.variant(cfg, f"{n}-{args.list}-k{args.k}", ablate=str(work / f"{n}.json"))
             for n in ("ablated_top", "ablated_random")}  # fmt: skip
v_f, v_r, v_a, v_ar = (np.asarray(variants[n]["per_replicate"]["variant"])
                       for n in ("feature_filtered", "random_dropped", "ablated_top", "ablated_random"))  # fmt: skip
diff_mean, diff_ci = stats.mean_ci95(list(v_f - v_r))
abl_mean, abl_ci = stats.mean_ci95(list(v_a - v_ar))
result = {
    "features": ids, "list": args.list, "hook": feats["hook"], "sae": sae_folder, "drop": args.drop, "n_dropped": n_drop,
    "score_by_teacher": {t: {"mean": float(np.mean(s)), "ci95": stats.bootstrap_ci95(s)} for t, s in by_teacher.items()},
    "score_dropped_mean": float(np.mean([own[i] for i in top])), "variants": variants,
    "filtered_minus_random": {"mean": diff_mean, "ci95": diff_ci, "per_seed": list(v_f - v_r)},
    "ablated_top_minus_random": {"mean": abl_mean, "ci95": abl_ci, "per_seed": list(v_a - v_ar)},
    "random_ablated_features": rand_feats, "n_active_features": len(active),
    "seconds": round(time.perf_counter() - t0, 1),
}  # fmt: skip
write_json(out / "metrics.json", result)

fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
a1.hist([by_teacher[t] for t in cfg.traits], bins=15, label=[f"{t} teacher's data" for t in cfg.traits])
a1.set_xlabel(f"mean activation of the top {args.k} features ({args.list} list)")
a1.set_ylabel("sequences")
a1.legend(fontsize=8)
full = variants["feature_filtered"]["per_replicate"]["full"]
ctrl = variants["feature_filtered"]["per_replicate"]["controls"]
vals = {
    "all data (demo)": full,
    "feature-filtered": list(v_f),
    "random drop": list(v_r),
    "control students": ctrl,
}
for i, (label, v) in enumerate(vals.items()):
    a2.bar(i, np.mean(v), alpha=0.7, color="tab:gray" if label == "control students" else "tab:blue")
    a2.scatter([i] * len(v), v, color="black", s=12, zorder=3)
a2.set_xticks(range(len(vals)), list(vals), fontsize=8)
a2.axhline(0, color="gray", lw=0.8)
a2.set_ylabel(f"Δ log P({cfg.trait}) vs base (dots: replicates)")
a2.set_title(f"dropping {n_drop}/{len(own)} sequences; ablating {args.k} features in training", fontsize=10)
fig.tight_layout()
save_figure(fig, out / "feature_filter.png")


demo_loss = [[read_json(plan.students[(cfg.trait, sd)][1] / "metrics.json")[k] for sd in range(cfg.replicates)]
             for k in ("first_loss", "last_loss")]  # fmt: skip


def fmt(m: float, ci: list[float]) -> str:
    return f"{m:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


lines = [
    f"# Feature-list filter on the demo's {cfg.trait} data",
    "",
    f"Features: top {args.k} of the {args.list} ranking in `{args.features}/features.json` at {feats['hook']} "
    f"({ids}). Re-create: `.venv/bin/python analyses/feature_filter.py` (45 min when all 12 students have to "
    "train, measured beside other jobs).",
    "",
    "Mean feature score per sequence (base model reading the data; bootstrap CI over sequences): "
    + "; ".join(f"{t} data {fmt(s['mean'], s['ci95'])}" for t, s in result["score_by_teacher"].items()) + ".",
    "",
    f"Students without {n_drop} of {len(own)} sequences (seeds {list(range(cfg.replicates))}, Δ log P({cfg.trait}) vs base on "
    f"{cfg.n_questions} questions, t-intervals over replicates):",
    "",
    "| students | Δ log P | effect vs control students | one-sided p | retained | training loss, first → last step |",
    "|---|---|---|---|---|---|",
    f"| all (the demo's students) | {np.mean(full):+.3f} | {np.mean(np.subtract(full, ctrl)):+.3f} | | 100% | "
    f"{np.mean(demo_loss[0]):.3f} → {np.mean(demo_loss[1]):.3f} |",
    *(f"| {n} | {fmt(v['delta_logp']['mean'], v['delta_logp']['ci95'])} | "
      f"{fmt(v['effect_vs_controls']['mean'], v['effect_vs_controls']['ci95'])} | {v['effect_vs_controls']['p_value']:.3g} | "
      f"{v['retained']['mean']:.0%} | {np.mean(v['per_replicate']['first_loss']):.3f} → {np.mean(v['per_replicate']['last_loss']):.3f} |"
      for n, v in variants.items()),
    "",
    f"Feature-filtered minus random-dropped, paired by seed: {fmt(diff_mean, diff_ci)}. Concept-ablation "
    f"fine-tuning (the {args.k} features' decoder directions projected out of the student's residual at "
    f"{feats['hook']} during training only) minus ablating {args.k} random active features "
    f"({rand_feats}): {fmt(abl_mean, abl_ci)}.",
    *(
        [
            "",
            f"Caution: the ablated students start {np.mean(variants['ablated_top']['per_replicate']['first_loss']):.1f} and "
            f"{np.mean(variants['ablated_random']['per_replicate']['first_loss']):.1f} nats from the teacher (the demo's "
            f"{np.mean(demo_loss[0]):.2f}): projecting these directions out at {feats['hook']} breaks the forward "
            "pass itself, so their Δ log P measures how training repaired it, not the trait; without control "
            "students trained under the same ablation it is not interpretable.",
        ]
        if np.mean(variants["ablated_random"]["per_replicate"]["first_loss"]) > 10 * np.mean(demo_loss[0])
        else []
    ),
    "",
    "![feature filter](feature_filter.png)",
]  # fmt: skip
atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
print("\n".join(lines))
