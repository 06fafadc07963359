"""Concept-ablation fine-tuning (CAFT) on the replicated study (issue 15, item 2): project chosen directions out of
the student's residual while it trains (positions ≥ 1 only), then evaluate it as usual (no ablation at test time).
How much of the specific effect is blocked, and what does it cost on text the student never trained on?

For every replicate of the study (a trait teacher with its own data; its student and control students are the
study's), owl students are trained as the study's with, at the residual after block --layer:
  - latents (the oracle): the span of the decoder directions of the top --k latents of that replicate's
    localisation battery unit (`analyses/battery.py`: ranked by attribution on questions disjoint from the
    evaluation's, but on this very student against its control: a defender would not have it);
  - heldout (the defence): the top --k of the latents recurring in the battery units of the replicates that are
    not evaluated here (replicates ≥ the study's count), the same list for every replicate;
  - random: --random-draws draws of --k random orthonormal directions (the equal-rank control);
  - vteacher: the teacher's steering vector at that layer (the fine-tuned teacher's mean residual minus the
    base's over the completion positions of 32 of the replicate's number sequences), rank 1;
  - random1: --random-draws draws of one random direction (its equal-rank control).
Effect = the variant's Δ log P(trait) minus the replicate's control students' in the held-out plain frame (and the
training prefill frame); blocked = 1 − effect / the study student's effect; t-intervals over replicates (the unit).
Cost: KL(base ‖ student) per token on the corpus's held-out windows (positions ≥ 1), for every student and for the
study's own students (what plain training costs). Writes OUT/metrics.json, OUT/report.md, OUT/caft.png.

    .venv/bin/python analyses/caft.py [--config analyses/configs/filters.toml] [--layer 27] [--k 20]
        [--random-draws 2] [--arms latents,random,vteacher,random1] [--out artifacts/caft]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mechsub import filterbench as fb
from mechsub import models, stats, student, study
from mechsub.filter import (
    Ablation,
    ablation_basis,
    write_ablation,
    write_random_ablation,
    write_vector_ablation,
)
from mechsub.plots import save_figure
from mechsub.runs import atomic_write_text, read_json, reuse_stale, write_json

ARMS = ("latents", "heldout", "random", "vteacher", "random1")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--config", default="analyses/configs/filters.toml", help="the study (TOML/JSON StudyConfig)"
    )
    ap.add_argument(
        "--battery", default="artifacts/analyze/battery", help="a localisation battery's out folder"
    )
    ap.add_argument("--sae-root", default="runs/saes", help="the SAE folders lL (the battery's --sae-root)")
    ap.add_argument("--layer", type=int, default=27)
    ap.add_argument(
        "--k", type=int, default=20, help="latents: the first k of each unit's attribution ranking"
    )
    ap.add_argument("--random-draws", type=int, default=2, help="draws per replicate of each random control")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}")
    ap.add_argument(
        "--corpus", default="runs/corpus", help="a `mechsub corpus` folder: its last windows for KL"
    )
    ap.add_argument("--kl-windows", type=int, default=32, help="held-out corpus windows for the KL cost")
    ap.add_argument("--out", default="artifacts/caft")
    return ap.parse_args()


def teacher_vector(cfg: study.StudyConfig, base: Any, rep: int, layer: int, n: int = 32) -> list[float]:
    """The replicate's teacher steering vector at ``layer``: the teacher's mean residual (with its system prompt,
    if any) minus the base's (``base``: the loaded base model), over the completion positions of its first ``n``
    number sequences."""
    from mechsub.capture import Batch
    from mechsub.data import DataConfig, load_examples
    from mechsub.prompts import chat_prefix
    from mechsub.steering import layer_means

    folder = study.stage_plan(cfg).data[(cfg.trait, rep)][1]
    dcfg = DataConfig.from_dict(read_json(folder / "config.json")["config"])
    teacher = models.load(dcfg.model)
    tok = base.tokenizer
    ex = load_examples(folder)[:n]
    comps = [e.completion_ids for e in ex]
    t_batch = Batch.completions([chat_prefix(tok, e.prompt, dcfg.teacher_system()) for e in ex], comps)
    s_batch = Batch.completions([chat_prefix(tok, e.prompt, None) for e in ex], comps)
    v = layer_means(teacher, t_batch, [layer]) - layer_means(base, s_batch, [layer])
    return [float(x) for x in v[0]]


def _unit(args: argparse.Namespace, cfg: study.StudyConfig, rep: int) -> dict[str, Any]:
    """A replicate's battery unit at --layer, checked against this study's student and --sae-root's SAE."""
    path = Path(args.battery) / "units" / f"r{rep}-{cfg.trait}-l{args.layer}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no battery unit for replicate {rep} at layer {args.layer}; run "
                                f"analyses/battery.py --layers {args.layer} --replicates {rep} first")  # fmt: skip
    unit = read_json(path)
    key, sae = unit["key"], Path(args.sae_root) / f"l{args.layer}"
    if rep < cfg.replicates:
        student_folder = study.stage_plan(cfg).students[(cfg.trait, rep)][1]
        if Path(key["donor"]).parent.parent != student_folder:
            raise ValueError(f"{path} ranked the latents on {key['donor']}, not on this study's student "
                             f"{student_folder}: re-run the battery on this study")  # fmt: skip
    if Path(key["sae"]["folder"]) != sae:
        raise ValueError(f"{path} used the SAE {key['sae']['folder']}, not {sae} (--sae-root)")
    return unit


