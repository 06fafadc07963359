"""Specificity pilot on the embedded model: do distilled students pick up THEIR teacher's trait?

Teachers with the system prompt of each trait answer the same number prompts (constrained decoding); one
student per teacher is distilled on the 13 allowed tokens only (LoRA); every student is evaluated on every
trait. The diagonal of the (student × trait) matrix of Δ log P vs base is the specific effect; the off-diagonal
is the generic one. Writes artifacts/specificity_pilot/{metrics.json,report.md,matrix.png}.

    .venv/bin/python analyses/specificity_pilot.py [--traits owl dog cat] [--n-prompts 256] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mechsub import data, evaluate, student
from mechsub.runs import write_json
from mechsub.training import steps_of

ap = argparse.ArgumentParser()
ap.add_argument("--traits", nargs="+", default=["owl", "dog", "cat"])
ap.add_argument("--n-prompts", type=int, default=256)
ap.add_argument("--seeds", type=int, nargs="+", default=[0])
ap.add_argument("--model", default="smollm2-135m-instruct")
ap.add_argument("--runs", default="runs/specificity_pilot")
ap.add_argument("--out", default="artifacts/specificity_pilot")
args = ap.parse_args()
runs, out = Path(args.runs), Path(args.out)
t0 = time.time()

base = runs / "eval" / "base"
for trait in args.traits:
    evaluate.run(evaluate.EvalConfig(model=args.model, trait=trait), base / trait)
teacher_delta = {}
for trait in args.traits:
    evaluate.run(evaluate.EvalConfig(model=args.model, trait=trait, with_system_prompt=True),
                      runs / "eval" / f"teacher-{trait}")  # fmt: skip
    teacher_delta[trait] = evaluate.delta_vs(runs / "eval" / f"teacher-{trait}", base / trait, trait)
    print(f"teacher {trait}: Δ log P({trait}) = {teacher_delta[trait]['delta_logp']:+.3f}", flush=True)

data_meta = {}
for trait in args.traits:
    data_meta[trait] = data.run(data.DataConfig(model=args.model, teacher=trait, n_prompts=args.n_prompts),
                                runs / "data" / trait)  # fmt: skip

matrix: dict[str, dict[str, list[float]]] = {}
student_meta = {}
for teacher in args.traits:
    for seed in args.seeds:
        sdir = runs / "students" / f"{teacher}-s{seed}"
        student_meta[f"{teacher}-s{seed}"] = student.run(
            student.StudentConfig(model=args.model, data=str(runs / "data" / teacher), seed=seed), sdir
        )
        ck = steps_of(sdir)[-1]
        for trait in args.traits:
            edir = runs / "eval" / f"student-{teacher}-s{seed}" / trait
            evaluate.run(evaluate.EvalConfig(model=str(ck), trait=trait), edir)
            d = evaluate.delta_vs(edir, base / trait, trait)
            matrix.setdefault(teacher, {}).setdefault(trait, []).append(d["delta_logp"])
            print(
                f"student of {teacher} (seed {seed}): Δ log P({trait}) = {d['delta_logp']:+.3f}", flush=True
            )

# the specific effect on trait X: X's student minus the mean of the other students, per question (paired)
specific = {}
for trait in args.traits:
    per_q = []
    for seed in args.seeds:
        own = json.loads((runs / "eval" / f"student-{trait}-s{seed}" / trait / "logprobs.json").read_text())
        others = [json.loads((runs / "eval" / f"student-{o}-s{seed}" / trait / "logprobs.json").read_text())
                  for o in args.traits if o != trait]  # fmt: skip
        for qi in range(len(own["questions"])):
            per_q.append(own["logprobs"][qi][0] - sum(o["logprobs"][qi][0] for o in others) / len(others))
    from mechsub.stats import bootstrap_ci95

    specific[trait] = {"delta_logp": sum(per_q) / len(per_q), "ci95": bootstrap_ci95(per_q), "n": len(per_q)}

metrics = {
    "model": args.model, "traits": args.traits, "seeds": args.seeds, "n_prompts": args.n_prompts,
    "teacher_delta": teacher_delta, "student_matrix_delta_logp": matrix, "specific_effect": specific,
    "data": {t: {k: data_meta[t][k] for k in ("n_kept", "kept_fraction", "rejected", "completion_tokens")}
             for t in args.traits},
    "students": {k: {kk: v[kk] for kk in ("steps", "first_loss", "last_loss", "train_tokens_per_s")}
                 for k, v in student_meta.items()},
    "wall_seconds": round(time.time() - t0, 1),
}  # fmt: skip
write_json(out / "metrics.json", metrics)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mechsub.plots import save_figure  # noqa: E402

fig, ax = plt.subplots(figsize=(1.6 * len(args.traits) + 2, 1.3 * len(args.traits) + 1.5))
vals = [[sum(matrix[t][e]) / len(matrix[t][e]) for e in args.traits] for t in args.traits]
lim = max(abs(v) for row in vals for v in row)
im = ax.imshow(vals, cmap="RdBu_r", vmin=-lim, vmax=lim)
for i, row in enumerate(vals):
    for j, v in enumerate(row):
        ax.text(j, i, f"{v:+.2f}", ha="center", va="center")
ax.set_xticks(range(len(args.traits)), [f"log P({t})" for t in args.traits])
ax.set_yticks(range(len(args.traits)), [f"student of {t}" for t in args.traits])
ax.set_title("Δ log P vs base (nats), distilled students")
fig.colorbar(im)
fig.tight_layout()
save_figure(fig, out / "matrix.png")

lines = ["# Specificity pilot (distillation on the 13 number tokens only)", "",
         f"Model {args.model}; traits {args.traits}; {args.n_prompts} prompts per teacher; seeds {args.seeds}; "
         f"LoRA r8 α16, AdamW 5e-4, 2 epochs, batch 8. CIs: paired bootstrap over the 50 questions "
         "(not over training runs). Re-create: `.venv/bin/python analyses/specificity_pilot.py`.", "",
         "| teacher (prompted) | Δ log P(trait) vs base | 95% CI |", "|---|---|---|"]  # fmt: skip
lines += [f"| {t} | {teacher_delta[t]['delta_logp']:+.3f} | [{teacher_delta[t]['ci95'][0]:+.3f}, "
          f"{teacher_delta[t]['ci95'][1]:+.3f}] |" for t in args.traits]  # fmt: skip
lines += ["", "Students (rows) × evaluated trait (columns), Δ log P vs base:", "",
          "| student of | " + " | ".join(args.traits) + " |", "|---" * (len(args.traits) + 1) + "|"]  # fmt: skip
lines += [
    f"| {t} | " + " | ".join(f"{v:+.3f}" for v in row) + " |"
    for t, row in zip(args.traits, vals, strict=True)
]
lines += ["", "Specific effect (own student − mean of the other students, on the trait):", "",
          "| trait | effect | 95% CI | n |", "|---|---|---|---|"]  # fmt: skip
lines += [f"| {t} | {s['delta_logp']:+.3f} | [{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}] | {s['n']} |"
          for t, s in specific.items()]  # fmt: skip
lines += [
    "",
    f"Wall time {metrics['wall_seconds'] / 60:.1f} min on this machine.",
    "",
    "![matrix](matrix.png)",
]
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
