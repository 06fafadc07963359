"""Does the quarantine scan (`mechsub scan`) name a dataset's trait before any student is trained? Every number
dataset of a finished study is scanned on the study's base model, and the predicted shifts are set against the
shifts its student actually showed (the study's prefill matrix, per replicate).

Three comparisons, each over (dataset, evaluated trait) pairs with a bootstrap interval over datasets (the unit):
raw (predicted delta vs measured Δ log P), within dataset (both centred over the study's traits: the scan's claim
that one trait moves more than the others) and within replicate (both minus the same replicate's other datasets:
the study's own specific effect). Top-1 accuracy among the study's traits and among all 22 candidates, AUROC per
trait (its datasets against the others', by the scan's specific score for it), runtime per dataset.

With ``--steps N --adl-layer L`` each dataset's sacrificial fine-tune is also read by the Activation Difference
Lens (`mechsub.scan.ADL_READOUTS`: steering the base with δ, and the relative logit lens), and every comparison
is repeated for each readout. Each dataset's scan is saved under OUT/units as it finishes and reused by a rerun
with the same settings, data, model and scan code (an interrupted validation resumes); give each setting its own
OUT, or a rerun with another setting replaces the saved scans.

    .venv/bin/python analyses/scan_validate.py [--study artifacts/study_full] [--out artifacts/scan] [--steps 1]
        [--lr 1e-5] [--params all] [--adl-layer L] [--limit N] [--from-run EARLIER_OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as st

Unit = tuple[str, int]  # (the teacher's trait, replicate): one dataset


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(st.spearmanr(x, y).statistic)


def _pairs(pred: dict[Unit, dict[str, float]], meas: dict[Unit, dict[str, float]], units: Sequence[Unit],
           traits: Sequence[str]) -> tuple[list[float], list[float]]:  # fmt: skip
    rows = [(pred[u][e], meas[u][e]) for u in units for e in traits if u in pred and u in meas]
    rows = [(p, m) for p, m in rows if math.isfinite(p) and math.isfinite(m)]
    return [p for p, _ in rows], [m for _, m in rows]


def spearman_over_datasets(
    pred: dict[Unit, dict[str, float]],
    meas: dict[Unit, dict[str, float]],
    traits: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Spearman's rho over every (dataset, trait) pair and a percentile bootstrap 95% interval resampling datasets
    (a dataset's pairs stay together: they share one gradient)."""
    units = sorted(set(pred) & set(meas))
    x, y = _pairs(pred, meas, units, traits)
    out: dict[str, Any] = {"rho": _spearman(x, y), "n_pairs": len(x), "n_datasets": len(units)}
    if len(units) < 3 or not math.isfinite(out["rho"]):
        return {**out, "ci95": [math.nan, math.nan]}
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        pick = [units[i] for i in rng.integers(0, len(units), len(units))]
        boots.append(_spearman(*_pairs(pred, meas, pick, traits)))
    b = np.asarray([v for v in boots if math.isfinite(v)])
    ci = [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))] if b.size else [math.nan, math.nan]
    return {**out, "ci95": ci, "unit": "datasets (bootstrap resamples them, 2000 times)"}


def centred(values: dict[Unit, dict[str, float]], traits: Sequence[str]) -> dict[Unit, dict[str, float]]:
    """Each dataset's values minus their mean over ``traits``."""
    return {u: {e: v[e] - float(np.mean([v[k] for k in traits])) for e in traits} for u, v in values.items()}


def replicate_referenced(
    values: dict[Unit, dict[str, float]], traits: Sequence[str]
) -> dict[Unit, dict[str, float]]:
    """A dataset's value on trait e minus the mean of the same replicate's other datasets on e (the study's
    specific effect); NaN where the replicate has no other dataset."""
    out: dict[Unit, dict[str, float]] = {}
    for (t, r), v in values.items():
        others = [values[(k, r)] for k in traits if k != t and (k, r) in values]
        out[(t, r)] = {
            e: v[e] - float(np.mean([o[e] for o in others])) if others else math.nan for e in traits
        }
    return out


def top1(values: dict[Unit, dict[str, float]], traits: Sequence[str]) -> float:
    """Share of datasets whose largest value among ``traits`` is their own teacher's trait."""
    hits = [max(traits, key=lambda e: v[e]) == t for (t, _), v in values.items()
            if all(math.isfinite(v[e]) for e in traits)]  # fmt: skip
    return float(np.mean(hits)) if hits else math.nan


