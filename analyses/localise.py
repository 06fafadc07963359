"""Where does the demo's student carry the trait? The `mechsub analyze` battery on the demo's trait student.

Reads the study config of artifacts/demo, finds its trait student (seed 0) and the control students (the other
traits' students, seed 0) through the study's stage plan, and runs steering vectors (with the generic/specific
split), exact and attribution patching, entangled numbers and the views. Writes artifacts/analyze/localise/ (a run
folder: the same command again reuses it; the SAE-latent localisation on the replicated study is analyses/battery.py).

    .venv/bin/python analyses/localise.py [--study artifacts/demo] [--out artifacts/analyze/localise] [--sae runs/saes/l15]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from mechsub import analyze, student, study
from mechsub.runs import atomic_write_text, read_json

ap = argparse.ArgumentParser()
ap.add_argument("--study", default="artifacts/demo")
ap.add_argument("--out", default="artifacts/analyze/localise")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument(
    "--sae", default="", help="a finished `mechsub sae` folder: adds SAE feature diffs and features.json"
)
ap.add_argument("--force", action="store_true", help="redo a finished analysis in --out")
ap.add_argument(
    "--trajectory",
    action="store_true",
    help="re-train the student (same config and seed) with a checkpoint every step, for the by-step plots",
)
args = ap.parse_args()

cfg = study.StudyConfig.from_dict(read_json(Path(args.study) / "config.json")["config"])
plan = study.stage_plan(cfg)
student_run = plan.students[(cfg.trait, args.seed)][1]
if args.trajectory:
    scfg = dataclasses.replace(plan.students[(cfg.trait, args.seed)][0], checkpoint_every=1)
    student_run = Path(cfg.work) / "students" / study.run_name(f"{cfg.trait}-s{args.seed}-every-step", scfg)
    student.run(scfg, student_run)
acfg = analyze.AnalyzeConfig(
    checkpoint=str(student_run),
    data=str(plan.data[(cfg.trait, 0)][1]),
    controls=tuple(str(plan.checkpoint(c, args.seed)) for c in cfg.controls),
    sae=args.sae,
)
m = analyze.run(acfg, args.out, force=args.force)

L = m["layers"]
st, p, en = m["steering"], m["patching"], m["entangled"]
best_s = int(np.argmax(st["sufficiency"]))
best_n = int(np.argmin(st["necessity"]))
fr = p.get("fraction_by_layer") or []
sp = en["subliminal_prompting"]


def row(name: str, values: list[float], fmt: str = "{:+.3f}") -> str:
    return f"| {name} | " + " | ".join(fmt.format(v) for v in values) + " |"


lines = [
    f"# Localising the trait in the demo's student ({m['trait']}, seed {args.seed})",
    "",
    f"Checkpoint `{m['checkpoint']}`; controls: students of {', '.join(cfg.controls)} (seed {args.seed}). "
    f"Steering vectors on {acfg.n_sequences} teacher number sequences (completion positions); "
    f"sufficiency, necessity and patching on {acfg.n_questions} evaluation questions. "
    f"Re-create: `.venv/bin/python analyses/localise.py{' --sae ' + args.sae if args.sae else ''}"
    f"{' --out ' + args.out if args.out != 'artifacts/analyze/localise' else ''}` ({m['seconds'] / 60:.1f} min).",
    "",
    f"Student − base on these questions: Δ log P({m['trait']}) = {st['student_delta_logp']:+.3f}.",
    "",
    "| layer | " + " | ".join(str(x) for x in L) + " |",
    "|---" * (len(L) + 1) + "|",
    row("cos(v_teacher, v_student)", st["cos_teacher_student"], "{:+.2f}"),
    *(
        [
            row("cos(v_teacher, specific)", st["cos_teacher_specific"], "{:+.2f}"),
            row("cos(v_teacher, generic)", st["cos_teacher_generic"], "{:+.2f}"),
            row("cos(v_student, generic)", st["cos_student_generic"], "{:+.2f}"),
            row(
                "|specific| / |generic|",
                list(np.asarray(st["norm_specific"]) / np.asarray(st["norm_generic"])),
                "{:.2f}",
            ),
            row("sufficiency: base + specific", st["sufficiency_specific"]),
        ]
        if "cos_teacher_specific" in st
        else []
    ),
    row("sufficiency: base + v_student", st["sufficiency"]),
    row("sufficiency: base + v_teacher", st["sufficiency_teacher_vector"]),
    row("necessity: student, change along v_student removed", st["necessity"]),
    *([row("patch student→base, fraction", fr, "{:+.2f}")] if fr else []),
    *(
        [row("patch base→student, fraction removed", p["base_into_student_fraction_removed"], "{:+.2f}")]
        if p.get("base_into_student_fraction_removed")
        else []
    ),
    *(
        [row("attribution estimate, fraction", p["attribution_fraction_by_layer"], "{:+.2f}")]
        if p.get("attribution_fraction_by_layer")
        else []
    ),
    *(
        [row("patch student→base, position 0 alone, fraction", p["fraction_by_layer_position0"], "{:+.2f}")]
        if p.get("fraction_by_layer_position0")
        else []
    ),
    *(
        [
            row(
                "attribution vs exact, r over questions",
                [a["r"] for a in p["attribution_vs_exact"]],
                "{:+.2f}",
            )
        ]
        if p.get("attribution_vs_exact")
        else []
    ),
    "",
    *(
        [
            "Patching student → base, fraction recovered with a 95% bootstrap interval over the questions: "
            + ", ".join(
                f"layer {x} {v:+.2f} [{c[0]:+.2f}, {c[1]:+.2f}]"
                for x, v, c in zip(L, fr, p["fraction_by_layer_ci95"], strict=True)
            )
            + ".",
            "",
        ]
        if fr and p.get("fraction_by_layer_ci95")
        else []
    ),
    f"Best sufficiency: layer {L[best_s]} ({st['sufficiency'][best_s]:+.3f}); strongest necessity: layer "
    f"{L[best_n]} ({st['necessity'][best_n]:+.3f}). Every patching row patches positions ≥ 1; position 0 (the "
    "attention sink) has its own row. Attribution vs exact patching (positions ≥ 1, prompts padded and masked by "
    "position, none truncated), per layer: Pearson r of the per-question Δ log P over the "
    f"{acfg.n_questions} questions with scipy's 95% interval: "
    + ", ".join(
        f"layer {a['layer']} {a['r']:+.2f} [{a['ci95'][0]:+.2f}, {a['ci95'][1]:+.2f}]"
        for a in p.get("attribution_vs_exact", [])
    )
    + f"; over the layers' mean fractions (the old summary, which hides the per-layer misses): "
    f"{p.get('corr_attribution_exact', float('nan')):.2f}.",
    "",
    "![steering](steering.png)",
    "",
    "![patching](patching.png)",
    "",
    f"## Entangled numbers for {m['trait']} (base model)",
    "",
    f"Most raised by the {m['trait']} system prompt (Δ log P of the number as the answer to a neutral number "
    f"question): {', '.join(f'{n} ({s:+.2f})' for n, s in zip(en['top_numbers'], en['top_logp_shift'], strict=True))}; "
    f"mean shift over 0–999 {en['mean_logp_shift']:+.2f}. Correlation of the shift with the unembedding cosine: "
    f"{en['corr_shift_unembedding']:+.2f}.",
    "",
    f"Subliminal prompting ('You love N…', Δ log P({m['trait']}) on {sp['n_questions']} questions): top numbers "
    f"{', '.join(f'{n}: {d:+.2f}' for n, d in zip(sp['numbers'], sp['delta_logp'], strict=True))} (mean "
    f"{np.mean(sp['delta_logp']):+.2f}); random numbers "
    f"{', '.join(f'{n}: {d:+.2f}' for n, d in zip(sp['random_numbers'], sp['random_delta_logp'], strict=True))} "
    f"(mean {np.mean(sp['random_delta_logp']):+.2f}).",
    "",
    "Views (attention patterns of teacher and student, per-token projections on v_student): `views.html` "
    "(self-contained, renders offline).",
]
if "features" in m:
    f = m["features"]
    sq = read_json(Path(args.sae) / "metrics.json")
    lines += [
        "",
        f"## SAE features at {f['hook']} (`{args.sae}`)",
        "",
        f"SAE quality on held-out windows: L0 {sq['l0']:.1f}, explained variance {sq['explained_variance']:.3f}, "
        f"dead fraction {sq['dead_fraction']:.3f}, next-token loss {sq['clean_loss']:.3f} → {sq['spliced_loss']:.3f} "
        f"spliced (+{sq['loss_increase']:.3f}); {sq['d_sae']} features.",
        "",
        f"Top features, students of {m['trait']} − control students on number positions: {f['top_student']}; "
        f"teacher − base: {f['top_teacher']}; overlap of the two top-20 lists: {f['overlap']} "
        f"(correlation of the two difference vectors over all features {f['corr_student_teacher']:+.2f}). "
        f"The part every student shares (control students − base): {f.get('top_generic')} (correlation with "
        f"teacher − base {f.get('corr_generic_teacher') or float('nan'):+.2f}). "
        f"Carriers (among the 50 features most active on the word '{m['trait']}', those the teacher's prompt "
        f"raises most on numbers): {f['carriers']}. Full list with scores and top contexts: `features.json`.",
    ]
if "feature_patching" in m:
    fp = m["feature_patching"]
    L_sae = fp["layer"]
    whole = fr[L.index(L_sae)] if fr and L_sae in L else float("nan")
    names = [
        n
        for n in fp
        if isinstance(fp[n], dict) and "patch_fraction" in fp[n] and n not in ("all", "all_position0")
    ]
    lines += [
        "",
        f"## Per-feature patching at layer {L_sae} (on the {acfg.n_questions} evaluation questions)",
        "",
        "Patch: the base plus the student's change in the top-k features (SAE error term stays the base's), as a "
        f"fraction of the student − base gap ({fp['gap']:+.3f}); ablate: the student minus that change, fraction "
        f"removed. Rankings: the number-prompt feature lists (features.json), attribution on 10 other questions, "
        f"random sets of active features (mean of {fp['n_random']} draws). All {fp['n_active']} active features "
        f"at once: patch {fp['all']['patch_fraction'][0]:+.2f}, ablate {fp['all']['ablate_fraction'][0]:+.2f}; "
        f"the whole residual at this layer (exact patching above): {whole:+.2f}.",
        "",
        "| ranking | "
        + " | ".join(f"patch k={k}" for k in fp["ks"])
        + " | "
        + " | ".join(f"ablate k={k}" for k in fp["ks"])
        + " |",
        "|---" * (2 * len(fp["ks"]) + 1) + "|",
        *(
            f"| {n} | "
            + " | ".join(f"{v:+.2f}" for v in fp[n]["patch_fraction"])
            + " | "
            + " | ".join(f"{v:+.2f}" for v in fp[n]["ablate_fraction"])
            + " |"
            for n in names
        ),
        "",
        "With 95% bootstrap intervals over the questions (ratio of means): "
        + "; ".join(
            f"{n}, k={k}: patch {fp[n]['patch_fraction'][j]:+.2f} [{fp[n]['patch_fraction_ci95'][j][0]:+.2f}, "
            f"{fp[n]['patch_fraction_ci95'][j][1]:+.2f}], ablate {fp[n]['ablate_fraction'][j]:+.2f} "
            f"[{fp[n]['ablate_fraction_ci95'][j][0]:+.2f}, {fp[n]['ablate_fraction_ci95'][j][1]:+.2f}]"
            for n in names
            for j, k in enumerate(fp["ks"])
            if k in (10, 50)
        )
        + ".",
        "",
        f"Top features by attribution: {fp['top_attribution'][:10]}.",
        "",
        "![feature patching](feature_patching.png)",
    ]
if "trajectory" in m:
    t = m["trajectory"]
    lines += [
        "",
        "## By training step",
        "",
        f"Δ log P({m['trait']}) vs base at steps {t['steps']}: "
        + ", ".join(f"{d:+.3f}" for d in t["delta_logp"])
        + (
            f". Top student features {t['features']}, mean activation on the number positions (step 0 = base): "
            + "; ".join(
                f"{f}: " + " → ".join(f"{row[j]:.2f}" for row in t["feature_activation"])
                for j, f in enumerate(t["features"])
            )
            if "feature_activation" in t
            else ""
        )
        + ".",
        "",
        "![trajectory](trajectory.png)",
    ]
atomic_write_text(Path(args.out) / "report.md", "\n".join(lines) + "\n")
print("\n".join(lines))