def held_out_units(args: argparse.Namespace, cfg: study.StudyConfig) -> list[dict[str, Any]]:
    """The battery units at --layer of the replicates this study does not evaluate (≥ its replicate count),
    checked: their latents are not fitted to the evaluated students."""
    units = (Path(args.battery) / "units").glob(f"r*-{cfg.trait}-l{args.layer}.json")
    reps = sorted(r for p in units if (r := int(p.name.split("-")[0][1:])) >= cfg.replicates)
    return [_unit(args, cfg, r) for r in reps]


def ablation_files(
    args: argparse.Namespace,
    cfg: study.StudyConfig,
    arms: list[str],
    work: Path,
    base: Any,
    held: list[dict[str, Any]],
) -> dict[str, list[str]]:
    """Per arm label, one ablation file per replicate. A file that exists must hold what this run would write
    (students are found by their config, which names the file's path: a changed file under the same name would
    be reused silently); the teacher vector is recomputed only when its provenance changes."""
    sae = Path(args.sae_root) / f"l{args.layer}"
    files: dict[str, list[str]] = {}

    def put(label: str, rep: int, write: Any) -> None:
        path = work / f"{label}-r{rep}.json"
        fresh = path.with_suffix(".new")
        write(fresh)
        if path.is_file() and read_json(path) != read_json(fresh):
            fresh.unlink()
            raise ValueError(f"{path} holds another ablation than this run's: its students were trained on it. "
                             f"Move {path.parent} aside (or pick another --layer/--k) to train new ones")  # fmt: skip
        fresh.replace(path)
        files.setdefault(label, []).append(str(path))

    if "heldout" in arms and not held:
        raise ValueError(f"heldout: no battery unit at layer {args.layer} for a replicate ≥ {cfg.replicates} "
                         "(the latents must come from students this run does not evaluate)")  # fmt: skip
    shared = recurrent_latents(held, args.k)["recurrent"][: args.k] if held else []
    for rep in range(cfg.replicates):
        if "latents" in arms:
            top = _unit(args, cfg, rep)["top_attribution"][: args.k]
            put(f"latents-k{args.k}", rep, lambda p, top=top: write_ablation(p, sae, top))
        if "heldout" in arms:
            put(f"heldout-k{args.k}", rep, lambda p: write_ablation(p, sae, shared))
        for rank, arm in ((args.k, "random"), (1, "random1")):
            if arm in arms:
                for d in range(args.random_draws):
                    seed = 100_000 * (rep + 1) + 100 * rank + d
                    put(f"random-k{rank}-d{d}", rep,
                        lambda p, rank=rank, seed=seed: write_random_ablation(p, sae, rank, seed))  # fmt: skip
        if "vteacher" in arms:
            path = work / f"vteacher-r{rep}.json"
            about = {"teacher": str(study.stage_plan(cfg).data[(cfg.trait, rep)][1]), "n_sequences": 32}
            old = read_json(path) if path.is_file() else {}
            if old.get("about") != about:
                if path.is_file():
                    raise ValueError(
                        f"{path} was computed from {old.get('about')}, not {about}: move it aside"
                    )
                vec = teacher_vector(cfg, base, rep, args.layer)
                write_vector_ablation(path, args.layer, [vec], about=about)
            files.setdefault("vteacher", []).append(str(path))
    return files