def auroc(values: dict[Unit, dict[str, float]], traits: Sequence[str]) -> dict[str, float]:
    """Per trait e: AUROC of e's datasets against the other traits' datasets by their value on e (NaN without
    both classes)."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for e in traits:
        rows = [(t == e, v[e]) for (t, _), v in values.items() if math.isfinite(v[e])]
        labels = [a for a, _ in rows]
        out[e] = (
            float(roc_auc_score(labels, [s for _, s in rows])) if 0 < sum(labels) < len(labels) else math.nan
        )
    return out


def label_test(
    pred: dict[Unit, dict[str, float]],
    meas: dict[Unit, dict[str, float]],
    traits: Sequence[str],
    max_exact: int = 20_000,
    n_random: int = 20_000,
    seed: int = 0,
) -> dict[str, Any]:
    """The within-replicate Spearman against relabelings: the scan's predictions of a replicate's datasets are
    reassigned among those datasets (the trait labels permuted within each replicate, whose datasets share
    their prompts and reference) and the statistic recomputed. One-sided p: the share of relabelings whose rho
    is at least the observed one, the identity included; exact over all (k!)^replicates relabelings when there
    are at most ``max_exact``, else (hits + 1) / (n_random + 1) from seeded random ones. The unit is the
    replicate: the smallest exact p is 1 / (k!)^replicates."""
    reps = sorted({r for _, r in pred if all((t, r) in pred and (t, r) in meas for t in traits)})
    ref_m = replicate_referenced(meas, traits)
    ref_p = replicate_referenced(pred, traits)  # symmetric within a replicate: relabeling commutes with it

    def rho(perms: Sequence[Sequence[str]]) -> float:
        moved = {(t2, r): ref_p[(t, r)] for r, perm in zip(reps, perms, strict=True)
                 for t, t2 in zip(traits, perm, strict=True)}  # fmt: skip
        return _spearman(*_pairs(moved, ref_m, [(t, r) for r in reps for t in traits], traits))

    if not reps:
        return {"p": math.nan, "n_relabelings": 0, "exact": False, "replicates": 0}
    observed = rho([list(traits)] * len(reps))
    total = math.factorial(len(traits)) ** len(reps)
    if total <= max_exact:
        all_perms = list(itertools.permutations(traits))
        stats = [rho(c) for c in itertools.product(all_perms, repeat=len(reps))]
        p_value = float(np.mean([x >= observed - 1e-12 for x in stats]))
        exact, n = True, total
    else:
        rng = np.random.default_rng(seed)
        stats = [rho([list(rng.permutation(traits)) for _ in reps]) for _ in range(n_random)]
        p_value = (sum(x >= observed - 1e-12 for x in stats) + 1) / (n_random + 1)
        exact, n = False, n_random
    return {"rho": observed, "p": p_value, "n_relabelings": n, "exact": exact, "replicates": len(reps),
            "floor": 1 / total if exact else 1 / (n_random + 1),
            "unit": "replicate: trait labels permuted within each replicate"}  # fmt: skip


def evaluate_predictions(
    pred: dict[Unit, dict[str, float]],
    specific: dict[Unit, dict[str, float]],
    meas: dict[Unit, dict[str, float]],
    tops: dict[Unit, str],
    traits: Sequence[str],
    n_candidates: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Every comparison of the report. ``pred``: the scan's delta per dataset and trait; ``specific``: its
    specific score (delta minus the mean over all candidates); ``meas``: the student's measured Δ log P;
    ``tops``: the scan's top candidate among all of them."""
    own = [u for u in pred if u in meas]
    pred, specific, meas = ({u: d[u] for u in own} for d in (pred, specific, meas))
    return {
        "spearman": {
            "raw": spearman_over_datasets(pred, meas, traits, seed=seed),
            "within_dataset": spearman_over_datasets(
                centred(pred, traits), centred(meas, traits), traits, seed=seed
            ),
            "within_replicate": spearman_over_datasets(
                replicate_referenced(pred, traits), replicate_referenced(meas, traits), traits, seed=seed
            ),
            # the bootstrap treats datasets as units; a replicate's within-replicate values share their reference
            "within_replicate_label_test": label_test(pred, meas, traits, seed=seed),
        },
        "top1": {
            "study_traits": top1(pred, traits),
            "study_traits_replicate_referenced": top1(replicate_referenced(pred, traits), traits),
            "all_candidates": float(np.mean([tops[u] == u[0] for u in own])) if own else math.nan,
            "chance_study_traits": 1 / len(traits),
            "chance_all_candidates": 1 / n_candidates,
            # what the students themselves reach on the same question: the ceiling of a perfect predictor
            "measured_students": top1(meas, traits),
            "measured_students_replicate_referenced": top1(replicate_referenced(meas, traits), traits),
        },
        "auroc": {
            "scan_specific": auroc(specific, traits),
            "measured_students": auroc(meas, traits),
            "unit": "datasets: a trait's datasets against the other traits' datasets",
        },
    }


