"""What transmits at 135M? A sweep of teacher kind × decoding × student objective × dataset size.

Every cell is a full study (`mechsub.study`): teachers of the trait and its controls answer the same prompts,
students are trained from the same initialisation, and the effect is the SPECIFIC one (the trait's students
minus the other traits' students, on the trait). Stage runs are shared through `runs/study` (the demo's cell
reuses the demo's stages). Writes artifacts/sweep/{table.md,sweep.png,cells/<name>.json}.

    .venv/bin/python analyses/sweep.py                 # every cell (about an hour on 2 cores after the demo)
    .venv/bin/python analyses/sweep.py --cells sft_prompted restricted
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mechsub import study
from mechsub.plots import plt, save_figure
from mechsub.runs import atomic_write_text, write_json

# Each cell is the default study (= the demo: fine-tuned teachers, greedy constrained decoding, 64 prompts,
# full-vocabulary distillation, 8 steps at lr 2e-3, 3 seeds, cross-family Gemma control) with these overrides.
PROMPTED_T1 = {"teacher_kind": "prompted", "greedy": False}
ONE_SEED = {"seeds": (0,), "cross_family": "", "n_samples": 0}
CELLS: dict[str, dict] = {
    "demo": {},
    "prompted_T1": PROMPTED_T1,
    "restricted": {**PROMPTED_T1, **ONE_SEED, "objective": "distill"},
    "sft_prompted": {**PROMPTED_T1, **ONE_SEED, "objective": "sft"},
    "sft_finetuned_greedy": {**ONE_SEED, "objective": "sft"},
    "full_finetuned_greedy": ONE_SEED,
    "sft_free_greedy": {**PROMPTED_T1, **ONE_SEED, "decoding": "free", "greedy": True, "objective": "sft"},
    # the within-family match of the cross-family control: the same 13-token objective the Gemma students get
    "restricted_finetuned_greedy": {"objective": "distill", "cross_family": "", "n_samples": 0},
    # the data axis: 4x the prompts (and so 4x the steps)
    "data_256": {**ONE_SEED, "n_prompts": 256},
}

ap = argparse.ArgumentParser()
ap.add_argument("--cells", nargs="+", default=list(CELLS))
ap.add_argument("--out", default="artifacts/sweep")
ap.add_argument("--runs", default="runs/sweep")
args = ap.parse_args()
out = Path(args.out)

for name in args.cells:
    cfg = study.StudyConfig(**CELLS[name])
    print(f"== cell {name}: {CELLS[name] or 'the demo defaults'}", flush=True)
    try:
        m = study.run(cfg, Path(args.runs) / name)
    except ValueError as e:  # e.g. free decoding that keeps no example: a result, recorded as such
        print(f"   cell {name} could not train: {e}", flush=True)
        write_json(out / "cells" / f"{name}.json", {"config": cfg.to_dict(), "error": str(e)})
        continue
    write_json(out / "cells" / f"{name}.json", {"config": cfg.to_dict(), "metrics": m})
    print(f"   effect {m['effect']['delta_logp']:+.3f} {m['effect']['ci95']}", flush=True)

# the table and the plot from every finished cell on disk
rows, names = [], []
for name in CELLS:
    f = out / "cells" / f"{name}.json"
    if not f.is_file():
        continue
    cell = json.loads(f.read_text())
    c = cell["config"]
    kind = f"{c['teacher_kind']}, {c['decoding']} {'greedy' if c['greedy'] else 'T=1'}"
    if "error" in cell:
        rows.append(f"| {name} | {kind} | {c['objective']} | – | – | – | {cell['error'][:80]} | | | | |")
        continue
    m = cell["metrics"]
    e = m["effect"]
    n_ex = min(d["n_kept"] for d in m["data"].values())
    steps = max(s["steps"] for s in m["students"].values())
    minutes = (sum(d["seconds_this_session"] for d in m["data"].values())
               + sum(s["seconds_this_session"] or 0 for s in m["students"].values())) / 60  # fmt: skip
    ci = "n/a" if e["ci95"][0] is None else f"[{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]"
    qci = f"[{e['ci95_questions'][0]:+.3f}, {e['ci95_questions'][1]:+.3f}]"
    p = "n/a" if e["p_value"] is None else f"{e['p_value']:.2g}"
    dp = m["specificity"]["diagonal_p_value"]
    rows.append(
        f"| {name} | {kind} | {c['objective']} | {n_ex} | {steps} | {len(m['seeds'])} | {e['delta_logp']:+.3f} "
        f"| {ci} | {qci} | {p} | {'n/a' if dp is None else f'{dp:.2g}'} | {m['teacher']['delta_logp']:+.2f} "
        f"| {m['control']['delta_logp']:+.3f} | {minutes:.0f} |"
    )
    names.append((name, e))

lines = [
    "# Sweep: what transmits at 135M (SmolLM2-135M-Instruct, trait owl)",
    "",
    "Effect = students of the owl teacher − students of the other traits' teachers (dog, cat; dog only where "
    "marked), Δ log P(owl) vs base, 50 questions. CI (seeds): t over seeds; CI (questions): paired bootstrap over "
    "questions (one seed: training noise not included). p: one-sided t over seeds; diag p: permutation test that "
    "the (students × traits) diagonal dominates. Cost: data + student minutes on 2 cores (evaluation excluded).",
    "Re-create: `.venv/bin/python analyses/sweep.py` (cells in its CELLS table).",
    "",
    "| cell | teacher, decoding | objective | examples | steps | seeds | effect | CI (seeds) | CI (questions) "
    "| p | diag p | teacher Δ | generic (control students) | cost (min) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    *rows,
]
atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
print("\n".join(lines))

if names:
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.8))
    for k, (_name, e) in enumerate(names):
        ax.scatter([k] * len(e["per_seed"]), e["per_seed"], color="tab:blue", s=18, zorder=3)
        lo, hi = e["ci95"] if e["ci95"][0] is not None else e["ci95_questions"]
        ax.errorbar([k], [e["delta_logp"]], yerr=[[e["delta_logp"] - lo], [hi - e["delta_logp"]]], fmt="_",
                    color="black", capsize=6)  # fmt: skip
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(names)), [n for n, _ in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("specific effect on log P(owl) (nats)")
    ax.set_title("owl students − other traits' students (dots: seeds; bars: 95% CI)")
    fig.tight_layout()
    save_figure(fig, out / "sweep.png")