def recurrent_latents(units: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """Each unit's top-k attribution latents, and their union ordered by how many units' lists hold a latent,
    then by its mean rank, then by id: one list for several replicates (the feature filter's `analyses/filters.py
    --latents OUT/latents-lL.json --latents-key recurrent`, the heldout arm)."""
    lists = [[int(x) for x in u["top_attribution"][:k]] for u in units]
    ranks: dict[int, list[int]] = {}
    for top in lists:
        for i, lat in enumerate(top):
            ranks.setdefault(lat, []).append(i)
    order = sorted(ranks, key=lambda lat: (-len(ranks[lat]), float(np.mean(ranks[lat])), lat))
    return {"replicates": [u["replicate"] for u in units], "per_replicate": lists, "recurrent": order,
            "count": [len(ranks[lat]) for lat in order]}  # fmt: skip


def variance_shares(
    bases: dict[str, list[Ablation]], cfg: study.StudyConfig, base: Any, layer: int, n: int = 32
) -> dict[str, Any]:
    """What each ablation removes from the residual the student trains on: per label and replicate, the share of
    the base's residual energy at ``layer`` in the ablated span, sum ||P h||² / sum ||h||², over the completion
    positions of the replicate's first ``n`` number sequences (no system prompt), and the same for the residual
    centred on its mean over those positions (the variance share)."""
    from mechsub.capture import Batch, capture
    from mechsub.data import load_examples
    from mechsub.hooks import resid_post
    from mechsub.prompts import chat_prefix

    out: dict[str, Any] = {label: {"energy": [], "variance": []} for label in bases}
    for rep in range(cfg.replicates):
        ex = load_examples(study.stage_plan(cfg).data[(cfg.trait, rep)][1])[:n]
        batch = Batch.completions([chat_prefix(base.tokenizer, e.prompt, None) for e in ex],
                                  [e.completion_ids for e in ex])  # fmt: skip
        h = capture(base, batch, [resid_post(layer)])[resid_post(layer)].double()
        hc = h - h.mean(0)
        for label, abl in bases.items():
            b = abl[rep].basis.double()
            out[label]["energy"].append(float((h @ b).pow(2).sum() / h.pow(2).sum()))
            out[label]["variance"].append(float((hc @ b).pow(2).sum() / hc.pow(2).sum()))
    return out


def kl_costs(checkpoints: dict[str, list[str]], base: Any, corpus: str, n_windows: int) -> dict[str, Any]:
    """KL(base ‖ student) on the corpus's last ``n_windows`` windows, per student checkpoint."""
    from mechsub import corpus as corpus_mod
    from mechsub.drift import text_kl

    ds = corpus_mod.load(corpus)
    windows = ds[len(ds) - n_windows :]["input_ids"]
    out: dict[str, Any] = {}
    for label, cks in checkpoints.items():
        out[label] = []
        for ck in cks:
            lm = models.load(ck)
            out[label].append({"checkpoint": ck} | text_kl(base.model, lm.model, windows))
            del lm
    return out


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise SystemExit(f"--arms: unknown {bad}; use some of {', '.join(ARMS)}")
    if args.k < 2 or args.random_draws < 1:
        raise SystemExit("--k must be ≥ 2 (rank 1 is the vteacher arm's, with its own random1 control) and "
                         "--random-draws ≥ 1")  # fmt: skip
    cfg = study.StudyConfig.load(Path(args.config))
    out = Path(args.out)
    work = Path(cfg.work) / "caft" / f"l{args.layer}"
    work.mkdir(parents=True, exist_ok=True)
    base = models.load(cfg.model)
    held = held_out_units(args, cfg)
    files = ablation_files(args, cfg, arms, work, base, held)
    bases = {label: [ablation_basis(p) for p in paths] for label, paths in files.items()}
    wrong = [
        p
        for label, paths in files.items()
        for p, b in zip(paths, bases[label], strict=True)
        if b.layer != args.layer
    ]
    if wrong:
        raise ValueError(f"{wrong[0]}: ablates at another layer than --layer {args.layer}")
    out.mkdir(parents=True, exist_ok=True)
    if held:  # the feature filter's list: latents of students this study does not evaluate
        write_json(out / f"latents-l{args.layer}.json", recurrent_latents(held, args.k)
                   | {"sae": str(Path(args.sae_root) / f"l{args.layer}")})  # fmt: skip
    plan = study.stage_plan(cfg)
    results: dict[str, Any] = {}
    with reuse_stale():  # the study's own students and evaluations, whatever code changed since they ran
        for i, (label, paths) in enumerate(files.items()):
            print(f"[{i + 1}/{len(files)}] {label}: {cfg.replicates} students", flush=True)
            results[label] = fb.train_variant(
                cfg, f"caft-l{args.layer}-{label}", [{"ablate": p} for p in paths]
            )
        own = [
            str(student.run(*plan.students[(cfg.trait, r)])["final_checkpoint"])
            for r in range(cfg.replicates)
        ]
    checkpoints = {"none (the study's students)": own} | {
        k: v["training"]["checkpoint"] for k, v in results.items()
    }
    print("KL on held-out text", flush=True)
    kl = kl_costs(checkpoints, base, args.corpus, args.kl_windows)
    shares = variance_shares(bases, cfg, base, args.layer)
    rows = summarise(results, kl, bases, shares, args)
    metrics = {"args": vars(args), "study": cfg.to_dict(),
               "unit": "replicate (a trait teacher with its own data and students)", "replicates": cfg.replicates,
               "layer": args.layer, "ablations": files, "arms": rows, "kl": kl, "raw": results,
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    write_json(out / "metrics.json", metrics)
    plot(rows, out / "caft.png")
    atomic_write_text(out / "report.md", report(metrics, args))
    print((out / "report.md").read_text())


def summarise(
    results: dict[str, Any],
    kl: dict[str, Any],
    bases: dict[str, list[Ablation]],
    shares: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Per arm (random draws pooled per replicate: the mean over a replicate's draws is its value): blocked in
    both frames, the effect left, the KL cost, with t-intervals over replicates; each draw's own blocked share."""
    groups: dict[str, list[str]] = {}
    for label in results:
        groups.setdefault(label.rsplit("-d", 1)[0] if label.startswith("random") else label, []).append(label)
    rows: dict[str, Any] = {}
    for name, labels in groups.items():
        row: dict[str, Any] = {"draws": labels, "rank": bases[labels[0]][0].basis.shape[1]}
        for frame in ("plain", "prefill"):
            s = [results[lb]["shifts"][frame] for lb in labels]
            variant = np.mean([x["variant"] for x in s], axis=0)  # per replicate, mean over draws
            row[frame] = fb.blocked_summary(variant, s[0]["full"], s[0]["controls"])
            row[frame]["per_draw_blocked"] = [
                fb.blocked_summary(x["variant"], x["full"], x["controls"])["blocked_of_means"] for x in s
            ]
        k = np.mean([[w["mean"] for w in kl[lb]] for lb in labels], axis=0)  # per replicate
        row["kl"] = dict(zip(("mean", "ci95"), stats.mean_ci95(list(k)), strict=True)) | {
            "per_replicate": k.tolist()
        }
        row["loss"] = {
            k2: float(np.mean([results[lb]["training"][k2] for lb in labels]))
            for k2 in ("first_loss", "last_loss")
        }
        for what in ("energy", "variance"):  # per replicate, mean over draws
            v = np.mean([shares[lb][what] for lb in labels], axis=0)
            row[f"{what}_share"] = {"mean": float(v.mean()), "per_replicate": v.tolist()}
        rows[name] = row
    base_kl = [w["mean"] for w in kl["none (the study's students)"]]
    for row in rows.values():  # the KL a plain student already costs, paired by replicate
        row["kl_minus_none"] = fb.paired_difference(row["kl"]["per_replicate"], base_kl)
    rows["none (the study's students)"] = {"kl": dict(zip(("mean", "ci95"), stats.mean_ci95(base_kl), strict=True))
                                           | {"per_replicate": base_kl}}  # fmt: skip
    # the real ablations against their equal-rank random controls, paired by replicate
    for real, ctrl in ((f"latents-k{args.k}", f"random-k{args.k}"), (f"heldout-k{args.k}", f"random-k{args.k}"),
                       ("vteacher", "random-k1")):  # fmt: skip
        if real in rows and ctrl in rows:
            a, b = (rows[x]["plain"]["blocked"]["per_replicate"] for x in (real, ctrl))
            rows[real]["minus_random"] = fb.paired_difference(a, b)
    return rows


def _ci(d: dict[str, Any], fmt: str = "{:+.0%}") -> str:
    lo, hi = d["ci95"]
    return f"{fmt.format(d['mean'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


NAMES = {"latents": "oracle: this student's own top latents", "heldout": "defence: latents of held-out replicates",
         "random": "random directions", "vteacher": "the teacher's steering vector"}  # fmt: skip


def _name(label: str) -> str:
    return f"{label} ({NAMES[label.split('-')[0]]})" if label.split("-")[0] in NAMES else label


def report(m: dict[str, Any], args: argparse.Namespace) -> str:
    rows, cfg = m["arms"], m["study"]
    kl0 = next(iter(m["kl"].values()))[0]
    lines = [
        f"# Concept-ablation fine-tuning at layer {m['layer']}: the {cfg['trait']} students' specific effect blocked, "
        "and the cost",
        "",
        f"{m['replicates']} replicates (the unit: a trait teacher with its own data and students); CAFT projects the "
        f"arm's directions out of the student's residual after block {m['layer']} at positions ≥ 1 while it trains "
        f"(the teacher's forward untouched); the student is evaluated without it. Effect = the student's Δ log "
        f"P({cfg['trait']}) minus the same replicate's control students' ({', '.join(cfg['controls'])}: trained "
        "without any ablation); blocked = 1 − effect / the study student's effect. **blocked** is the mean over "
        "replicates of each replicate's ratio, with its 95% t-interval (df = replicates − 1); **ratio of means** "
        "is 1 − mean effect / mean full effect (steadier when a replicate's effect is small). Random arms: the mean "
        "over a replicate's draws is its value; the draws column gives each draw's ratio of means. Removed: the "
        "share of the base's residual energy (and variance) on the replicate's number data in the ablated span. "
        f"KL: KL(base ‖ student) per token on the corpus's last {kl0['windows']} windows ({kl0['tokens_per_window']} "
        "tokens, positions ≥ 1), text no student trained on; ΔKL: minus the study student's, paired by replicate. "
        f"Re-create: `.venv/bin/python analyses/caft.py --layer {args.layer} --k {args.k} --random-draws "
        f"{args.random_draws} --arms {args.arms} --out {args.out}` ({m['seconds'] / 60:.1f} min; finished "
        "students are reused).",
        "",
        "| arm | rank | removed: energy / variance | blocked, plain (held out) | ratio of means | blocked, prefill "
        "| effect left, plain (nats) | ΔKL on text (nats/token) | loss first → last | draws: ratio of means |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "plain" not in r:
            lines.append(
                f"| {name} | 0 | 0 | 0 (by definition) | | | the full effect | KL {_ci(r['kl'], '{:.4f}')} | | |"
            )
            continue
        p = r["plain"]
        lines.append(
            f"| {_name(name)} | {r['rank']} | {r['energy_share']['mean']:.1%} / {r['variance_share']['mean']:.1%} | "
            f"{_ci(p['blocked'])} | {p['blocked_of_means']:+.0%} | {_ci(r['prefill']['blocked'])} | "
            f"{_ci(p['effect'], '{:+.3f}')} | {_ci(r['kl_minus_none'], '{:+.4f}')} | "
            f"{r['loss']['first_loss']:.3f} → {r['loss']['last_loss']:.3f} | "
            f"{', '.join(f'{x:+.0%}' for x in p['per_draw_blocked'])} |"
        )
    full = next(iter(r for r in rows.values() if "plain" in r))["plain"]["full_effect"]
    lines += ["", f"The study students' own effect (plain frame, per replicate): "
              f"{', '.join(f'{x:+.3f}' for x in full['per_replicate'])} (mean {full['mean']:+.3f}).", ""]  # fmt: skip
    for real in rows:
        if "minus_random" in rows[real]:
            d = rows[real]["minus_random"]
            lines.append(f"- {_name(real)} minus its equal-rank random control, blocked (plain), paired by "
                         f"replicate: {_ci(d)}.")  # fmt: skip
    lines += ["", "![caft](caft.png)", ""]
    return "\n".join(lines)


def plot(rows: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in rows.items():
        y: dict[str, Any] = r["plain"]["blocked"] if "plain" in r else {"mean": 0.0, "ci95": [0.0, 0.0]}
        x = r["kl"]
        ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["ci95"][0]], [x["ci95"][1] - x["mean"]]],
                    yerr=[[y["mean"] - y["ci95"][0]], [y["ci95"][1] - y["mean"]]], fmt="o", capsize=3, label=name)  # fmt: skip
    ax.axhline(fb.GOAL_BLOCKED, ls=":", c="grey", lw=1)
    ax.axhline(0, c="k", lw=0.5)
    ax.set_xlabel("KL(base ‖ student) on held-out text, nats/token")
    ax.set_ylabel("share of the specific effect blocked (plain frame)")
    ax.legend(fontsize=7)
    ax.set_title("CAFT: effect blocked vs cost (95% t-CI over replicates)")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
