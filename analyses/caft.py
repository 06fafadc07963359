"""Concept-ablation fine-tuning (CAFT) on the replicated study (issue 15, item 2): project chosen directions out of
the student's residual while it trains (positions ≥ 1 only), then evaluate it as usual (no ablation at test time).
How much of the specific effect is blocked, and what does it cost on text the student never trained on?

For every replicate of the study (a trait teacher with its own data; its student and control students are the
study's), owl students are trained as the study's with, at the residual after block --layer:
  - latents (the oracle): the span of the decoder directions of the top --k latents of that replicate's
    localisation battery unit (`analyses/battery.py`: ranked by attribution on questions disjoint from the
    evaluation's, but on this very student against its control: a defender would not have it);
  - heldout (the defence): the top --k of the latents recurring in the battery units of the replicates that are
    not evaluated here (replicates ≥ the study's count), the same list for every replicate; with --heldout-from
    others, for each replicate the units of every other replicate (leave one out);
  - random: --random-draws draws of --k random orthonormal directions (the equal-rank control);
  - randlat: --random-draws draws of --k random latents of the same SAE, each from the firing-frequency decile of
    its counterpart in the latents arm's list (the heldout arm's without it), frequencies on the base's residual
    over the replicate's number data (what the student trains on): the control that, like the real arms, ablates
    directions the SAE found in this residual, not isotropic ones (which remove a tenth of the energy);
  - energylat: as randlat, but each latent drawn from its counterpart's cell of firing-frequency decile × decile
    of the residual energy its own decoder direction carries (`latent_energies`): random latents that remove
    about as much of the residual as the real list (randlat's remove less: frequency alone does not match it);
  - vteacher: the teacher's steering vector at that layer (the fine-tuned teacher's mean residual minus the
    base's over the completion positions of 32 of the replicate's number sequences), rank 1;
  - random1: --random-draws draws of one random direction (its equal-rank control).
Effect = the variant's Δ log P(trait) minus the replicate's control students' in the held-out plain frame (and the
training prefill frame); blocked = 1 − effect / the study student's effect; t-intervals over replicates (the unit).
Cost: KL(base ‖ student) per token on the corpus's held-out windows (positions ≥ 1), for every student and for the
study's own students (what plain training costs). Writes OUT/metrics.json, OUT/report.md, OUT/caft.png.

    .venv/bin/python analyses/caft.py [--config analyses/configs/filters.toml] [--layer 27] [--k 20]
        [--random-draws 2] [--arms latents,heldout,randlat,energylat,vteacher,random1]
        [--heldout-from later|others]
        [--battery artifacts/analyze/battery] [--ablated-controls dog] [--eval-ablated] [--out artifacts/caft]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mechsub import filterbench as fb
from mechsub import models, stats, student, study
from mechsub.files import sha256_file
from mechsub.filter import (
    Ablation,
    read_ablations,
    write_ablation,
    write_ablation_stack,
    write_random_ablation,
    write_vector_ablation,
)
from mechsub.patching import deciles, frequency_bins, matched_draw
from mechsub.plots import save_figure
from mechsub.runs import atomic_write_text, is_finished, read_json, reuse_stale, write_json

ARMS = ("latents", "heldout", "random", "randlat", "energylat", "vteacher", "random1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--config", default="analyses/configs/filters.toml", help="the study (TOML/JSON StudyConfig)"
    )
    ap.add_argument(
        "--battery", default="artifacts/analyze/battery", help="a localisation battery's out folder"
    )
    ap.add_argument("--sae-root", default="runs/saes", help="the SAE folders lL (the battery's --sae-root)")
    ap.add_argument(
        "--layer",
        default="27",
        help="the residual after this block; several (e.g. 9,18,27: multi-layer CAFT) for the vteacher and "
        "random1 arms, one direction per layer",
    )
    ap.add_argument(
        "--k", type=int, default=20, help="latents: the first k of each unit's attribution ranking"
    )
    ap.add_argument("--random-draws", type=int, default=2, help="draws per replicate of each random control")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}")
    ap.add_argument(
        "--corpus", default="runs/corpus", help="a `mechsub corpus` folder: its last windows for KL"
    )
    ap.add_argument("--kl-windows", type=int, default=32, help="held-out corpus windows for the KL cost")
    ap.add_argument(
        "--ablated-controls",
        default="",
        help="control traits (e.g. dog) whose students are also trained with each arm's ablation: the effect "
        "is then the ablated trait student minus these ablated controls (the control for an ablation that "
        "moves log P(trait) in any student)",
    )
    ap.add_argument(
        "--heldout-from",
        choices=("later", "others"),
        default="later",
        help="the heldout arm's units: later, those of the replicates ≥ the study's count (one list for all); "
        "others, for each replicate every other replicate's unit (leave one out)",
    )
    ap.add_argument(
        "--eval-ablated",
        action="store_true",
        help="also evaluate every student with its replicate's ablation kept on (the CAFT students, the "
        "ablated controls, and the study's own students: the ablation at test time only)",
    )
    ap.add_argument(
        "--rereport",
        action="store_true",
        help="only recompute the controls' readings from --out's metrics.json (its raw shifts) and rewrite the "
        "report: nothing is trained or evaluated",
    )
    ap.add_argument("--out", default="artifacts/caft")
    args = ap.parse_args(argv)
    try:
        args.layers = [int(x) for x in str(args.layer).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--layer: integers separated by commas, got {args.layer!r}") from None
    if not args.layers or len(set(args.layers)) != len(args.layers) or min(args.layers) < 0:
        raise SystemExit(f"--layer: distinct layers ≥ 0, got {args.layer!r}")
    args.layers = sorted(
        args.layers
    )  # one set of layers, one set of files and random draws, whatever the order
    args.layer = args.layers[0]  # the latent arms' one layer
    args.tag = "-".join(map(str, args.layers))
    args.ablated_controls = [c.strip() for c in args.ablated_controls.split(",") if c.strip()]
    return args


def teacher_vectors(
    cfg: study.StudyConfig, base: Any, rep: int, layers: list[int], n: int = 32
) -> list[list[float]]:
    """The replicate's teacher steering vector at each of ``layers``: the teacher's mean residual (with its system
    prompt, if any) minus the base's (``base``: the loaded base model), over the completion positions of its first
    ``n`` number sequences."""
    from mechsub.analyze import number_batches
    from mechsub.data import DataConfig, load_examples
    from mechsub.steering import layer_means

    folder = study.stage_plan(cfg).data[(cfg.trait, rep)][1]
    dcfg = DataConfig.from_dict(read_json(folder / "config.json")["config"])
    teacher = models.load(dcfg.model)
    s_batch, t_batch = number_batches(base.tokenizer, load_examples(folder)[:n], dcfg)
    v = layer_means(teacher, t_batch, layers) - layer_means(base, s_batch, layers)
    return [[float(x) for x in row] for row in v]


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
    weights = sae / "sae" / "sae_weights.safetensors"
    if key["sae"].get("sha256") and weights.is_file() and sha256_file(weights) != key["sae"]["sha256"]:
        raise ValueError(f"{path} ranked the latents of another SAE than the one now in {sae} (its weights' hash "
                         f"differs: retrained since?): latent ids name other directions there. Re-run "
                         f"analyses/battery.py --layers {args.layer} on this SAE (another --out) and pass --battery")  # fmt: skip
    return unit


def held_out_units(args: argparse.Namespace, cfg: study.StudyConfig) -> dict[int, list[dict[str, Any]]]:
    """Per evaluated replicate, the battery units at --layer the heldout arm pools, checked, none of them the
    replicate's own (its latents are never fitted to the student it is evaluated on): with --heldout-from later,
    those of the replicates this study does not evaluate (≥ its replicate count; one list for all); with others,
    every other replicate's (leave one out)."""
    units = (Path(args.battery) / "units").glob(f"r*-{cfg.trait}-l{args.layer}.json")
    reps = sorted(int(p.name.split("-")[0][1:]) for p in units)
    if args.heldout_from == "later":
        later = [_unit(args, cfg, r) for r in reps if r >= cfg.replicates]
        return {rep: later for rep in range(cfg.replicates)}
    every = {r: _unit(args, cfg, r) for r in reps}
    return {rep: [u for r, u in every.items() if r != rep] for rep in range(cfg.replicates)}


