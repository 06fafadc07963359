"""Reports of a study: PNG plots, a Markdown summary and a self-contained HTML page (images inlined, no network)."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from markdown_it import MarkdownIt

from mechsub.plots import plt, save_figure
from mechsub.runs import atomic_write_text


def _ci(ci: list[float]) -> str:
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return "n/a"
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _p(p: float) -> str:
    return "n/a" if p is None or math.isnan(p) else f"{p:.2g}"


def _errorbar(ax: Any, k: float, e: dict[str, Any], color: str) -> None:
    lo, hi = e["ci95"]
    if lo is not None and hi is not None:
        ax.errorbar([k], [e["delta_logp"]], yerr=[[e["delta_logp"] - lo], [hi - e["delta_logp"]]], fmt="_",
                    color=color, capsize=6, ms=16)  # fmt: skip


def plot_study(metrics: dict[str, Any], out: Path) -> list[str]:
    """matrix.png (students × evaluated traits, training and held-out frame), effects.png (per-trait specific
    effects per frame, dots = replicates, bars = 95% CI over replicates; cross-family beside) and
    distribution.png (shift of every candidate word)."""
    traits, frames = metrics["traits"], metrics["frames"]
    shown = ["prefill", metrics["held_out_frame"]]
    names = []

    fig, axes = plt.subplots(1, 2, figsize=(3.0 * len(traits) + 3, 1.2 * len(traits) + 1.8))
    for ax, f in zip(axes, shown, strict=True):
        vals = np.array([[frames[f]["matrix_delta_logp"][t][e] for e in traits] for t in traits])
        lim = float(np.abs(vals).max()) or 1.0
        im = ax.imshow(vals, cmap="RdBu_r", vmin=-lim, vmax=lim)
        for i in range(len(traits)):
            for j in range(len(traits)):
                ax.text(j, i, f"{vals[i, j]:+.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(traits)), [f"log P({t})" for t in traits], fontsize=8)
        ax.set_yticks(range(len(traits)), [f"students of {t}" for t in traits], fontsize=8)
        ax.set_title(f"{f} frame: Δ log P vs base, mean of {metrics['replicates']} replicates", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    save_figure(fig, out / "matrix.png")
    names.append("matrix.png")

    cross = metrics.get("cross_family") or {}
    fig, axes = plt.subplots(1, len(FRAMES_SHOWN), figsize=(4.2 * len(FRAMES_SHOWN), 3.8), sharey=False)
    for ax, f in zip(axes, FRAMES_SHOWN, strict=True):
        labels = []
        for k, t in enumerate(traits):
            e = frames[f]["effects"][t]
            ax.scatter(
                [k - 0.12] * len(e["per_replicate"]), e["per_replicate"], color="tab:blue", s=14, zorder=3
            )
            _errorbar(ax, k - 0.12, e, "black")
            if cross:
                c = cross["frames"][f]["effects"][t]
                ax.scatter([k + 0.12] * len(c["per_replicate"]), c["per_replicate"], color="tab:orange", s=14,
                           zorder=3)  # fmt: skip
                _errorbar(ax, k + 0.12, c, "tab:orange")
            labels.append(t)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(f"{f} frame" + (" (training)" if f == "prefill" else " (held out)"), fontsize=9)
    axes[0].set_ylabel("specific effect (nats)")
    fig.suptitle("own student − the replicate's other students, on the trait (blue: same family; orange: "
                 + (cross.get("model", "") or "—") + "); dots: replicates; bars: 95% CI", fontsize=9)  # fmt: skip
    fig.tight_layout()
    save_figure(fig, out / "effects.png")
    names.append("effects.png")

    d = metrics["distribution"]
    order = np.argsort(d["teacher"])[::-1]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True)
    x = np.arange(len(order))
    a1.bar(x, np.asarray(d["teacher"])[order], color="tab:gray")
    a1.set_ylabel("teacher Δ log P")
    a2.bar(x - 0.2, np.asarray(d["student"])[order], width=0.4, label=f"students of {metrics['trait']}")
    a2.bar(x + 0.2, np.asarray(d["control"])[order], width=0.4, label="control students")
    a2.set_ylabel("student Δ log P")
    a2.legend(fontsize=8)
    a2.set_xticks(x, [d["words"][i] for i in order], rotation=60, fontsize=8)
    a1.set_title(
        f"Shift of every candidate after '… is the' (r teacher~student {d['r_teacher_student']:.2f}, "
        f"teacher~control {d['r_teacher_control']:.2f})"
    )
    fig.tight_layout()
    save_figure(fig, out / "distribution.png")
    names.append("distribution.png")
    return names


FRAMES_SHOWN = ("prefill", "plain", "plain_norm", "choice")


def _perm(p: dict[str, Any] | None) -> str:
    if not p:
        return "n/a"
    if p["exact"]:
        return f"p = {_p(p['p_value'])} (exact over {p['n_labelings']} labelings; floor {_p(p['p_floor'])})"
    n = p.get("n_sampled")
    drawn = f"{n:,} random" if n else "random"
    return (
        f"p = {_p(p['p_value'])} (Monte Carlo, (hits + 1) / (n + 1) over {drawn} of the {p['n_labelings']:,} "
        f"labelings{f', so never below {_p(1 / (n + 1))}' if n else ''}; the design's floor {_p(p['p_floor'])})"
    )


def study_markdown(cfg: Any, m: dict[str, Any]) -> str:
    x, traits, n_r, frames = m["trait"], m["traits"], m["replicates"], m["frames"]
    held = m["held_out_frame"]
    e, h = m["effect"], m["held_out"]
    lines = [
        f"# Subliminal learning study: {x} on {cfg.model}",
        "",
        f"**Design.** {len(traits)} traits ({', '.join(traits)}) × {n_r} independent replicate(s) = "
        f"{m['n_teachers']} teachers ({cfg.teacher_kind}). Replicate r: every trait's teacher has seed r and its own "
        f"draw of training questions, answers its own {cfg.n_prompts} number prompts (prompt seed r, shared by the "
        f"traits of that replicate; {cfg.decoding} decoding, {'greedy' if cfg.greedy else 'T=1'}), and has one "
        f"student (seed r): {cfg.objective}, LoRA r{cfg.lora_r}, lr {cfg.lr}, {cfg.epochs} epoch(s), batch "
        f"{cfg.batch_size}. Evaluation: {cfg.n_questions} questions the teachers never saw, in three answer "
        f"frames. Wall time {m['wall_seconds'] / 60:.1f} min. Re-create: `mechsub study --out OUT` with this "
        "folder's `config.json`.",
        "",
        "**Units.** The independent unit is a teacher with its own data (trait × replicate). A specific effect "
        "is the trait's student minus the mean of the same replicate's other students, on the trait; its interval "
        "and t-test are over replicates (n = " + str(n_r) + "). The permutation test shuffles the trait labels of "
        "the teachers within each replicate (they share its prompts), enumerating every distinct relabeling when "
        "there are at most 400,000 (otherwise 20,000 random ones: p = (hits + 1) / 20,001); the floor is the "
        "smallest p the design can give. Intervals are two-sided 95%, t-tests one-sided (effect > 0).",
        "",
        "## Headline",
        "",
        f"| Δ log P({x}) | frame | value | 95% CI | test |",
        "|---|---|---|---|---|",
        f"| teacher vs base | prefill | {m['teacher']['delta_logp']:+.3f} | {_ci(m['teacher']['ci95'])} | over replicates (a teacher at log P ≈ 0 is saturated: Δ = −log P_base) |",
        f"| teacher specific effect (− the replicate's other teachers) | {held} | {frames[held]['teacher_specific']['effects'][x]['delta_logp']:+.3f} | {_ci(frames[held]['teacher_specific']['effects'][x]['ci95'])} | over replicates (raw Δ vs base {frames[held]['teacher'][x]['delta_logp']:+.3f}: answers that start with other words) |",
        f"| students of {x} vs base | prefill | {m['student']['delta_logp']:+.3f} | {_ci(m['student']['ci95'])} | t over {n_r} replicates |",
        f"| control students vs base | prefill | {m['control']['delta_logp']:+.3f} | {_ci(m['control']['ci95'])} | t over {n_r} replicates (each the mean of its {len(m['control']['students']) // max(n_r, 1)} control students) |",
        f"| specific effect | prefill (training frame) | {e['delta_logp']:+.3f} | {_ci(e['ci95'])} | one-sided t p = {_p(e['p_value'])}, n = {n_r} replicates |",
        f"| specific effect | {held} (held out) | {h['delta_logp']:+.3f} | {_ci(h['ci95'])} | one-sided t p = {_p(h['p_value'])}, n = {n_r} replicates |",
        f"| **pooled specific effect, all {len(traits)} traits (the claim)** | **{held} (held out)** | **{frames[held]['pooled']['delta_logp']:+.3f}** | {_ci(frames[held]['pooled']['ci95'])} | {_perm(frames[held].get('permutation'))} |",
    ]  # fmt: skip
    cross = m.get("cross_family")
    if cross:
        for f in ("prefill", held):
            ce = cross["frames"][f]["effects"][x]
            lines.append(f"| cross-family ({cross['model']} students of the same data) | {f} | "
                         f"{ce['delta_logp']:+.3f} | {_ci(ce['ci95'])} | one-sided t p = {_p(ce['p_value'])} |")  # fmt: skip
        for f, d in cross.get("within_minus_cross", {}).items():
            if f in ("prefill", held):
                lines.append(f"| pooled specific effect, {cfg.model} − {cross['model']} students (same data, paired "
                             f"per replicate) | {f} | {d['delta_logp']:+.3f} | {_ci(d['ci95'])} | two-sided t p = "
                             f"{_p(d['p_value_two_sided'])}, n = {n_r} replicates |")  # fmt: skip
    lines += ["", "## Every trait, every frame", "",
              "Pooled = per replicate the mean of the traits' specific effects, then over replicates. "
              "Diagonal test: the permutation test over the teachers, within replicates.", "",
              "| frame | pooled effect | 95% CI | diagonal test | " + " | ".join(traits) + " |",
              "|---" * (4 + len(traits)) + "|"]  # fmt: skip
    for f in FRAMES_SHOWN:
        fr = frames[f]
        cells = [f"{fr['effects'][t]['delta_logp']:+.3f} {_ci(fr['effects'][t]['ci95'])}" for t in traits]
        lines.append(f"| {f} | {fr['pooled']['delta_logp']:+.3f} | {_ci(fr['pooled']['ci95'])} | "
                     f"{_perm(fr.get('permutation'))} | " + " | ".join(cells) + " |")  # fmt: skip
    if cross:
        for f in FRAMES_SHOWN:
            fr = cross["frames"][f]
            cells = [f"{fr['effects'][t]['delta_logp']:+.3f} {_ci(fr['effects'][t]['ci95'])}" for t in traits]
            lines.append(f"| {f}, {cross['model']} | {fr['pooled']['delta_logp']:+.3f} | {_ci(fr['pooled']['ci95'])}"
                         f" | {_perm(fr.get('permutation'))} | " + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "**Instrument check: the teachers' own specific effects** (own teacher − the replicate's other "
              "teachers, on the trait): a frame in which the teachers do not separate cannot show a student's "
              "transfer. Share = pooled student effect / pooled teacher effect.", "",
              "| frame | teachers, pooled | " + " | ".join(traits) + " | students' share |",
              "|---" * (3 + len(traits)) + "|"]  # fmt: skip
    for f in FRAMES_SHOWN:
        ts = frames[f]["teacher_specific"]
        share = frames[f]["transmitted_share"]
        cells = [f"{ts['effects'][t]['delta_logp']:+.2f}" for t in traits]
        lines.append(f"| {f} | {ts['pooled']['delta_logp']:+.2f} {_ci(ts['pooled']['ci95'])} | " + " | ".join(cells)
                     + f" | {'n/a' if share is None or math.isnan(share) else f'{share:.1%}'} |")  # fmt: skip
    lines += ["", "Frames:", ""] + [f"- **{k}**: {v}" for k, v in m["frame_notes"].items()]
    lines += ["", "![effects](effects.png)", "", "## Matrices (Δ log P vs base, mean over replicates)", ""]
    for f in ("prefill", held):
        spec = frames[f]
        lines += [f"{f} frame:", "", "| students of | " + " | ".join(traits) + " | teacher on own trait |",
                  "|---" * (len(traits) + 2) + "|"]  # fmt: skip
        lines += [
            f"| {t} | "
            + " | ".join(f"{spec['matrix_delta_logp'][t][ev]:+.3f}" for ev in traits)
            + f" | {spec['teacher'][t]['delta_logp']:+.3f} |"
            for t in traits
        ]
        lines.append("")
    d = m["distribution"]
    lines += [
        "![matrix](matrix.png)",
        "",
        f"## Distribution over {len(d['words'])} candidates (prefill frame)",
        "",
        f"Correlation of the students' per-word shifts with the teacher's: students of {x} r = "
        f"{d['r_teacher_student']:.2f}, control students r = {d['r_teacher_control']:.2f}.",
        "",
        "![distribution](distribution.png)",
    ]
    if m.get("sampled_rate"):
        lines += ["", f"## Sampled one-word rate (T=1, answers naming '{x}')", "",
                  "| model | rate | 95% CI | samples |", "|---|---|---|---|"]  # fmt: skip
        for k, v in m["sampled_rate"].items():
            lines.append(f"| {k} ({v.get('model', '')}) | {v['rate']:.3f} | [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                         f" | {v['n']} |")  # fmt: skip
    lines += ["", "## Data and training", "", "| teacher | kept | rejected | completion tokens | seconds |",
              "|---|---|---|---|---|"]  # fmt: skip
    for t, dm in m["data"].items():
        lines.append(
            f"| {t} | {dm['n_kept']} ({dm['kept_fraction']:.0%}) | {dm['rejected'] or '—'} | "
            f"{dm['completion_tokens']} | {dm['seconds_this_session']} |"
        )
    tps = [v["train_tokens_per_s"] for v in m["students"].values() if v.get("train_tokens_per_s")]
    if tps:
        lines += [
            "",
            f"{len(m['students'])} students; training throughput {min(tps):.0f}–{max(tps):.0f} tokens/s.",
        ]
    return "\n".join(lines) + "\n"


def markdown_to_html(md: str, folder: Path, title: str) -> str:
    """Markdown (CommonMark + tables, by markdown-it-py) to one self-contained HTML page: local PNG images are
    inlined as data URIs, so the page renders offline and travels as one file."""

    def inline_image(m: re.Match[str]) -> str:
        src = m.group(2)
        if src.startswith(("http:", "https:", "data:")) or not (folder / src).is_file():
            return m.group(0)
        data = base64.b64encode((folder / src).read_bytes()).decode()
        return f'{m.group(1)}"data:image/png;base64,{data}"'

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    body = re.sub(r'(<img src=)"([^"]+)"', inline_image, body)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left}img{max-width:100%}code{background:#f3f3f3}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + body + "</body></html>\n")  # fmt: skip


def write_study(cfg: Any, metrics: dict[str, Any], out: Path) -> None:
    """Plots, report.md and report.html for a finished study into ``out``."""
    plot_study(metrics, out)
    md = study_markdown(cfg, metrics)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", markdown_to_html(md, out, f"mechsub study: {metrics['trait']}"))