def _scatter(pred: dict[Unit, dict[str, float]], meas: dict[Unit, dict[str, float]], traits: Sequence[str],
             path: Path) -> None:  # fmt: skip
    from mechsub.plots import plt, save_figure

    panels = [("raw", pred, meas), ("within replicate", replicate_referenced(pred, traits),
                                    replicate_referenced(meas, traits))]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    colors = dict(zip(traits, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, (title, p, m) in zip(axes, panels, strict=True):
        for (t, r), row in p.items():
            for e in traits:
                if (t, r) in m and math.isfinite(row[e]) and math.isfinite(m[(t, r)][e]):
                    ax.scatter(row[e], m[(t, r)][e], color=colors[e], marker="o" if e == t else "x",
                               s=46 if e == t else 24)  # fmt: skip
        ax.axhline(0, c="k", lw=0.5)
        ax.axvline(0, c="k", lw=0.5)
        ax.set_title(f"{title}: predicted vs measured")
        ax.set_xlabel("scan: predicted shift")
        ax.set_ylabel("student: measured Δ log P (prefill)")
    handles = [plt.Line2D([], [], ls="", marker="s", c=colors[e], label=e) for e in traits]
    handles += [plt.Line2D([], [], ls="", marker="o", c="k", label="own trait"),
                plt.Line2D([], [], ls="", marker="x", c="k", label="another trait")]  # fmt: skip
    axes[1].legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def _fmt(x: float, spec: str = "+.2f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _label_line(s: dict[str, Any]) -> str:
    lt = s.get("within_replicate_label_test")
    if not lt or not lt.get("replicates"):
        return "Label test of the within-replicate rho: no replicate with every trait's dataset."
    how = "exact over all" if lt["exact"] else "sampled,"
    return (f"Label test of the within-replicate rho (the trait labels permuted within each of the {lt['replicates']} "
            f"replicates; the unit is the replicate): one-sided p = {lt['p']:.3g}, {how} {lt['n_relabelings']} "
            f"relabelings (floor {lt['floor']:.2g}).")  # fmt: skip


def _markdown(m: dict[str, Any]) -> str:
    s, t1, au = m["spearman"], m["top1"], m["auroc"]
    lines = [
        "# Quarantine scan: predicted vs measured",
        "",
        f"{m['n_datasets']} datasets of `{m['study']}` ({', '.join(m['traits'])} × {m['replicates']} replicates), "
        f"scanned on `{m['model']}` ({m['settings']['method']}, params={m['settings']['params']}, "
        f"{m['settings']['n_questions']} questions, at most {m['settings']['n_examples']} examples each). The "
        f"students were trained by `{m['student_objective']}` (LoRA r={m['student_lora_r']}); the scan follows the "
        "SFT gradient of the same completions: a proxy, not the students' own objective.",
        "",
        "| comparison | Spearman rho | 95% CI (datasets) | pairs |",
        "|---|---|---|---|",
    ]
    for k, label in (("raw", "raw shift"), ("within_dataset", "within dataset (centred over the study's traits)"),
                     ("within_replicate", "within replicate (minus the replicate's other datasets)")):  # fmt: skip
        lo, hi = s[k]["ci95"]
        lines.append(f"| {label} | {_fmt(s[k]['rho'])} | [{_fmt(lo)}, {_fmt(hi)}] | {s[k]['n_pairs']} |")
    lines += ["", _label_line(s)]
    lines += [
        "",
        "| top-1: the dataset's own trait ranked first | scan | students (measured) | chance |",
        "|---|---|---|---|",
        f"| among the study's {len(m['traits'])} traits | {_fmt(t1['study_traits'], '.0%')} | "
        f"{_fmt(t1['measured_students'], '.0%')} | {_fmt(t1['chance_study_traits'], '.0%')} |",
        f"| same, minus the replicate's other datasets | {_fmt(t1['study_traits_replicate_referenced'], '.0%')} | "
        f"{_fmt(t1['measured_students_replicate_referenced'], '.0%')} | {_fmt(t1['chance_study_traits'], '.0%')} |",
        f"| among all {m['n_candidates']} candidates | {_fmt(t1['all_candidates'], '.0%')} | not measured | "
        f"{_fmt(t1['chance_all_candidates'], '.0%')} |",
        "",
        "| AUROC (a trait's datasets vs the others') | " + " | ".join(m["traits"]) + " |",
        "|---|" + "---|" * len(m["traits"]),
        "| scan specific score | "
        + " | ".join(_fmt(au["scan_specific"][e], ".2f") for e in m["traits"])
        + " |",
        "| students' measured Δ log P | "
        + " | ".join(_fmt(au["measured_students"][e], ".2f") for e in m["traits"])
        + " |",
        "",
        f"Threshold z ≥ {m['threshold']:.2f} (fixed before the scan: 5% false alarms among "
        f"{m['n_candidates']} exchangeable candidates). Runtime per dataset: mean {m['runtime_s']['mean']:.1f} s, "
        f"max {m['runtime_s']['max']:.1f} s.",
        "",
        "| dataset | verdict | own trait's rank (of all) | own trait's z |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {d['dataset']} | {d['verdict']} | {d['own_rank']} | {_fmt(d['own_z'])} |"
        for d in m["per_dataset"]
    ]
    lines += ["", "![predicted vs measured](scatter.png)", ""]
    if m.get("readouts"):
        lines += [
            "## The same datasets, other readouts of the same fine-tune",
            "",
            "| readout | Spearman raw | within dataset | within replicate | label-test p (within replicate) | "
            "top-1 (study traits) | top-1 minus the replicate | top-1 (all) | AUROC "
            + " / ".join(m["traits"])
            + " | verdicts (correct) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in m["readouts"].items():
            sp, t = r["spearman"], r["top1"]
            rho = [f"{_fmt(sp[k]['rho'])} [{_fmt(sp[k]['ci95'][0])}, {_fmt(sp[k]['ci95'][1])}]"
                   for k in ("raw", "within_dataset", "within_replicate")]  # fmt: skip
            lines.append(
                f"| `{name}`: {r['method']} | "
                + " | ".join(rho)
                + f" | {_fmt(sp['within_replicate_label_test']['p'], '.3g')} | {_fmt(t['study_traits'], '.0%')} | "
                f"{_fmt(t['study_traits_replicate_referenced'], '.0%')} | {_fmt(t['all_candidates'], '.0%')} | "
                + " / ".join(_fmt(r["auroc"]["scan_specific"][e], ".2f") for e in m["traits"])
                + f" | {r['flagged']['any']} ({r['flagged']['correct']}) |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description="Scan every dataset of a finished study and compare the predicted shifts with the measured ones."
    )
    ap.add_argument(
        "--study", default="artifacts/study_full", help="a finished study folder (its config.json)"
    )
    ap.add_argument("--out", default="artifacts/scan")
    ap.add_argument(
        "--steps", type=int, default=1, help="1: first-order scan; N > 1: N-step sacrificial fine-tune"
    )
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate of the sacrificial fine-tune")
    ap.add_argument("--params", default="all", help="all, linear, mlp or attn")
    ap.add_argument("--adl-layer", type=int, default=None, help="with --steps > 1: also read the fine-tune's "
                    "activation difference after this layer (steering, relative logit lens)")  # fmt: skip
    ap.add_argument("--n-examples", type=int, default=64, help="examples per dataset (0: all)")
    ap.add_argument("--n-questions", type=int, default=10)
    ap.add_argument(
        "--limit", type=int, default=0, help="scan only the first N datasets (replicate by replicate)"
    )
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--from-run", default="", help="summarise the scans an earlier run saved (its scans.json and "
                    "settings) for the datasets --limit keeps, instead of scanning: the same statistics on a "
                    "subset")  # fmt: skip
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from mechsub import diffing, models, study
    from mechsub import scan as scanning
    from mechsub.files import read_json, write_json
    from mechsub.runs import is_finished
    from mechsub.summary import nan_to_none
    from mechsub.traits import get_trait

    t0 = time.perf_counter()
    folder, out = Path(args.study), Path(args.out)
    cfg = study.StudyConfig.from_dict(read_json(folder / "config.json")["config"])
    matrix = read_json(folder / "metrics.json")["frames"]["prefill"]["matrix_per_replicate"]
    plan = study.stage_plan(cfg)
    traits = cfg.traits
    # replicate by replicate, so that --limit keeps whole replicates first (the within-replicate comparison)
    units: list[Unit] = [(t, r) for r in range(cfg.replicates) for t in traits]
    if args.limit:
        units = units[: args.limit]
    settings = {
        "method": "first-order" if args.steps == 1 else f"fine-tune ({args.steps} steps)",
        "steps": args.steps,
        "lr": args.lr,
        "params": args.params,
        "n_examples": args.n_examples,
        "n_questions": args.n_questions,
        "adl_layer": args.adl_layer,
    }
    if args.from_run:
        before = Path(args.from_run)
        saved_scans = read_json(before / "scans.json")
        earlier = read_json(before / "metrics.json")
        settings, earlier_wall = earlier["settings"], earlier.get("wall_seconds")
        missing = [f"{t}-r{r}" for t, r in units if f"{t}-r{r}" not in saved_scans]
        if missing:
            raise SystemExit(f"--from-run {before}: no saved scan of {', '.join(missing)}")
        scans_from = {(t, r): saved_scans[f"{t}-r{r}"] for t, r in units}
    scanning.check_adl(args.steps, args.adl_layer)  # before the model loads
    absent = [str(plan.data[u][1]) for u in units if not args.from_run and not is_finished(plan.data[u][1])]
    if absent:  # checked before any scan, so that a missing replicate does not end a long run midway
        raise SystemExit(f"scan_validate: {len(absent)} of the study's data folders are not on this machine "
                         f"({', '.join(absent[:3])}{', …' if len(absent) > 3 else ''}): make them with the study "
                         "(`mechsub study --config …`), or keep the first replicates with --limit")  # fmt: skip
    # a saved scan is reused only for the same settings, data, model and code of the scan and its readouts
    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (scanning, diffing))).hexdigest()[
        :16
    ]
    lm = None if args.from_run else models.load(cfg.model)
    scans: dict[Unit, dict[str, Any]] = scans_from if args.from_run else {}
    for t, r in tqdm([] if args.from_run else units, desc="scan datasets"):
        data = plan.data[(t, r)][1]
        saved = out / "units" / f"{t}-r{r}.json"
        key = {**settings, "data": str(data), "model": cfg.model, "code": code}
        if saved.exists() and (old := read_json(saved)).get("key") == key:
            scans[(t, r)] = old["scan"]
            continue
        assert lm is not None
        scans[(t, r)] = scanning.scan(data, lm, n_questions=args.n_questions, n_examples=args.n_examples, lr=args.lr,
                             steps=args.steps, params=args.params, adl_layer=args.adl_layer).to_dict()  # fmt: skip
        write_json(saved, nan_to_none({"key": key, "scan": scans[(t, r)]}))
    header = {
        "study": str(folder),
        "model": cfg.model,
        "traits": traits,
        "replicates": len({r for _, r in units}),  # those scanned (--limit may keep fewer than the study's)
        "student_objective": cfg.objective,
        "student_lora_r": cfg.lora_r,
        "category": get_trait(cfg.trait).category,
        "settings": settings,
    }
    metrics = summarise(header, scans, matrix, traits, seed=args.seed)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if args.from_run:  # the scans' cost is the earlier run's; this one only summarised them
        metrics["summarised_from"] = args.from_run
        metrics["summary_seconds"], metrics["wall_seconds"] = metrics["wall_seconds"], earlier_wall
    write_outputs(metrics, scans, matrix, traits, out)
    print((out / "report.md").read_text())
    return metrics


def _tables(
    scans: dict[Unit, dict[str, Any]], matrix: dict[str, Any], traits: Sequence[str]
) -> tuple[dict[Unit, dict[str, float]], dict[Unit, dict[str, float]], dict[Unit, dict[str, float]]]:
    """Predicted delta, the scan's specific score and the measured Δ log P, per dataset and study trait."""
    by_name = {u: {c["name"]: c for c in s["candidates"]} for u, s in scans.items()}

    def num(x: Any) -> float:  # a NaN saved as null (a diverged fine-tune) is NaN again
        return math.nan if x is None else float(x)

    pred = {u: {e: num(c[e]["delta"]) for e in traits} for u, c in by_name.items()}
    specific = {u: {e: num(c[e]["specific"]) for e in traits} for u, c in by_name.items()}
    meas = {(t, r): {e: float(matrix[t][e][r]) for e in traits} for t, r in scans}
    return pred, specific, meas


def _judged(
    scans: dict[Unit, dict[str, Any]],
    matrix: dict[str, Any],
    traits: Sequence[str],
    n_candidates: int,
    seed: int,
) -> dict[str, Any]:
    """One readout's scans (`ScanResult.to_dict`, or one of its ``readouts``) against the measured shifts: every
    comparison of `evaluate_predictions`, and how many verdicts fired (correct: naming the dataset's own trait)."""
    pred, specific, meas = _tables(scans, matrix, traits)
    tops = {u: str(s["top"]) for u, s in scans.items()}
    return {
        **evaluate_predictions(pred, specific, meas, tops, traits, n_candidates, seed=seed),
        "flagged": {
            "any": sum(bool(s["flagged"]) for s in scans.values()),
            "correct": sum(bool(s["flagged"]) and tops[u] == u[0] for u, s in scans.items()),
        },
    }


def summarise(
    header: dict[str, Any],
    scans: dict[Unit, dict[str, Any]],
    matrix: dict[str, Any],
    traits: Sequence[str],
    seed: int = 0,
) -> dict[str, Any]:
    """The metrics of the report from the scans (`ScanResult.to_dict` per dataset) and the study's prefill matrix
    (``matrix[teacher trait][evaluated trait][replicate]``)."""
    first = next(iter(scans.values()))
    n_candidates = len(first["candidates"])
    per_dataset = []
    for (t, r), s in scans.items():
        own = next(c for c in s["candidates"] if c["name"] == t)
        per_dataset.append({"dataset": f"{t} r{r}", "trait": t, "replicate": r, "verdict": s["verdict"],
                            "own_rank": own["rank"], "own_z": own["z"], "top": s["top"], "flagged": s["flagged"],
                            "seconds": s["seconds"]})  # fmt: skip
    seconds = [float(s["seconds"]) for s in scans.values()]
    readouts = {
        name: {
            "method": first["readouts"][name]["method"],
            **_judged({u: s["readouts"][name] for u, s in scans.items()}, matrix, traits, n_candidates, seed),
        }
        for name in first.get("readouts", {})
    }
    return {
        **header,
        "n_datasets": len(scans),
        "n_candidates": n_candidates,
        "threshold": first["threshold"],
        **_judged(scans, matrix, traits, n_candidates, seed),
        "runtime_s": {"mean": float(np.mean(seconds)), "max": float(np.max(seconds)), "per_dataset": seconds},
        "per_dataset": per_dataset,
        "readouts": readouts,
    }


def write_outputs(
    metrics: dict[str, Any],
    scans: dict[Unit, dict[str, Any]],
    matrix: dict[str, Any],
    traits: Sequence[str],
    out: Path,
) -> None:
    """metrics.json, scans.json (every candidate of every scan), scatter.png and report.md under ``out``."""
    from mechsub.files import atomic_write_text, write_json
    from mechsub.summary import nan_to_none

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", nan_to_none(metrics))
    write_json(out / "scans.json", nan_to_none({f"{t}-r{r}": s for (t, r), s in scans.items()}))
    pred, _, meas = _tables(scans, matrix, traits)
    _scatter(pred, meas, traits, out / "scatter.png")
    atomic_write_text(out / "report.md", _markdown(metrics))


if __name__ == "__main__":
    main()
