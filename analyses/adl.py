"""Does the Activation Difference Lens name a student's trait, blind? And what does a crosscoder built for the
change find?

For every student of a finished study (each teacher has a trait; the other traits' students are the controls),
δ = mean (student − base) residual at ``blocks.{L}.hook_resid_post`` over the first k completion positions of
number data (`mechsub.diffing.POSITION_POLICY`). The rows are the same for every student: an equal, seeded
share of each of the study's datasets, so no student reads its own teacher's data more than another's. δ is
read three ways, each ranking the 22 candidate animals: the logit lens of δ itself, the relative lens (base's
mean residual + δ against the base's mean), and steering (δ rescaled to a fraction of the base's median residual
norm, added to the base on the favourite-animal evaluation prompts: Δ log P of each candidate). Each readout also
runs on the centred δ (minus the mean δ of the replicate's other students). Blind identification: the share of
students whose trait is top-1 among 22, the rank of the true trait, tests against chance and a label test.
Declared before any run: the primary readout is the raw logit lens at the middle layer, uncentred; every other
cell is secondary (many cells: read their p-values as exploratory).

A BatchTopK crosscoder (with Latent Scaling) is trained on paired base/student activations of chosen students
at the middle layer (number rows and neutral chat prompts, positions after the shared system prompt).

    .venv/bin/python analyses/adl.py [--study artifacts/study_full] [--root .] [--out artifacts/diff]
        [--units owl:0,dog:0] [--rows 64] [--questions 10] [--crosscoder owl:0|all|none]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechsub import diffing, models, study
from mechsub.data import load_examples
from mechsub.files import atomic_write_text, read_json, write_json
from mechsub.metric import TraitMetric, score_prompts
from mechsub.prompts import chat_prefix, trait_prompt
from mechsub.runs import is_finished
from mechsub.sae import ASKS, TOPICS
from mechsub.training import steps_of
from mechsub.traits import ANIMALS, eval_questions

Unit = tuple[str, int]

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--study", default="artifacts/study_full", help="a study folder (its config.json)")
ap.add_argument("--root", default=".", help="the folder the study's `work` path is relative to")
ap.add_argument("--out", default="artifacts/diff")
ap.add_argument("--units", default="", help="only these units, e.g. owl:0,dog:0 (default: every unit)")
ap.add_argument("--layers", default="", help="layers, e.g. 7,15,22 (default: the middle layer)")
ap.add_argument("--k", type=int, default=5, help="first completion positions read per row")
ap.add_argument("--rows", type=int, default=64, help="number rows, pooled evenly over the study's datasets")
ap.add_argument("--questions", type=int, default=10, help="evaluation questions the steering readout uses")
ap.add_argument("--norms", default="0.25,0.5,1.0", help="steering norms, × the base's median residual norm")
ap.add_argument("--crosscoder", default="first", help="units with a crosscoder: first (the study's trait, "
                "replicate 0), all, none, or a list like owl:0,dog:0")  # fmt: skip
ap.add_argument("--cc-latents", type=int, default=2048)
ap.add_argument("--cc-k", type=int, default=32)
ap.add_argument("--cc-steps", type=int, default=1000)
ap.add_argument("--neutral", type=int, default=120, help="neutral chat prompts for the crosscoder (of 120)")
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
t0 = time.perf_counter()
torch.manual_seed(args.seed)

cfg = study.StudyConfig.from_dict(read_json(Path(args.study) / "config.json")["config"])
plan = study.stage_plan(cfg)  # paths relative to the study's `work`, as the study named them
root = Path(args.root)


def parse_units(text: str) -> list[Unit]:
    out = []
    for part in filter(None, text.split(",")):
        t, r = part.split(":")
        out.append((t.strip(), int(r)))
    return out


units = parse_units(args.units) if args.units else list(cfg.units)
for u in units:
    if u not in plan.students:
        raise SystemExit(f"{u} is not a unit of {args.study} (units: {cfg.units})")
named = {"first": [(cfg.trait, 0)], "all": units, "none": []}
cc_units = named[args.crosscoder] if args.crosscoder in named else parse_units(args.crosscoder)
cc_units = [u for u in cc_units if u in units]


def checkpoint(u: Unit) -> Path:
    folder = root / plan.students[u][1]
    if not is_finished(folder):
        raise SystemExit(f"the student of {u} ({folder}) is not a finished run")
    return steps_of(folder)[-1]


base = models.load(cfg.model)
tok = base.tokenizer
n_layers = base.n_layers
layers = [int(x) for x in args.layers.split(",")] if args.layers else [n_layers // 2]
primary_layer = layers[0] if args.layers else n_layers // 2
norm_fracs = [float(x) for x in args.norms.split(",")]

# the rows: an equal, seeded share of every dataset of the study (all units, not only those analysed)
rng = np.random.default_rng(args.seed)
per = [load_examples(root / plan.data[u][1]) for u in cfg.units]
orders = [rng.permutation(len(ex)) for ex in per]
rows = [per[i][orders[i][j]] for j in range(max(map(len, per))) for i in range(len(per)) if j < len(per[i])]
rows = rows[: args.rows]
prompts = [chat_prefix(tok, e.prompt, None) for e in rows]
comps = [list(e.completion_ids) for e in rows]
metrics = [TraitMetric.of(tok, a) for a in ANIMALS]
qs = eval_questions("animal", args.questions)
eval_prompts = [trait_prompt(tok, q, "animal") for q in qs]

print(f"{len(units)} students, {len(rows)} rows, layers {layers}, k {args.k}", flush=True)
base_means = diffing.position_means(base, prompts, comps, layers, args.k)
ref = score_prompts(base.model, eval_prompts, metrics)
res_norm = {L: diffing.residual_norm(base, eval_prompts, L) for L in layers}
print(f"base read ({time.perf_counter() - t0:.0f} s)", flush=True)

# neutral chat prompts and the number rows for the crosscoder, from after the shared system prompt on
neutral = [chat_prefix(tok, a.format(t=t), None) for t in TOPICS for a in ASKS][: args.neutral]
cc_seqs = [p + c for p, c in zip(prompts, comps, strict=True)] + neutral
shared = 0
while all(len(s) > shared and s[shared] == cc_seqs[0][shared] for s in cc_seqs):
    shared += 1
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

deltas: dict[Unit, diffing.ActivationDiff] = {}
cc_results: dict[str, Any] = {}
for u in units:
    t1 = time.perf_counter()
    student = models.load(str(checkpoint(u)), verify=False)  # the adapter's hash is checked; the base's was
    deltas[u] = diffing.activation_difference(
        base, student, prompts, comps, layers, args.k, base_means=base_means
    )
    if u in cc_units:
        L = primary_layer
        pairs = diffing.paired_activations(base, student, cc_seqs, L, start=max(shared, 1))
        ccfg = diffing.CrosscoderConfig(d_model=pairs.shape[-1], n_latents=args.cc_latents, k=args.cc_k,
                                        steps=args.cc_steps, seed=args.seed)  # fmt: skip
        print(f"  {u}: {len(pairs)} pairs for the crosscoder ({time.perf_counter() - t1:.0f} s)", flush=True)
        cc, train_m = diffing.train_crosscoder(ccfg, pairs)
        scales = torch.tensor(train_m["input_scales"])
        xs = pairs * scales[None, :, None]
        scal = diffing.latent_scaling(cc, xs)
        kinds = diffing.classify_latents(scal)
        n_num = sum(len(p) + len(c) - max(shared, 1) for p, c in zip(prompts, comps, strict=True))
        with torch.no_grad():
            f_num = cc.encode(xs[:n_num])
            freq_num = (f_num > 0).float().mean(0)
            # the crosscoder's modelled change on number positions, through its student-only latents
            so = torch.tensor(kinds["student_only"], dtype=torch.long)
            dec = cc.W_dec[so] / scales[None, :, None]  # back to the models' units
            cc_delta = (f_num[:, so].mean(0)[:, None] * (dec[:, 1] - dec[:, 0])).sum(0)

        def top_animals(v: torch.Tensor, n: int = 3) -> list[str]:
            s = diffing.logit_lens_scores(base, v, metrics)
            return [ANIMALS[i] for i in np.argsort(s)[::-1][:n]]

        ranked = sorted(kinds["student_only"], key=lambda j: -float(freq_num[j]))[:20]
        latents = [{"latent": j, "freq_number": float(freq_num[j]), "freq_all": float(scal["frequency"][j]),
                    "rel_norm": float(scal["rel_norm"][j]), "nu_eps": diffing.finite(float(scal["nu_eps"][j])),
                    "nu_r": diffing.finite(float(scal["nu_r"][j])),
                    "robust": j in kinds["student_only_robust"],
                    "lens_top3": top_animals(cc.W_dec[j, 1].detach())} for j in ranked]  # fmt: skip
        name = f"{u[0]}-r{u[1]}"
        cc_scores = (
            dict(zip(ANIMALS, diffing.logit_lens_scores(base, cc_delta, metrics), strict=True))
            if len(so) and cc_delta.norm() > 0
            else None
        )
        cc_results[name] = {
            "layer": L, "n_pairs": int(pairs.shape[0]), "n_number_pairs": n_num, "train": train_m,
            "counts": {k: len(v) for k, v in kinds.items()},
            "rel_norm_histogram": np.histogram(scal["rel_norm"][scal["frequency"] > 0].numpy(), bins=10,
                                               range=(0, 1))[0].tolist(),
            "student_only_latents": latents,
            "student_only_change_lens_scores": cc_scores,
            "trait_rank_student_only_change": diffing.rank_of(cc_scores, u[0]) if cc_scores else None,
        }  # fmt: skip
        diffing.save_crosscoder(cc, out / "crosscoder" / name, {"unit": name, "layer": L, "train": train_m,
                                "checkpoint": str(checkpoint(u)), "start_position": max(shared, 1)})  # fmt: skip
    del student
    print(f"  {u}: |δ| at layer {primary_layer} = {deltas[u].mean(primary_layer).norm():.4f} "
          f"({time.perf_counter() - t1:.0f} s)", flush=True)  # fmt: skip

# ---- readouts --------------------------------------------------------------------------------------------
variants = {"raw": {u: d for u, d in deltas.items()}}
cent_in = {u: torch.stack([d.mean(L) for L in layers]) for u, d in deltas.items()}
cent = diffing.centred(cent_in)


def vec(variant: str, u: Unit, L: int) -> torch.Tensor | None:
    if variant == "raw":
        return deltas[u].mean(L)
    return cent[u][layers.index(L)] if u in cent else None


scores: dict[str, dict[Unit, dict[str, float]]] = {}
for variant in ("raw", "centred"):
    for L in layers:
        for u in units:
            v = vec(variant, u, L)
            if v is None:
                continue
            mu = deltas[u].base(L)
            cells = {
                "lens": diffing.logit_lens_scores(base, v, metrics),
                "lens_rel": diffing.logit_lens_scores(base, v, metrics, base_mean=mu),
            }
            steer = diffing.steering_scores(base, v, L, eval_prompts, metrics,
                                            [f * res_norm[L] for f in norm_fracs], reference=ref)  # fmt: skip
            for i, f in enumerate(norm_fracs):
                cells[f"steer{f:g}"] = steer[i].tolist()
            for key, s in cells.items():
                scores.setdefault(f"{variant}/L{L}/{key}", {})[u] = dict(zip(ANIMALS, s, strict=True))

print(f"readouts done ({time.perf_counter() - t0:.0f} s)", flush=True)
ident = {key: diffing.identification(sc, cfg.traits, seed=args.seed) for key, sc in scores.items() if sc}
cc_ident = None
cc_sc = {(t, int(r)): v["student_only_change_lens_scores"] for k, v in cc_results.items()
         for t, r in [k.split("-r")] if v["student_only_change_lens_scores"]}  # fmt: skip
if cc_sc:
    cc_ident = diffing.identification(cc_sc, cfg.traits, seed=args.seed)
primary_key = f"raw/L{primary_layer}/lens"

# ---- outputs ---------------------------------------------------------------------------------------------
write_json(out / "deltas.json", {f"{t}-r{r}": {f"L{L}": {"norm": float(d.mean(L).norm()),
           "base_norm": float(d.base(L).norm())} for L in layers} for (t, r), d in deltas.items()})  # fmt: skip
from safetensors.torch import save  # noqa: E402

from mechsub.files import atomic_write_bytes  # noqa: E402

atomic_write_bytes(out / "deltas.safetensors", save({f"{t}-r{r}": d.delta.contiguous()
                                                     for (t, r), d in deltas.items()}))  # fmt: skip
metrics_out = {
    "study": args.study,
    "units": [f"{t}-r{r}" for t, r in units],
    "layers": layers,
    "primary": primary_key,
    "position_policy": diffing.POSITION_POLICY,
    "k": args.k,
    "n_rows": len(rows),
    "rows": "an equal seeded share of each of the study's datasets, the same rows for every student",
    "n_questions": len(qs),
    "steering_norms": {f"{f:g}": {f"L{L}": f * res_norm[L] for L in layers} for f in norm_fracs},
    "base_median_residual_norm": {f"L{L}": res_norm[L] for L in layers},
    "candidates": list(ANIMALS),
    "score": "lens: log-prob of the candidate's tokens (summed) under the logit lens of δ at unit RMS; lens_rel: "
    "that log-prob under lens(μ_base + δ) minus under lens(μ_base); steerX: mean Δ log P over the questions "
    "with δ at norm X × the base's median residual norm added after the layer",
    "identification": ident,
    "scores": {key: {f"{t}-r{r}": s for (t, r), s in sc.items()} for key, sc in scores.items()},
    "crosscoder": cc_results,
    "crosscoder_identification": cc_ident,
    "seconds": round(time.perf_counter() - t0, 1),
    "command": "analyses/adl.py "
    + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != ""),
}
write_json(out / "metrics.json", json.loads(json.dumps(metrics_out, default=lambda x: None)))

# the figure: top-1 accuracy per cell with the chance line; the rank of the true trait per student
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mechsub.plots import save_figure  # noqa: E402

keys = list(ident)
fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.28 * len(keys) + 1.5)), sharey=True)
ypos = np.arange(len(keys))
a1.barh(
    ypos, [ident[k]["top1_accuracy"] for k in keys], color=["C3" if k == primary_key else "C0" for k in keys]
)
a1.axvline(1 / len(ANIMALS), color="k", ls="--", label=f"chance 1/{len(ANIMALS)}")
a1.set_yticks(ypos, keys, fontsize=7)
a1.set_xlabel("top-1 accuracy among 22 (share of students)")
a1.legend(fontsize=8)
for i, k in enumerate(keys):
    r = list(ident[k]["ranks"].values())
    a2.scatter(r, np.full(len(r), i) + np.random.default_rng(i).uniform(-0.2, 0.2, len(r)), s=12, alpha=0.7)
a2.axvline((len(ANIMALS) + 1) / 2, color="k", ls="--", label="mean rank at chance (11.5)")
a2.axvline(1, color="grey", ls=":")
a2.set_xlabel("rank of the student's own trait (1 = named first)")
a2.set_xlim(0, len(ANIMALS) + 1)
a2.legend(fontsize=8, loc="lower right")
fig.suptitle(f"Activation Difference Lens, blind over {len(units)} students (red: the primary readout)")
fig.tight_layout()
save_figure(fig, out / "ranks.png")


def fmt_p(p: float) -> str:
    return f"{p:.3g}" if isinstance(p, float) and math.isfinite(p) else "–"


lines = [
    "# Model diffing: the Activation Difference Lens, blind over a study's students",
    "",
    f"Study `{args.study}`: {len(units)} students ({', '.join(metrics_out['units'])}), each the student of one "
    f"teacher (owl/dog/cat/lion × replicates); the other traits' students are each one's controls. δ = mean "
    f"student − base residual after layer(s) {layers}, over the first {args.k} completion positions of "
    f"{len(rows)} number rows (the same rows for every student, pooled evenly over the study's datasets; "
    f"position policy: {diffing.POSITION_POLICY}). Candidates: the 22 animals; chance top-1 = 1/22 = "
    f"{1 / 22:.3f}, chance mean rank 11.5. Unit of every test: the teacher (one student each).",
    "",
    f"**Primary readout (declared before the run): `{primary_key}`** — the logit lens of δ itself at the middle "
    f"layer, uncentred: {ident[primary_key]['hits']}/{ident[primary_key]['n_units']} students top-1 "
    f"({ident[primary_key]['top1_accuracy']:.2f}, Wilson 95% [{ident[primary_key]['top1_ci95_wilson'][0]:.2f}, "
    f"{ident[primary_key]['top1_ci95_wilson'][1]:.2f}]; binomial p = {fmt_p(ident[primary_key]['p_binomial'])} "
    f"vs 1/22); mean rank {ident[primary_key]['mean_rank']:.1f} (exact p = "
    f"{fmt_p(ident[primary_key]['p_mean_rank_exact'])} vs uniform); label test p = "
    f"{fmt_p(ident[primary_key]['label_test']['p'])} (floor {ident[primary_key]['label_test']['p_floor']:.2g}).",
    "",
    "Every cell (secondary; many cells, so their p-values are exploratory). `raw`: δ; `centred`: δ minus the "
    "mean δ of the same replicate's other students. `lens`: logit lens of δ; `lens_rel`: change of the base's "
    "mean logit-lens reading; `steerX`: δ at norm X × the base's median residual norm added to the base on "
    f"{len(qs)} favourite-animal questions, Δ log P. Label test: the students' scores kept, their trait labels "
    "permuted within replicates (a readout that names one animal for everyone fails it).",
    "",
    "| cell | top-1 | binomial p | mean rank | exact p (rank) | label-test p | ranks |",
    "|---|---|---|---|---|---|---|",
    *(
        f"| {k} | {v['hits']}/{v['n_units']} | {fmt_p(v['p_binomial'])} | {v['mean_rank']:.1f} | "
        f"{fmt_p(v['p_mean_rank_exact'])} | {fmt_p(v['label_test']['p'])} | "
        + ", ".join(f"{n} {r}" for n, r in v["ranks"].items())
        + " |"
        for k, v in ident.items()
    ),
    "",
    "What each student's δ names first (primary readout): "
    + "; ".join(f"{t}-r{r}: {max(s, key=lambda w: s[w])}" for (t, r), s in scores[primary_key].items())
    + ".",
    "",
    "![ranks](ranks.png)",
    "",
]
if cc_results:
    lines += ["## BatchTopK crosscoder (base, student) with Latent Scaling", ""]
    for name, c in cc_results.items():
        tr = c["train"]
        lines += [
            f"**{name}**, layer {c['layer']}: {c['n_pairs']} token pairs ({c['n_number_pairs']} on number rows, "
            f"the rest neutral chat prompts), {args.cc_latents} latents, k = {args.cc_k}, {args.cc_steps} steps. "
            f"Loss {tr['loss_at_init']:.1f} → {tr['loss_final']:.2f}; fraction of variance unexplained "
            f"{tr['fraction_of_variance_unexplained']:.3f}; L0 at the threshold {tr['l0_threshold']:.1f}. "
            f"Latents: {c['counts']}. Relative decoder norm ‖d_student‖ / (‖d_student‖ + ‖d_base‖) of the live "
            f"latents, 10 bins over [0, 1]: {c['rel_norm_histogram']}. Student-only latents (rel. norm ≥ 0.9) "
            f"robust by Latent Scaling (ν_ε and ν_r < 0.5): {c['counts']['student_only_robust']}. "
            + (
                f"The change through its student-only latents on number positions ranks {name.split('-')[0]} "
                f"{c['trait_rank_student_only_change']} of 22."
                if c["trait_rank_student_only_change"]
                else "No student-only latent fires on the number rows."
            ),
            "",
            "| latent | freq (numbers) | rel. norm | ν_ε | ν_r | robust | logit lens top 3 |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {x['latent']} | {x['freq_number']:.4f} | {x['rel_norm']:.2f} | "
                f"{x['nu_eps'] if x['nu_eps'] is None else round(x['nu_eps'], 2)} | "
                f"{x['nu_r'] if x['nu_r'] is None else round(x['nu_r'], 2)} | {x['robust']} | "
                f"{', '.join(x['lens_top3'])} |"
                for x in c["student_only_latents"][:10]
            ),
            "",
        ]
    if cc_ident:
        lines += [
            f"Crosscoder readout over {cc_ident['n_units']} students: top-1 {cc_ident['hits']}/"
            f"{cc_ident['n_units']} (binomial p = {fmt_p(cc_ident['p_binomial'])}), mean rank "
            f"{cc_ident['mean_rank']:.1f}.",
            "",
        ]
    lines += [
        "Weights: `crosscoder/<unit>/crosscoder.safetensors` (git-ignored, on disk) with `config.json` beside "
        "them (config, threshold, input scales, checkpoint).",
        "",
    ]
lines += [f"Re-create: `{metrics_out['command']}` ({metrics_out['seconds'] / 60:.1f} min)."]
atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
print("\n".join(lines))
