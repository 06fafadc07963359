"""Arms of a study: the same teachers and data, students trained another way (objective, LoRA rank, data size),
each arm a whole study with the same statistics, collected into one table and one plot.

An arm is ``study.run`` of the base config with a few fields overridden; its stage runs share the base study's
work folder, so teachers, data and every equal student are reused (an arm with fewer replicates reuses the first
ones). The cross-family students are the base study's business and are skipped in arms. Arm study folders (their
own report.md, metrics.json, plots) go under ``WORK/arms/NAME``; the comparison writes ``metrics.json``,
``report.md`` and ``arms.png`` into its out folder.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from mechsub import study
from mechsub.files import atomic_write_text, write_json
from mechsub.summary import FRAMES, HELD_OUT


def run_arms(
    base: study.StudyConfig, arms: dict[str, dict[str, Any]], out: str | Path, title: str, name: str
) -> dict[str, Any]:
    """Run (resuming) every arm and write the comparison into ``out``; ``name`` prefixes the arms' folders."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    for label, overrides in arms.items():
        t0 = time.perf_counter()
        cfg = dataclasses.replace(base, cross_family="", **overrides)
        m = study.run(cfg, Path(base.work) / "arms" / f"{name}-{_slug(label)}")
        rows[label] = arm_row(cfg, m, time.perf_counter() - t0)
    metrics = {"title": title, "base": base.to_dict(), "arms": rows, "held_out_frame": HELD_OUT}
    write_json(out / "metrics.json", metrics)
    plot_arms(metrics, out / "arms.png")
    atomic_write_text(out / "report.md", arms_markdown(metrics))
    return metrics


def _slug(label: str) -> str:
    """A folder name for an arm's label ("distill (13 number tokens)" → "distill-13-number-tokens")."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-")


def arm_row(cfg: study.StudyConfig, m: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What the comparison keeps of an arm's study: per frame the pooled and the trait's specific effect and the
    permutation test; the students' cost."""
    students = [v for k, v in m["students"].items() if not k.startswith("x-")]
    return {
        "overrides": {k: v for k, v in cfg.to_dict().items() if v != getattr(study.StudyConfig(), k, None)},
        "replicates": m["replicates"],
        "n_teachers": m["n_teachers"],
        "frames": {
            f: {
                "pooled": m["frames"][f]["pooled"],
                "trait": m["frames"][f]["effects"][m["trait"]],
                "permutation": m["frames"][f].get("permutation"),
            }
            for f in FRAMES
        },
        "student_seconds": float(np.sum([s.get("seconds_this_session") or 0.0 for s in students])),
        "student_steps": [s.get("steps") for s in students][:1],
        "wall_seconds_this_session": round(seconds, 1),
    }


def plot_arms(metrics: dict[str, Any], path: Path) -> None:
    """Pooled specific effect per arm with its 95% CI, in the training frame and the held-out frames."""
    from mechsub.plots import plt, save_figure

    labels = list(metrics["arms"])
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 3, 3.8))
    for j, (f, color) in enumerate(
        zip(FRAMES, ("tab:gray", "tab:blue", "tab:cyan", "tab:green"), strict=True)
    ):
        x = np.arange(len(labels)) + (j - 1.5) * 0.18
        for k, label in enumerate(labels):
            e = metrics["arms"][label]["frames"][f]["pooled"]
            lo, hi = e["ci95"]
            ax.scatter([x[k]], [e["delta_logp"]], color=color, s=22, zorder=3, label=f if k == 0 else None)
            if lo is not None and hi is not None:
                ax.errorbar([x[k]], [e["delta_logp"]], yerr=[[e["delta_logp"] - lo], [hi - e["delta_logp"]]],
                            color=color, capsize=4, fmt="none")  # fmt: skip
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("pooled specific effect (nats)")
    ax.set_title(metrics["title"] + " (95% CI over replicates)", fontsize=9)
    ax.legend(fontsize=8, title="frame")
    fig.tight_layout()
    save_figure(fig, path)


def _fmt(e: dict[str, Any]) -> str:
    lo, hi = e["ci95"]
    ci = "n/a" if lo is None else f"[{lo:+.3f}, {hi:+.3f}]"
    return f"{e['delta_logp']:+.3f} {ci}"


def arms_markdown(metrics: dict[str, Any]) -> str:
    lines = [f"# {metrics['title']}", "",
             "Pooled specific effect (per replicate the mean over traits of own student − the replicate's other "
             "students, on the trait; 95% t-interval over replicates, or over traits with one replicate) and the "
             "exact permutation test over the teachers (labels moved within replicates), per answer frame.", "",
             "| arm | teachers | prefill (training frame) | " + " | ".join(f"{f} (held out)" for f in FRAMES[1:])
             + " | permutation p, prefill / " + HELD_OUT + " (floor) | students' seconds |",
             "|---" * (5 + len(FRAMES) - 1) + "|"]  # fmt: skip
    for label, a in metrics["arms"].items():
        fr = a["frames"]
        perm = [fr[f]["permutation"] for f in ("prefill", HELD_OUT)]
        ps = " / ".join("n/a" if p is None else f"{p['p_value']:.2g}" for p in perm)
        floor = perm[0]["p_floor"] if perm[0] else None
        lines.append(f"| {label} | {a['n_teachers']} | " + " | ".join(_fmt(fr[f]["pooled"]) for f in FRAMES)
                     + f" | {ps} ({'n/a' if floor is None else f'{floor:.2g}'}) | {a['student_seconds']:.0f} |")  # fmt: skip
    lines += ["", "![arms](arms.png)", ""]
    return "\n".join(lines)
