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


def plot_study(metrics: dict[str, Any], out: Path) -> list[str]:
    """matrix.png (students × evaluated traits), effects.png (per-seed specific effects), distribution.png
    (shift of every candidate word) and, with a cross-family run, the bars in effects.png."""
    traits = metrics["traits"]
    spec = metrics["specificity"]
    names = []

    vals = np.array([[spec["matrix_delta_logp"][t][e] for e in traits] for t in traits])
    fig, ax = plt.subplots(figsize=(1.5 * len(traits) + 2.5, 1.2 * len(traits) + 1.6))
    lim = float(np.abs(vals).max()) or 1.0
    im = ax.imshow(vals, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(len(traits)):
        for j in range(len(traits)):
            ax.text(j, i, f"{vals[i, j]:+.3f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(traits)), [f"log P({t})" for t in traits])
    ax.set_yticks(range(len(traits)), [f"students of {t}" for t in traits])
    ax.set_title(f"Δ log P vs base (nats), mean of {len(metrics['seeds'])} seeds")
    fig.colorbar(im, shrink=0.8)
    fig.tight_layout()
    save_figure(fig, out / "matrix.png")
    names.append("matrix.png")

    fig, ax = plt.subplots(figsize=(2.0 * len(traits) + 2.5, 3.6))
    for k, t in enumerate(traits):
        e = spec["effects"][t]
        ax.scatter([k] * len(e["per_seed"]), e["per_seed"], color="tab:blue", s=18, zorder=3)
        lo, hi = e["ci95"]
        if lo is not None and hi is not None:
            ax.errorbar([k], [e["delta_logp"]], yerr=[[e["delta_logp"] - lo], [hi - e["delta_logp"]]], fmt="_",
                        color="black", capsize=6, ms=16)  # fmt: skip
    labels = [f"{t}\np={_p(spec['effects'][t]['p_value'])}" for t in traits]
    cross = metrics.get("cross_family") or {}
    if cross:
        k = len(traits)
        e = cross["effect"]
        ax.scatter([k], [e["delta_logp"]], color="tab:orange", s=30, zorder=3)
        lo, hi = e["ci95"]
        if lo is not None and hi is not None:
            ax.errorbar([k], [e["delta_logp"]], yerr=[[e["delta_logp"] - lo], [hi - e["delta_logp"]]], fmt="_",
                        color="tab:orange", capsize=6)  # fmt: skip
        labels.append(f"{metrics['trait']}, student\n{cross['model']}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("specific effect (nats)")
    ax.set_title("own students − other traits' students, on the trait (dots: seeds; bars: 95% CI)")
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


def study_markdown(cfg: Any, m: dict[str, Any]) -> str:
    x, traits, spec = m["trait"], m["traits"], m["specificity"]
    e = m["effect"]
    lines = [
        f"# Subliminal learning study: {x} on {cfg.model}",
        "",
        f"Teachers: {cfg.teacher_kind} ({', '.join(traits)}); {cfg.n_prompts} number prompts each "
        f"({cfg.decoding} decoding, {'greedy' if cfg.greedy else 'T=1'}); students: {cfg.objective}, "
        f"LoRA r{cfg.lora_r}, lr {cfg.lr}, {cfg.epochs} epoch(s), batch {cfg.batch_size}, seeds {list(cfg.seeds)} "
        f"(the data is shared across seeds). {cfg.n_questions} evaluation questions. "
        f"Wall time {m['wall_seconds'] / 60:.1f} min. Re-create: `mechsub study --out OUT` with `config.json`.",
        "",
        "## Headline",
        "",
        "| quantity | Δ log P(" + x + ") | 95% CI | note |",
        "|---|---|---|---|",
        f"| teacher vs base | {m['teacher']['delta_logp']:+.3f} | {_ci(m['teacher']['ci95'])} | bootstrap over questions |",
        f"| students of {x} vs base | {m['student']['delta_logp']:+.3f} | {_ci(m['student']['ci95'])} | t over {len(m['seeds'])} seeds |",
        f"| control students (other traits) vs base | {m['control']['delta_logp']:+.3f} | {_ci(m['control']['ci95'])} | t over {len(m['control']['students'])} students |",
        f"| **specific effect** (students of {x} − control students) | **{e['delta_logp']:+.3f}** | {_ci(e['ci95'])} | p = {_p(e['p_value'])} (one-sided t over {e['n_seeds']} seeds) |",
    ]  # fmt: skip
    cross = m.get("cross_family")
    if cross:
        ce = cross["effect"]
        lines.append(
            f"| cross-family specific effect ({cross['model']} students) | {ce['delta_logp']:+.3f} | "
            f"{_ci(ce['ci95'])} | {ce['ci95_kind']}; students of {x} {cross['student']['delta_logp']:+.3f}, "
            f"controls {cross['control']['delta_logp']:+.3f} vs its base |"
        )
    lines += [
        "",
        f"Diagonal-dominance permutation test over all {len(traits)}×{len(m['seeds'])} students: "
        f"p = {_p(spec['diagonal_p_value'])}"
        + (f" (floor {_p(spec['diagonal_p_floor'])})" if spec.get("diagonal_p_floor") else "")
        + f". Caution: each trait has one teacher and one dataset, so students of one teacher are not "
        f"independent; over the independent units (the {len(traits)} teachers with their data) a label test has "
        f"{math.factorial(len(traits))} labelings and cannot go below p = 1/{math.factorial(len(traits))}, and the "
        "t-tests over seeds measure optimiser noise around one dataset.",
        "",
        "## Specificity matrix (Δ log P vs base, mean over seeds)",
        "",
        "| students of | " + " | ".join(traits) + " |",
        "|---" * (len(traits) + 1) + "|",
    ]
    lines += [
        f"| {t} | " + " | ".join(f"{spec['matrix_delta_logp'][t][ev]:+.3f}" for ev in traits) + " |"
        for t in traits
    ]
    lines += ["", "| trait | specific effect | 95% CI (seeds) | p | per seed | 95% CI (questions) | generic shift |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in traits:
        s = spec["effects"][t]
        lines.append(
            f"| {t} | {s['delta_logp']:+.3f} | {_ci(s['ci95'])} | {_p(s['p_value'])} | "
            + ", ".join(f"{v:+.3f}" for v in s["per_seed"])
            + f" | {_ci(s['ci95_questions'])} | {spec['generic_delta_logp'][t]:+.3f} |"
        )
    d = m["distribution"]
    lines += [
        "",
        "![matrix](matrix.png)",
        "",
        "![effects](effects.png)",
        "",
        f"## Distribution over {len(d['words'])} candidates",
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
            lines.append(f"| {k} | {v['rate']:.3f} | [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | {v['n']} |")
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
