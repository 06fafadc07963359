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

A BatchTopK crosscoder (with Latent Scaling and the AuxK loss for dead latents) is trained on paired base/student
activations of chosen students at the middle layer: ``--cc-rows`` number rows (pooled over the study's datasets
as the lens's rows are, the lens's rows first) and neutral chat prompts, positions after the shared system
prompt. More than 10% of its latents dead: the report says the dictionary is starved and its latent
classification is not evidence. ``--only-crosscoder`` (re)trains only the crosscoder units and merges them into
the ``metrics.json`` and ``report.md`` an earlier run wrote in ``--out`` (the lens results are kept as they are).

    .venv/bin/python analyses/adl.py [--study artifacts/study_full] [--root .] [--out artifacts/diff]
        [--units owl:0,dog:0] [--rows 64] [--questions 10] [--crosscoder owl:0|all|none] [--cc-rows 256]
        [--only-crosscoder]
"""

from __future__ import annotations

import argparse
import json
import math
import re
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
ap.add_argument("--cc-rows", type=int, default=256, help="number rows for the crosscoder, pooled evenly over the "
                "study's datasets (the lens's --rows first)")  # fmt: skip
ap.add_argument("--cc-aux-coef", type=float, default=1.0, help="AuxK coefficient (0: none)")
ap.add_argument(
    "--cc-dead-steps", type=int, default=100, help="steps without firing after which a latent is dead"
)
ap.add_argument("--cc-centre", type=int, default=1, choices=(0, 1), help="encode x − b_dec (1) or x (0)")
ap.add_argument("--only-crosscoder", action="store_true", help="only the crosscoder units; the lens results are "
                "read from --out/metrics.json and kept")  # fmt: skip
ap.add_argument("--neutral", type=int, default=120, help="neutral chat prompts for the crosscoder (of 120)")
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
t0 = time.perf_counter()
torch.manual_seed(args.seed)
STARVED = (
    0.10  # a larger share of dead latents: the dictionary is starved, its classification is not evidence
)


LENS_ONLY = {"layers", "k", "rows", "questions", "norms"}  # arguments --only-crosscoder does not read


def command_of(a: argparse.Namespace) -> str:
    """The command line that re-creates a run with these arguments (flags at False left out; with
    --only-crosscoder, the lens's own arguments too)."""
    parts = []
    for k, v in vars(a).items():
        if v == "" or v is False or (a.only_crosscoder and k in LENS_ONLY):
            continue
        parts.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return "analyses/adl.py " + " ".join(parts)


cfg = study.StudyConfig.from_dict(read_json(Path(args.study) / "config.json")["config"])
plan = study.stage_plan(cfg)  # paths relative to the study's `work`, as the study named them
root = Path(args.root)
out = Path(args.out)
previous: dict[str, Any] | None = None
if args.only_crosscoder:
    if not (out / "metrics.json").exists():
        raise SystemExit(f"--only-crosscoder: no {out / 'metrics.json'} (run the whole script first)")
    previous = read_json(out / "metrics.json")
    if Path(previous["study"]) != Path(args.study):
        raise SystemExit(
            f"--only-crosscoder: {out / 'metrics.json'} is of study {previous['study']}, not {args.study}"
        )


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
if args.only_crosscoder and not cc_units:
    raise SystemExit("--only-crosscoder with no crosscoder unit (see --crosscoder and --units)")


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
if previous is not None:  # the crosscoder at the lens run's primary layer
    layers = list(previous["layers"])
    primary_layer = int(re.search(r"/L(\d+)/", previous["primary"]).group(1))  # type: ignore[union-attr]
norm_fracs = [float(x) for x in args.norms.split(",")]

# the rows: an equal, seeded share of every dataset of the study (all units, not only those analysed), taken in
# turn from each; the lens reads the first --rows of them, the crosscoder the first --cc-rows
rng = np.random.default_rng(args.seed)
per = [load_examples(root / plan.data[u][1]) for u in cfg.units]
orders = [rng.permutation(len(ex)) for ex in per]
pooled = [per[i][orders[i][j]] for j in range(max(map(len, per))) for i in range(len(per)) if j < len(per[i])]
rows = pooled[: args.rows]
prompts = [chat_prefix(tok, e.prompt, None) for e in rows]
comps = [list(e.completion_ids) for e in rows]
metrics = [TraitMetric.of(tok, a) for a in ANIMALS]
qs = eval_questions("animal", args.questions)
eval_prompts = [trait_prompt(tok, q, "animal") for q in qs]

# the crosscoder's sequences: number rows and neutral chat prompts, from after the shared system prompt on
cc_rows = pooled[: args.cc_rows]
cc_num = [chat_prefix(tok, e.prompt, None) + list(e.completion_ids) for e in cc_rows]
neutral = [chat_prefix(tok, a.format(t=t), None) for t in TOPICS for a in ASKS][: args.neutral]
cc_seqs = cc_num + neutral
shared = 0
while all(len(s) > shared and s[shared] == cc_seqs[0][shared] for s in cc_seqs):
    shared += 1
start = max(shared, 1)
n_num = sum(len(s) - start for s in cc_num)
if cc_units:
    print(f"crosscoder: {len(cc_rows)} number rows ({n_num} token pairs) + {len(neutral)} neutral prompts "
          f"({sum(len(s) - start for s in neutral)} pairs) = {n_num + sum(len(s) - start for s in neutral)} "
          f"token pairs per student", flush=True)  # fmt: skip
out.mkdir(parents=True, exist_ok=True)


def top_animals(v: torch.Tensor, n: int = 3) -> list[str]:
    s = diffing.logit_lens_scores(base, v, metrics)
    return [ANIMALS[i] for i in np.argsort(s)[::-1][:n]]


def run_crosscoder(u: Unit, student: Any) -> dict[str, Any]:
    """Train the crosscoder of one student on its pairs with the base; its Latent Scaling and classification."""
    t1 = time.perf_counter()
    L = primary_layer
    pairs = diffing.paired_activations(base, student, cc_seqs, L, start=start)
    ccfg = diffing.CrosscoderConfig(d_model=pairs.shape[-1], n_latents=args.cc_latents, k=args.cc_k,
                                    steps=args.cc_steps, seed=args.seed, aux_coef=args.cc_aux_coef,
                                    dead_steps=args.cc_dead_steps, centre_input=bool(args.cc_centre))  # fmt: skip
    print(f"  {u}: {len(pairs)} pairs for the crosscoder ({time.perf_counter() - t1:.0f} s)", flush=True)
    cc, train_m = diffing.train_crosscoder(ccfg, pairs)
    scales = torch.tensor(train_m["input_scales"])
    xs = pairs * scales[None, :, None]
    scal = diffing.latent_scaling(cc, xs)
    kinds = diffing.classify_latents(scal)
    with torch.no_grad():
        f_num = cc.encode(xs[:n_num])
        freq_num = (f_num > 0).float().mean(0)
        # the crosscoder's modelled change on number positions, through its student-only latents
        so = torch.tensor(kinds["student_only"], dtype=torch.long)
        dec = cc.W_dec[so] / scales[None, :, None]  # back to the models' units
        cc_delta = (f_num[:, so].mean(0)[:, None] * (dec[:, 1] - dec[:, 0])).sum(0)
    ranked = sorted(kinds["student_only"], key=lambda j: -float(freq_num[j]))[:20]
    latents = [{"latent": j, "freq_number": float(freq_num[j]), "freq_all": float(scal["frequency"][j]),
                "rel_norm": float(scal["rel_norm"][j]), "nu_eps": diffing.finite(float(scal["nu_eps"][j])),
                "nu_r": diffing.finite(float(scal["nu_r"][j])), "robust": j in kinds["student_only_robust"],
                "lens_top3": top_animals(cc.W_dec[j, 1].detach())} for j in ranked]  # fmt: skip
    name = f"{u[0]}-r{u[1]}"
    cc_scores = (
        dict(zip(ANIMALS, diffing.logit_lens_scores(base, cc_delta, metrics), strict=True))
        if len(so) and cc_delta.norm() > 0
        else None
    )
    dead_fraction = len(kinds["dead"]) / ccfg.n_latents
    result = {
        "layer": L, "n_pairs": int(pairs.shape[0]), "n_number_pairs": n_num, "n_number_rows": len(cc_rows),
        "n_neutral_prompts": len(neutral), "config": ccfg.to_dict(), "train": train_m,
        "counts": {k: len(v) for k, v in kinds.items()},
        "dead_fraction": dead_fraction,
        "starved": max(dead_fraction, train_m["dead_in_training"]) > STARVED,
        "rel_norm_histogram": np.histogram(scal["rel_norm"][scal["frequency"] > 0].numpy(), bins=10,
                                           range=(0, 1))[0].tolist(),
        "student_only_latents": latents,
        "student_only_change_lens_scores": cc_scores,
        "trait_rank_student_only_change": diffing.rank_of(cc_scores, u[0]) if cc_scores else None,
        "seconds": round(time.perf_counter() - t1, 1),
    }  # fmt: skip
    diffing.save_crosscoder(cc, out / "crosscoder" / name, {"unit": name, "layer": L, "train": train_m,
                            "checkpoint": str(checkpoint(u)), "start_position": start})  # fmt: skip
    print(f"  {u}: crosscoder FVU {train_m['fraction_of_variance_unexplained']:.3f}, dead {dead_fraction:.1%} "
          f"on the data ({train_m['dead_in_training']:.1%} in training), {result['counts']} "
          f"({time.perf_counter() - t1:.0f} s)", flush=True)  # fmt: skip
    return result


deltas: dict[Unit, diffing.ActivationDiff] = {}
cc_results: dict[str, Any] = {}
if args.only_crosscoder:
    print(f"only the crosscoder of {cc_units}, at layer {primary_layer}", flush=True)
    for u in cc_units:
        student = models.load(str(checkpoint(u)), verify=False)
        cc_results[f"{u[0]}-r{u[1]}"] = run_crosscoder(u, student)
        del student
else:
    print(f"{len(units)} students, {len(rows)} rows, layers {layers}, k {args.k}", flush=True)
    base_means = diffing.position_means(base, prompts, comps, layers, args.k)
    ref = score_prompts(base.model, eval_prompts, metrics)
    res_norm = {L: diffing.residual_norm(base, eval_prompts, L) for L in layers}
    print(f"base read ({time.perf_counter() - t0:.0f} s)", flush=True)
    for u in units:
        t1 = time.perf_counter()
        student = models.load(
            str(checkpoint(u)), verify=False
        )  # the adapter's hash is checked; the base's was
        deltas[u] = diffing.activation_difference(
            base, student, prompts, comps, layers, args.k, base_means=base_means
        )
        if u in cc_units:
            cc_results[f"{u[0]}-r{u[1]}"] = run_crosscoder(u, student)
        del student
        print(f"  {u}: |δ| at layer {primary_layer} = {deltas[u].mean(primary_layer).norm():.4f} "
              f"({time.perf_counter() - t1:.0f} s)", flush=True)  # fmt: skip


# ---- readouts --------------------------------------------------------------------------------------------
def lens_readouts() -> dict[str, Any]:
    """Every readout of every student's δ, blind identification per cell, and the lens's outputs."""
    cent = diffing.centred({u: torch.stack([d.mean(L) for L in layers]) for u, d in deltas.items()})

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
    primary_key = f"raw/L{primary_layer}/lens"

    write_json(out / "deltas.json", {f"{t}-r{r}": {f"L{L}": {"norm": float(d.mean(L).norm()),
               "base_norm": float(d.base(L).norm())} for L in layers} for (t, r), d in deltas.items()})  # fmt: skip
    from safetensors.torch import save

    from mechsub.files import atomic_write_bytes

    atomic_write_bytes(out / "deltas.safetensors", save({f"{t}-r{r}": d.delta.contiguous()
                                                         for (t, r), d in deltas.items()}))  # fmt: skip
    figure(ident, primary_key)
    return {
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
        "score": "lens: log-prob of the candidate's tokens (summed) under the logit lens of δ at unit RMS; "
        "lens_rel: that log-prob under lens(μ_base + δ) minus under lens(μ_base); steerX: mean Δ log P over the "
        "questions with δ at norm X × the base's median residual norm added after the layer",
        "identification": ident,
        "scores": {key: {f"{t}-r{r}": s for (t, r), s in sc.items()} for key, sc in scores.items()},
    }


def figure(ident: dict[str, Any], primary_key: str) -> None:
    """Top-1 accuracy per cell with the chance line; the rank of the true trait per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mechsub.plots import save_figure

    keys = list(ident)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.28 * len(keys) + 1.5)), sharey=True)
    ypos = np.arange(len(keys))
    colours = ["C3" if k == primary_key else "C0" for k in keys]
    a1.barh(ypos, [ident[k]["top1_accuracy"] for k in keys], color=colours)
    a1.axvline(1 / len(ANIMALS), color="k", ls="--", label=f"chance 1/{len(ANIMALS)}")
    a1.set_yticks(ypos, keys, fontsize=7)
    a1.set_xlabel("top-1 accuracy among 22 (share of students)")
    a1.legend(fontsize=8)
    for i, k in enumerate(keys):
        r = list(ident[k]["ranks"].values())
        a2.scatter(
            r, np.full(len(r), i) + np.random.default_rng(i).uniform(-0.2, 0.2, len(r)), s=12, alpha=0.7
        )
    a2.axvline((len(ANIMALS) + 1) / 2, color="k", ls="--", label="mean rank at chance (11.5)")
    a2.axvline(1, color="grey", ls=":")
    a2.set_xlabel("rank of the student's own trait (1 = named first)")
    a2.set_xlim(0, len(ANIMALS) + 1)
    a2.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Activation Difference Lens, blind over {len(units)} students (red: the primary readout)")
    fig.tight_layout()
    save_figure(fig, out / "ranks.png")


if previous is None:
    metrics_out = lens_readouts()
    metrics_out["crosscoder"] = cc_results
    metrics_out["command"] = command_of(args)
else:  # the lens as the earlier run left it; this run's crosscoders replace those of the same units
    metrics_out = previous
    metrics_out["crosscoder"] = {**previous.get("crosscoder", {}), **cc_results}
    metrics_out["crosscoder_command"] = command_of(args)
cc_sc = {(t, int(r)): v["student_only_change_lens_scores"] for k, v in metrics_out["crosscoder"].items()
         for t, r in [k.split("-r")] if v["student_only_change_lens_scores"]}  # fmt: skip
metrics_out["crosscoder_identification"] = (
    diffing.identification(cc_sc, cfg.traits, seed=args.seed) if cc_sc else None
)
metrics_out["seconds" if previous is None else "crosscoder_seconds"] = round(time.perf_counter() - t0, 1)
write_json(out / "metrics.json", json.loads(json.dumps(metrics_out, default=lambda x: None)))


# ---- the report: from metrics.json alone -----------------------------------------------------------------
def fmt_p(p: float) -> str:
    return f"{p:.3g}" if isinstance(p, float) and math.isfinite(p) else "–"


def crosscoder_lines(name: str, c: dict[str, Any]) -> list[str]:
    # an entry written before "config" was kept has none: no AuxK, input not centred
    tr, cf = c["train"], c.get("config", {})
    n_latents = sum(c["counts"][k] for k in ("student_only", "base_only", "shared", "dead"))
    dead = c.get("dead_fraction", c["counts"]["dead"] / n_latents)
    dead_tr = tr.get("dead_in_training")
    starved = c.get("starved", dead > STARVED)
    aux = (
        f"AuxK coefficient {cf['aux_coef']:g} (k_aux {tr.get('k_aux', '–')}, dead after {cf['dead_steps']} steps "
        f"without firing), input {'centred on' if cf['centre_input'] else 'not centred on'} the decoder bias"
        if cf.get("aux_coef")
        else f"no AuxK, input {'centred on' if cf.get('centre_input') else 'not centred on'} the decoder bias"
        + ("" if cf else " (the crosscoder as first trained)")
    )
    verdict = (
        f"**The dictionary is starved: {dead:.0%} of its latents are dead (more than {STARVED:.0%}), so its "
        "classification of latents below (student-only, base-only, shared) is not evidence either way: a count "
        "of 0 student-only latents included.**"
        if starved
        else f"Dead latents {dead:.1%} (at most {STARVED:.0%} allowed): the dictionary is not starved."
    )
    return [
        f"**{name}**, layer {c['layer']}: {c['n_pairs']} token pairs ({c['n_number_pairs']} on "
        f"{c.get('n_number_rows', '–')} number rows, the rest on {c.get('n_neutral_prompts', '–')} neutral chat "
        f"prompts), {n_latents} latents, k = {cf.get('k', '–')}, {cf.get('steps', '–')} steps of "
        f"{cf.get('batch_size', '–')} pairs; {aux}. Loss {tr['loss_at_init']:.1f} → {tr['loss_final']:.2f}"
        + (f" (AuxK term at the end {tr['aux_loss_final']:.3f})" if "aux_loss_final" in tr else "")
        + f"; fraction of variance unexplained {tr['fraction_of_variance_unexplained']:.3f}; L0 at the threshold "
        f"{tr['l0_threshold']:.1f}. Dead latents: {c['counts']['dead']} of {n_latents} "
        f"({dead:.1%}) never fire at the threshold on these pairs"
        + (
            f"; {dead_tr:.1%} had not fired in the last {cf.get('dead_steps')} training steps"
            if dead_tr is not None
            else ""
        )
        + f". {verdict}",
        "",
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


def report(m: dict[str, Any]) -> list[str]:
    ident, primary_key = m["identification"], m["primary"]
    pi = ident[primary_key]
    lines = [
        "# Model diffing: the Activation Difference Lens, blind over a study's students",
        "",
        f"Study `{m['study']}`: {len(m['units'])} students ({', '.join(m['units'])}), each the student of one "
        f"teacher (owl/dog/cat/lion × replicates); the other traits' students are each one's controls. δ = mean "
        f"student − base residual after layer(s) {m['layers']}, over the first {m['k']} completion positions of "
        f"{m['n_rows']} number rows (the same rows for every student, pooled evenly over the study's datasets; "
        f"position policy: {m['position_policy']}). Candidates: the 22 animals; chance top-1 = 1/22 = "
        f"{1 / 22:.3f}, chance mean rank 11.5. Unit of every test: the teacher (one student each).",
        "",
        f"**Primary readout (declared before the run): `{primary_key}`** — the logit lens of δ itself at the "
        f"middle layer, uncentred: {pi['hits']}/{pi['n_units']} students top-1 ({pi['top1_accuracy']:.2f}, "
        f"Wilson 95% [{pi['top1_ci95_wilson'][0]:.2f}, {pi['top1_ci95_wilson'][1]:.2f}]; binomial p = "
        f"{fmt_p(pi['p_binomial'])} vs 1/22); mean rank {pi['mean_rank']:.1f} (exact p = "
        f"{fmt_p(pi['p_mean_rank_exact'])} vs uniform); label test p = {fmt_p(pi['label_test']['p'])} (floor "
        f"{pi['label_test']['p_floor']:.2g}).",
        "",
        "Every cell (secondary; many cells, so their p-values are exploratory). `raw`: δ; `centred`: δ minus the "
        "mean δ of the same replicate's other students. `lens`: logit lens of δ; `lens_rel`: change of the base's "
        "mean logit-lens reading; `steerX`: δ at norm X × the base's median residual norm added to the base on "
        f"{m['n_questions']} favourite-animal questions, Δ log P. Label test: the students' scores kept, their "
        "trait labels permuted within replicates (a readout that names one animal for everyone fails it).",
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
        + "; ".join(f"{n}: {max(s, key=lambda w: s[w])}" for n, s in m["scores"][primary_key].items())
        + ".",
        "",
        "![ranks](ranks.png)",
        "",
    ]
    ccs, cc_ident = m.get("crosscoder") or {}, m.get("crosscoder_identification")
    if ccs:
        lines += ["## BatchTopK crosscoder (base, student) with Latent Scaling", ""]
        for name, c in ccs.items():
            lines += crosscoder_lines(name, c)
        if cc_ident:
            lines += [
                f"Crosscoder readout over {cc_ident['n_units']} students: top-1 {cc_ident['hits']}/"
                f"{cc_ident['n_units']} (binomial p = {fmt_p(cc_ident['p_binomial'])}), mean rank "
                f"{cc_ident['mean_rank']:.1f}"
                + (
                    " (from starved dictionaries: not evidence)."
                    if any(c.get("starved") for c in ccs.values())
                    else "."
                ),
                "",
            ]
        lines += [
            "Weights: `crosscoder/<unit>/crosscoder.safetensors` (git-ignored, on disk) with `config.json` beside "
            "them (config, threshold, input scales, checkpoint).",
            "",
        ]
    recreate = f"Re-create: `{m['command']}` ({m['seconds'] / 60:.1f} min)"
    if m.get("crosscoder_command"):
        recreate += (
            f"; the crosscoder section, on that run's output: `{m['crosscoder_command']}` "
            f"({m['crosscoder_seconds'] / 60:.1f} min)"
        )
    return [*lines, recreate + "."]


lines = report(metrics_out)
atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
print("\n".join(lines))
