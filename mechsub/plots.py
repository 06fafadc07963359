"""PNG figures for run folders (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mechsub.runs import atomic_write_bytes


def plot_mnist(metrics: dict[str, Any], path: str | Path) -> None:
    """Left: the six conditions at the headline m with 95% CIs. Right: aux-only accuracy against m."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = ["reference", "teacher", "student_aux", "student_all", "cross_init_aux", "cross_init_all"]
    labels = [
        "reference\n(init)",
        "teacher",
        "student\naux only",
        "student\nall logits",
        "cross-init\naux only",
        "cross-init\nall logits",
    ]
    means = [metrics[f"{n}_acc"] * 100 for n in names]
    errs = [
        [(metrics[f"{n}_acc"] - metrics[f"{n}_acc_ci95"][0]) * 100 for n in names],
        [(metrics[f"{n}_acc_ci95"][1] - metrics[f"{n}_acc"]) * 100 for n in names],
    ]
    colors = ["#999999", "#333333", "#d62728", "#ff9896", "#1f77b4", "#aec7e8"]
    ax1.bar(range(len(names)), means, yerr=errs, color=colors, capsize=4)
    for i, v in enumerate(means):
        ax1.text(i, v + errs[1][i] + 1.5, f"{v:.1f}", ha="center", fontsize=8)
    ax1.axhline(metrics["chance"] * 100, ls="--", c="k", lw=0.8, label="chance")
    ax1.set_xticks(range(len(names)), labels, fontsize=8)
    ax1.set_ylabel("held-out digit accuracy (%)")
    ax1.set_ylim(0, 105)
    ax1.set_title(f"m = {metrics['m']} auxiliary logits, {metrics['n_models']} models, 95% CI")
    ax1.legend(loc="upper right", fontsize=8)

    sweep = metrics["m_sweep"]
    ms = [s["m"] for s in sweep]
    for key, color, label in [
        ("student_aux", "#d62728", "same init, aux only"),
        ("cross_init_aux", "#1f77b4", "different init, aux only"),
    ]:
        y = [s[f"{key}_acc"] * 100 for s in sweep]
        lo = [s[f"{key}_acc_ci95"][0] * 100 for s in sweep]
        hi = [s[f"{key}_acc_ci95"][1] * 100 for s in sweep]
        ax2.plot(ms, y, "o-", c=color, label=label)
        ax2.fill_between(ms, lo, hi, color=color, alpha=0.2)
    ax2.axhline(metrics["chance"] * 100, ls="--", c="k", lw=0.8, label="chance")
    ax2.set_xscale("log")
    ax2.set_xticks(ms, [str(m) for m in ms])
    ax2.set_xlabel("number of auxiliary logits m")
    ax2.set_ylabel("held-out digit accuracy (%)")
    ax2.set_ylim(0, 105)
    ax2.set_title("students never see a digit or a digit logit")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """A figure as PNG bytes (for a file or an inline ``data:`` image); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig: Any, path: str | Path) -> None:
    """Write a figure as PNG atomically and close it."""
    atomic_write_bytes(path, png_bytes(fig))