def ablation_files(
    args: argparse.Namespace,
    cfg: study.StudyConfig,
    arms: list[str],
    work: Path,
    base: Any,
    held: dict[int, list[dict[str, Any]]],
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
        old, new = (read_json(path), read_json(fresh)) if path.is_file() else (None, None)
        if old != new:
            fresh.unlink()
            if isinstance(old, dict) and "sae_sha256" not in old and old == {k: v for k, v in new.items()
                                                                              if k != "sae_sha256"}:  # fmt: skip
                raise ValueError(f"{path} was written before ablation files recorded their SAE's hash, so the SAE "
                                 "its students trained under is unknown: move it aside to train new ones")  # fmt: skip
            raise ValueError(f"{path} holds another ablation than this run's: its students were trained on it. "
                             f"Move {path.parent} aside (or pick another --layer/--k) to train new ones")  # fmt: skip
        fresh.replace(path)
        files.setdefault(label, []).append(str(path))

    if "heldout" in arms and not all(held.get(r) for r in range(cfg.replicates)):
        where = (
            f"for a replicate ≥ {cfg.replicates}" if args.heldout_from == "later" else "for another replicate"
        )
        raise ValueError(f"heldout: no battery unit at layer {args.layer} {where} (the latents must come from "
                         "students the replicate is not evaluated on)")  # fmt: skip
    pooled = {r: recurrent_latents(us, args.k)["recurrent"][: args.k] if us else [] for r, us in held.items()}
    d_model = base.model.config.hidden_size

    def random_stack(p: Path, rank: int, seed: int) -> None:
        """``rank`` random directions at each of --layer's layers (draws of their own), stacked when several."""
        parts = [p.with_name(f"{p.stem}-l{L}.json") for L in args.layers] if len(args.layers) > 1 else [p]
        for i, (L, part) in enumerate(zip(args.layers, parts, strict=True)):
            write_random_ablation(part, None, rank, seed + 10_000_000 * i, layer=L, d_model=d_model)
        if len(parts) > 1:
            write_ablation_stack(p, parts)

    for rep in range(cfg.replicates):
        # the replicate's own unit, read (and its SAE hash checked) once for the latents and randlat arms
        top = _unit(args, cfg, rep)["top_attribution"][: args.k] if "latents" in arms else []
        if "latents" in arms:
            put(f"latents-k{args.k}", rep, lambda p, top=top: write_ablation(p, sae, top))
        if "heldout" in arms:
            put(f"heldout-k{args.k}", rep, lambda p, rep=rep: write_ablation(p, sae, pooled[rep]))
        matched = [arm for arm in ("randlat", "energylat") if arm in arms]
        if matched:
            real = [int(x) for x in (top if "latents" in arms else pooled[rep])]
            if not real:
                raise ValueError(f"{matched[0]}: replicate {rep}'s list to match is empty (no top_attribution in its "
                                 "battery unit, or no units for the heldout arm): re-run analyses/battery.py")  # fmt: skip
            kept = latent_statistics(cfg, base, sae, rep, work, energy="energylat" in matched)
            cells = {"randlat": frequency_bins(kept["frequency"])}
            if "energylat" in matched:
                cells["energylat"] = energy_cells(cells["randlat"], kept["energy"])
            for arm in matched:
                for d in range(args.random_draws):
                    rng = np.random.default_rng(200_000 * (rep + 1) + d if arm == "randlat" else [3, rep, d])
                    ids = matched_draw(real, cells[arm], rng)
                    put(f"{arm}-k{args.k}-d{d}", rep, lambda p, ids=ids: write_ablation(p, sae, ids))
        for rank, arm in ((args.k, "random"), (1, "random1")):
            if arm in arms:
                for d in range(args.random_draws):
                    seed = 100_000 * (rep + 1) + 100 * rank + d
                    put(f"random-k{rank}-d{d}", rep,
                        lambda p, rank=rank, seed=seed: random_stack(p, rank, seed))  # fmt: skip
        if "vteacher" in arms:
            path = work / f"vteacher-r{rep}.json"
            about = {"teacher": str(study.stage_plan(cfg).data[(cfg.trait, rep)][1]), "n_sequences": 32,
                     "layers": args.layers}  # fmt: skip
            side = path.with_suffix(".about.json")
            old = read_json(side) if side.is_file() else ({"unknown": "no record"} if path.is_file() else {})
            if old != about:
                if path.is_file():
                    raise ValueError(f"{path} was computed from {old}, not {about}: move it aside")
                vecs = teacher_vectors(cfg, base, rep, args.layers)
                parts = [path.with_name(f"vteacher-r{rep}-l{L}.json") for L in args.layers]
                for L, part, vec in zip(args.layers, parts, vecs, strict=True):
                    write_vector_ablation(part if len(parts) > 1 else path, L, [vec], about=about)
                if len(parts) > 1:
                    write_ablation_stack(path, parts)
                write_json(path.with_suffix(".about.json"), about)
            files.setdefault("vteacher", []).append(str(path))
    return files


def content_hash(paths: list[str]) -> str:
    """8 hex digits of the content of an arm's ablation files, in replicate order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:8]


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


def _number_batch(cfg: study.StudyConfig, base: Any, rep: int, n: int) -> Any:
    """The completion positions of the replicate's first ``n`` number sequences (no system prompt): the
    residual the student trains on."""
    from mechsub.analyze import completion_batch
    from mechsub.data import load_examples

    return completion_batch(
        base.tokenizer, load_examples(study.stage_plan(cfg).data[(cfg.trait, rep)][1])[:n]
    )


def latent_frequencies(
    cfg: study.StudyConfig, base: Any, sae_folder: Path, rep: int, n: int = 32
) -> np.ndarray:
    """Per latent of the SAE in ``sae_folder``, the share of `_number_batch`'s positions where it fires on the
    base's residual at the SAE's layer (sink tokens read as not firing, `mechsub.sae.feature_acts`)."""
    from mechsub import sae as sae_mod

    sae = sae_mod.load_sae(sae_folder / "sae")
    acts = sae_mod.feature_acts(base, sae, sae_mod.sae_hook(sae), _number_batch(cfg, base, rep, n))
    return (acts > 0).double().mean(0).numpy()


def latent_energies(cfg: study.StudyConfig, base: Any, sae_folder: Path, rep: int, n: int = 32) -> np.ndarray:
    """Per latent of the SAE in ``sae_folder``, the share of the base's residual energy (at the SAE's hook, over
    `_number_batch`'s positions) along its unit decoder direction: sum (h·d)² / sum ||h||²."""
    import torch

    from mechsub import sae as sae_mod
    from mechsub.capture import capture

    sae = sae_mod.load_sae(sae_folder / "sae")
    hook = sae_mod.sae_hook(sae)
    h = capture(base, _number_batch(cfg, base, rep, n), [hook])[hook].double()
    w = sae.W_dec.detach().double()
    d = w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return ((h @ d.T).pow(2).sum(0) / h.pow(2).sum()).numpy()


def latent_statistics(
    cfg: study.StudyConfig, base: Any, sae_folder: Path, rep: int, work: Path, energy: bool, n: int = 32
) -> dict[str, np.ndarray]:
    """The replicate's per-latent firing frequencies (`latent_frequencies`) and, with ``energy``, energy shares
    (`latent_energies`) over its first ``n`` number sequences, computed once and kept in
    ``work/latent-stats-r{rep}.json`` under the SAE's weight hash, the model, the data folder and ``n``.
    The matched draws depend on them through deciles that a last-bit difference (another machine, another torch)
    can move, so a later run reads the statistics its students' draws came from instead of drawing anew."""
    path = work / f"latent-stats-r{rep}.json"
    about = {"sae_sha256": sha256_file(sae_folder / "sae" / "sae_weights.safetensors"), "model": cfg.model,
             "data": str(study.stage_plan(cfg).data[(cfg.trait, rep)][1]), "n_sequences": n}  # fmt: skip
    kept = read_json(path) if path.is_file() else {}
    if {k: kept.get(k) for k in about} != about:  # another SAE, model or data: computed anew
        kept = dict(about)
    todo = {"frequency": latent_frequencies, **({"energy": latent_energies} if energy else {})}
    missing = {k: f for k, f in todo.items() if k not in kept}
    for k, f in missing.items():
        kept[k] = [float(x) for x in f(cfg, base, sae_folder, rep, n)]
    if missing:
        write_json(path, kept)
    return {k: np.asarray(kept[k], dtype=float) for k in todo}


def energy_cells(freq_bins: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """One cell per latent for `matched_draw`: its firing-frequency bin (`frequency_bins`) × the decile of its
    energy share among all latents (1 … 10), coded bin × 100 + decile, so that the draw's fallback to the
    nearest cell stays within the frequency bin, at the nearest energy decile."""
    return np.asarray(freq_bins, dtype=int) * 100 + deciles(energies)


def variance_shares(
    bases: dict[str, list[tuple[Ablation, ...]]], cfg: study.StudyConfig, base: Any, n: int = 32
) -> dict[str, Any]:
    """What each ablation removes from the residual the student trains on: per label and replicate, the share of
    the base's residual energy at the ablation's layer in the ablated span, sum ||P h||² / sum ||h||², over the
    completion positions of the replicate's first ``n`` number sequences (no system prompt), and the same for the
    residual centred on its mean over those positions (the variance share); a stack's: the mean over its
    layers."""
    from mechsub.capture import capture
    from mechsub.hooks import resid_post

    out: dict[str, Any] = {label: {"energy": [], "variance": []} for label in bases}
    for rep in range(cfg.replicates):
        layers = sorted({a.layer for abl in bases.values() for a in abl[rep]})
        acts = capture(base, _number_batch(cfg, base, rep, n), [resid_post(L) for L in layers])
        for label, abl in bases.items():
            e, v = [], []
            for a in abl[rep]:
                h = acts[resid_post(a.layer)].double()
                hc, b = h - h.mean(0), a.basis.double()
                e.append(float((h @ b).pow(2).sum() / h.pow(2).sum()))
                v.append(float((hc @ b).pow(2).sum() / hc.pow(2).sum()))
            out[label]["energy"].append(float(np.mean(e)))
            out[label]["variance"].append(float(np.mean(v)))
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


def rereport(out: Path) -> dict[str, Any]:
    """Recompute the readings of the controls (`controlled_rows`) from OUT/metrics.json's raw shifts and rewrite
    the report: a finished run read again with this script's current summary, nothing trained or evaluated."""
    m = read_json(out / "metrics.json")
    args = argparse.Namespace(**m["args"])
    m["controlled"] = controlled_rows(m["raw"], m["raw_controls"], args)
    pair_rows(m["arms"], args)
    write_json(out / "metrics.json", m)
    plot(m["arms"], out / "caft.png", m["controlled"])
    atomic_write_text(out / "report.md", report(m, args))
    return m


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.rereport:
        return rereport(Path(args.out))
    t0 = time.perf_counter()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise SystemExit(f"--arms: unknown {bad}; use some of {', '.join(ARMS)}")
    matched = [arm for arm in ("randlat", "energylat") if arm in arms]
    if matched and not {"latents", "heldout"} & set(arms):
        raise SystemExit(
            f"--arms {matched[0]}: its latents are matched to the latents (or heldout) arm's; add one"
        )
    if args.k < 2 or args.random_draws < 1:
        raise SystemExit("--k must be ≥ 2 (rank 1 is the vteacher arm's, with its own random1 control) and "
                         "--random-draws ≥ 1")  # fmt: skip
    if len(args.layers) > 1 and set(arms) - {"vteacher", "random1"}:
        raise SystemExit(f"--layer {args.tag}: several layers are for the vteacher and random1 arms only (the "
                         "latent arms read one layer's SAE)")  # fmt: skip
    cfg = study.StudyConfig.load(Path(args.config))
    unknown = [c for c in args.ablated_controls if c not in cfg.controls]
    if unknown:
        raise SystemExit(f"--ablated-controls: {unknown} are not this study's controls {list(cfg.controls)}")
    plan = study.stage_plan(cfg)
    todo = [f"{t} r{r}" for (t, r), (_, folder) in plan.data.items() if not is_finished(folder)]
    if todo:
        raise SystemExit(f"the study's number data are not all made ({', '.join(todo[:4])}): run `.venv/bin/mechsub "
                         f"study --config {args.config} --out <folder>` first (it resumes)")  # fmt: skip
    out = Path(args.out)
    work = Path(cfg.work) / "caft" / f"l{args.tag}"
    work.mkdir(parents=True, exist_ok=True)
    base = models.load(cfg.model)
    held = held_out_units(args, cfg) if {"latents", "heldout", "randlat", "energylat"} & set(arms) else {}
    files = ablation_files(args, cfg, arms, work, base, held)
    bases = {label: [read_ablations(p) for p in paths] for label, paths in files.items()}
    wrong = [
        p
        for label, paths in files.items()
        for p, b in zip(paths, bases[label], strict=True)
        if [a.layer for a in b]
        != (args.layers if label.startswith(("vteacher", "random-k1-")) else [args.layer])
    ]
    if wrong:
        raise ValueError(f"{wrong[0]}: ablates at other layers than --layer {args.tag}")
    out.mkdir(parents=True, exist_ok=True)
    if args.heldout_from == "later" and held.get(0):  # the feature filter's list: latents of other students
        write_json(out / f"latents-l{args.layer}.json", recurrent_latents(held[0], args.k)
                   | {"sae": str(Path(args.sae_root) / f"l{args.layer}")})  # fmt: skip
    results: dict[str, Any] = {}
    ctrl: dict[str, dict[str, Any]] = {}  # label → control trait → its ablated students
    # the study's own students and evaluations are reused whatever code changed since they ran; so are this
    # script's, so their names carry a hash of the ablation files' content: a changed file is a new student
    with reuse_stale():
        for i, (label, paths) in enumerate(files.items()):
            print(f"[{i + 1}/{len(files)}] {label}: {cfg.replicates} students"
                  + (f" (and {', '.join(args.ablated_controls)})" if args.ablated_controls else ""), flush=True)  # fmt: skip
            ovs = [{"ablate": p} for p in paths]
            name = f"caft-l{args.tag}-{label}-{content_hash(paths)}"
            results[label] = fb.train_variant(cfg, name, ovs, ablated_eval=args.eval_ablated)
            ctrl[label] = {c: fb.train_variant(cfg, name, ovs, trait=c,
                                               ablated_eval=args.eval_ablated) for c in args.ablated_controls}  # fmt: skip
        own = [
            str(student.run(*plan.students[(cfg.trait, r)])["final_checkpoint"])
            for r in range(cfg.replicates)
        ]
    checkpoints = {"none (the study's students)": own} | {
        k: v["training"]["checkpoint"] for k, v in results.items()
    }
    print("KL on held-out text", flush=True)
    kl = kl_costs(checkpoints, base, args.corpus, args.kl_windows)
    shares = variance_shares(bases, cfg, base)
    rows = summarise(results, kl, bases, shares, args)
    controlled = controlled_rows(results, ctrl, args)
    metrics = {"args": vars(args), "study": cfg.to_dict(),
               "unit": "replicate (a trait teacher with its own data and students)", "replicates": cfg.replicates,
               "layer": args.layer, "layers": args.layers, "ablations": files, "arms": rows,
               "controlled": controlled, "kl": kl, "raw": results, "raw_controls": ctrl,
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    write_json(out / "metrics.json", metrics)
    plot(rows, out / "caft.png", controlled)
    atomic_write_text(out / "report.md", report(metrics, args))
    print((out / "report.md").read_text())
    return metrics


def summarise(
    results: dict[str, Any],
    kl: dict[str, Any],
    bases: dict[str, list[Ablation]],
    shares: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Per arm (random draws pooled per replicate: the mean over a replicate's draws is its value): blocked in
    both frames, the effect left, the KL cost, with t-intervals over replicates; each draw's own blocked share."""
    rows: dict[str, Any] = {}
    for name, labels in _groups(results).items():
        row: dict[str, Any] = {"draws": labels, "rank": sum(a.basis.shape[1] for a in bases[labels[0]][0])}
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
    pair_rows(rows, args)
    return rows


def pair_rows(rows: dict[str, Any], args: argparse.Namespace) -> None:
    """The real ablations against their equal-rank controls, blocked (plain), paired by replicate."""
    for real, ctrl, key in control_pairs(args.k):
        if real in rows and ctrl in rows:
            a, b = (rows[x]["plain"]["blocked"]["per_replicate"] for x in (real, ctrl))
            rows[real][key] = fb.paired_difference(a, b)


def control_pairs(k: int) -> tuple[tuple[str, str, str], ...]:
    """(real arm, its equal-rank control arm, the key of their paired difference)."""
    return ((f"latents-k{k}", f"random-k{k}", "minus_random"), (f"heldout-k{k}", f"random-k{k}", "minus_random"),
            (f"latents-k{k}", f"randlat-k{k}", "minus_randlat"), (f"heldout-k{k}", f"randlat-k{k}", "minus_randlat"),
            (f"latents-k{k}", f"energylat-k{k}", "minus_energylat"),
            (f"heldout-k{k}", f"energylat-k{k}", "minus_energylat"),
            ("vteacher", "random-k1", "minus_random"))  # fmt: skip


CONTROL_NAMES = {"minus_random": "random directions", "minus_randlat": "frequency-matched random latents",
                 "minus_energylat": "frequency- and energy-matched random latents"}  # fmt: skip


def _randlat_match(args: argparse.Namespace) -> str:
    """Whose list the randlat and energylat draws are matched to (the latents arm's when it ran)."""
    return "latents" if "latents" in str(args.arms).split(",") else "heldout"


READINGS = {
    "ablated_controls": "controls trained with the same ablation",
    "eval_ablated": "the ablation kept on at test",
    "test_only": "the study's students, the ablation at test only",
    "training_added": "kept on at test, against the study's students with it on at test",
}


def _groups(labels: Any) -> dict[str, list[str]]:
    """Arm name → its labels (a random arm's draws pooled)."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        pooled = label.startswith(("random", "randlat", "energylat"))
        groups.setdefault(label.rsplit("-d", 1)[0] if pooled else label, []).append(label)
    return groups


def controlled_rows(
    results: dict[str, Any], ctrl: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Per arm (a random arm's draws: their mean per replicate), blocked in the plain frame read three more ways
    (`READINGS`), each against the study student's effect over the same controls without any ablation:
      - ablated_controls: the variant minus the --ablated-controls' students trained with the same ablation (the
        study student minus those controls' study students: the full effect);
      - eval_ablated: variant and controls (the ablated controls if any, else the study's controls) evaluated
        with the ablation kept on;
      - test_only: the study's own trait and control students evaluated with the ablation on (no training
        change: what the ablation at test time alone blocks);
      - training_added: eval_ablated's effect against test_only's instead of the unablated full effect (what
        training under the ablation adds to the ablation at test time).
    Each real arm also minus its equal-rank random control, paired by replicate."""
    shifts = {label: r["shifts"]["plain"] for label, r in results.items()}
    cs = args.ablated_controls

    def mean_ctrl(label: str, key: str) -> np.ndarray:
        return np.mean([ctrl[label][c]["shifts"]["plain"][key] for c in cs], axis=0)

    def readings(label: str) -> dict[str, tuple[np.ndarray, ...]]:
        sh = {k: np.asarray(v) for k, v in shifts[label].items()}
        full_c = mean_ctrl(label, "full") if cs else sh["controls"]
        out: dict[str, tuple[np.ndarray, ...]] = {}
        if cs:
            out["ablated_controls"] = (sh["variant"], sh["full"], mean_ctrl(label, "variant"), full_c)
        if args.eval_ablated:
            c_ab = mean_ctrl(label, "variant_ablated") if cs else sh["controls_ablated"]
            c_test = mean_ctrl(label, "full_ablated") if cs else sh["controls_ablated"]
            out["eval_ablated"] = (sh["variant_ablated"], sh["full"], c_ab, full_c)
            out["test_only"] = (sh["full_ablated"], sh["full"], c_test, full_c)
            out["training_added"] = (sh["variant_ablated"], sh["full_ablated"], c_ab, c_test)
        return out

    rows: dict[str, Any] = {}
    for name, labels in _groups(results).items():
        per = [readings(lb) for lb in labels]
        rows[name] = {
            what: fb.blocked_summary(*(np.mean([p[what][i] for p in per], axis=0) for i in range(4)))
            for what in per[0]
        }
    for real, rnd, key in control_pairs(args.k):
        if real in rows and rnd in rows:
            for what in rows[real]:
                a, b = (rows[x][what]["blocked"]["per_replicate"] for x in (real, rnd))
                rows[real][what][key] = fb.paired_difference(a, b)
    return rows


def _ci(d: dict[str, Any], fmt: str = "{:+.0%}") -> str:
    lo, hi = d["ci95"]
    return f"{fmt.format(d['mean'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


NAMES = {"latents": "oracle: this student's own top latents", "heldout": "defence: latents of held-out replicates",
         "random": "random directions", "randlat": "frequency-matched random latents of the same SAE",
         "energylat": "frequency- and energy-matched random latents of the same SAE",
         "vteacher": "the teacher's steering vector"}  # fmt: skip


def _name(label: str) -> str:
    return f"{label} ({NAMES[label.split('-')[0]]})" if label.split("-")[0] in NAMES else label


def report(m: dict[str, Any], args: argparse.Namespace) -> str:
    rows, cfg = m["arms"], m["study"]
    kl0 = next(iter(m["kl"].values()))[0]
    lines = [
        f"# Concept-ablation fine-tuning at layer{'s' if len(args.layers) > 1 else ''} "
        f"{', '.join(map(str, args.layers))}: the {cfg['trait']} students' specific effect blocked, "
        "and the cost",
        "",
        f"{m['replicates']} replicates (the unit: a trait teacher with its own data and students); CAFT projects the "
        f"arm's directions out of the student's residual after block{'s' if len(args.layers) > 1 else ''} "
        f"{', '.join(map(str, args.layers))} at positions ≥ 1 while it trains "
        f"(the teacher's forward untouched); the student is evaluated without it. Rank: the directions in all; "
        f"removed: the mean over the layers. Effect = the student's Δ log "
        f"P({cfg['trait']}) minus the same replicate's control students' ({', '.join(cfg['controls'])}: trained "
        "without any ablation); blocked = 1 − effect / the study student's effect. **blocked** is the mean over "
        "replicates of each replicate's ratio, with its 95% t-interval (df = replicates − 1); **ratio of means** "
        "is 1 − mean effect / mean full effect (steadier when a replicate's effect is small). Random arms: the mean "
        "over a replicate's draws is its value; the draws column gives each draw's ratio of means. Removed: the "
        "share of the base's residual energy (and variance) on the replicate's number data in the ablated span. "
        f"KL: KL(base ‖ student) per token on the corpus's last {kl0['windows']} windows ({kl0['tokens_per_window']} "
        "tokens, positions ≥ 1), text no student trained on; ΔKL: minus the study student's, paired by replicate. "
        f"Re-create: `.venv/bin/python analyses/caft.py --layer {','.join(map(str, args.layers))} --k {args.k} --random-draws "
        f"{args.random_draws} --arms {args.arms}"
        + (f" --ablated-controls {','.join(args.ablated_controls)}" if args.ablated_controls else "")
        + (" --eval-ablated" if args.eval_ablated else "")
        + (
            f" --heldout-from {args.heldout_from}"
            if getattr(args, "heldout_from", "later") != "later"
            else ""
        )
        + (
            f" --battery {args.battery}"
            if getattr(args, "battery", "") != "artifacts/analyze/battery"
            else ""
        )
        + f" --out {args.out}` ({m['seconds'] / 60:.1f} min; finished "
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
        for key, what in CONTROL_NAMES.items():
            if key in rows[real]:
                if key in ("minus_randlat", "minus_energylat") and not real.startswith(_randlat_match(args)):
                    what += f", drawn to match the {_randlat_match(args)} arm's lists, not this arm's"
                lines.append(f"- {_name(real)} minus its equal-rank control ({what}), blocked (plain), paired by "
                             f"replicate: {_ci(rows[real][key])}.")  # fmt: skip
    if "heldout" in str(args.arms) and getattr(args, "heldout_from", "later") == "others":
        lines.append("- The heldout arm left one out: each replicate's list pools the other replicates' units, so "
                     "the replicates' heldout values are not independent of each other (the t-interval assumes "
                     "they are).")  # fmt: skip
    lines += ["", "![caft](caft.png)", ""]
    if any(m["controlled"].values()):
        cs = ", ".join(args.ablated_controls) or "none"
        lines += [
            "## The controls for an ablation that moves log P in any student",
            "",
            f"Controls trained with the same ablation: {cs}"
            + (
                " (they replace the study's controls in every reading). "
                if args.ablated_controls
                else f" (every reading subtracts the study's controls, {', '.join(cfg['controls'])}, evaluated as the "
                "reading says). "
            )
            + "Each reading's full effect is the study student minus the same controls' study students, without "
            "any ablation, except the last reading's: the same students evaluated with the ablation on. Blocked "
            "(plain, held out), 95% t-interval over replicates; effect left in nats. Minus random: paired by "
            "replicate against each equal-rank control arm read the same way.",
            "",
            "| arm | reading | blocked | ratio of means | effect left (nats) | minus its equal-rank control |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in m["controlled"].items():
            for what, b in r.items():
                minus = "; ".join(f"{ctl}: {_ci(b[key])}" for key, ctl in CONTROL_NAMES.items() if key in b)
                lines.append(f"| {_name(name)} | {READINGS[what]} | {_ci(b['blocked'])} | "
                             f"{b['blocked_of_means']:+.0%} | {_ci(b['effect'], '{:+.3f}')} | {minus} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot(rows: dict[str, Any], path: Path, controlled: dict[str, Any] | None = None) -> None:
    """Blocked vs KL per arm (filled: against the study's controls); with ``controlled``, each arm's readings of
    the controls beside it (hollow, at the same KL, offset to be seen)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    marks = dict(zip(READINGS, "sD^v", strict=True))
    span = max((r["kl"]["mean"] for r in rows.values()), default=0.0) or 1.0
    labelled: set[str] = set()
    for name, r in rows.items():
        y: dict[str, Any] = r["plain"]["blocked"] if "plain" in r else {"mean": 0.0, "ci95": [0.0, 0.0]}
        x = r["kl"]
        bar = ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["ci95"][0]], [x["ci95"][1] - x["mean"]]],
                          yerr=[[y["mean"] - y["ci95"][0]], [y["ci95"][1] - y["mean"]]], fmt="o", capsize=3,
                          label=name)  # fmt: skip
        for j, (what, b) in enumerate((controlled or {}).get(name, {}).items()):
            lo, hi = b["blocked"]["ci95"]
            m = b["blocked"]["mean"]
            ax.errorbar(x["mean"] + span * 0.03 * (j + 1), m, yerr=[[m - lo], [hi - m]], fmt=marks[what],
                        mfc="none", color=bar[0].get_color(), capsize=2,
                        label=None if what in labelled else READINGS[what])  # fmt: skip
            labelled.add(what)
    ax.axhline(fb.GOAL_BLOCKED, ls=":", c="grey", lw=1)
    ax.axhline(0, c="k", lw=0.5)
    ax.set_xlabel("KL(base ‖ student) on held-out text, nats/token")
    ax.set_ylabel("share of the specific effect blocked (plain frame)")
    ax.legend(fontsize=6)
    ax.set_title("CAFT: effect blocked vs cost (95% t-CI over replicates)")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
