"""Interactive views (circuitsvis) and PNG plots of the analysis battery.

circuitsvis inlines its 1.3 MB script per view (``local_src``); ``page`` puts several views on one page with
ONE copy of the script, so the file renders with no network and stays small. Residuals are read through
`mechsub.hooks`; attention patterns, which no Hugging Face module returns, through the TransformerLens bridge.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechsub import hooks, sae
from mechsub.plots import plt, save_figure
from mechsub.runs import atomic_write_text

_SCRIPT_OPEN = '<script crossorigin type="module">'


def page(views: list[tuple[str, Any]], title: str) -> str:
    """One self-contained HTML page from (heading, circuitsvis RenderedHTML) pairs."""
    library = ""
    divs, calls = [], []
    for k, (heading, view) in enumerate(views):
        # circuitsvis names each view's div with a random id: number them instead, so the same views give the
        # same bytes
        src = re.sub(r"circuits-vis-[0-9a-f]{8}-[0-9a-f]{4}", f"circuits-vis-{k}", view.local_src)
        div, rest = src.split(_SCRIPT_OPEN, 1)
        body = rest.rsplit("</script>", 1)[0]
        cut = body.rindex("CircuitsVis.render(")
        library = library or body[:cut]
        divs.append(f"<h3>{html.escape(heading)}</h3>\n{div.strip().replace('/>', '></div>', 1)}")
        calls.append(body[cut:])
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif'><h2>{html.escape(title)}</h2>\n" + "\n".join(divs)
        + f"\n{_SCRIPT_OPEN}\n{library}\n" + "\n".join(calls) + "\n</script></body></html>\n"
    )  # fmt: skip


def _tokens(tok: Any, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def write_views(
    base: Any,
    student: Any,
    teacher: Any,
    s_batch: Any,
    t_batch: Any,
    v_s: torch.Tensor,
    layers: list[int],
    path: Path,
    features: tuple[Any, list[int]] | None = None,
) -> None:
    """Attention patterns (teacher vs student, first analysed layer and a middle one) and per-token projections
    of (student − base) and (teacher − base) residuals on v_student, on the first number sequence; given
    ``features`` = (sae, feature ids), the features' activation per token in base, teacher and student
    (one view each, a button per feature)."""
    from circuitsvis.attention import attention_patterns
    from circuitsvis.tokens import colored_tokens, colored_tokens_multi

    tok = base.tokenizer
    s_ids, t_ids = s_batch.ids[0], t_batch.ids[0]
    n_comp = len(s_batch.positions[0])
    views: list[tuple[str, Any]] = []
    mid = layers[len(layers) // 2]
    att_layers = sorted({layers[0], mid})
    hook = hooks.resid_post(mid)
    sae_hook = sae.sae_hook(features[0]) if features else hook
    resid = list(dict.fromkeys([hook, sae_hook]))
    patterns = [f"blocks.{L}.attn.hook_pattern" for L in att_layers]

    def run(lm: Any, ids: list[int], with_patterns: bool = True) -> dict[str, torch.Tensor]:
        """Every activation the views need, (pos, d_model) residuals and (heads, pos, pos) patterns."""
        out = {h: a[0] for h, a in hooks.read(lm, torch.tensor([ids]), resid).items()}
        if with_patterns:
            with torch.no_grad():
                _, cache = lm.tl().run_with_cache(torch.tensor([ids]), names_filter=lambda n: n in patterns)
            out |= {h: cache[h][0] for h in patterns}
        return out

    acts = {"teacher": run(teacher, t_ids), "student": run(student, s_ids)}
    for L in att_layers:
        name = f"blocks.{L}.attn.hook_pattern"
        for label, key, ids in (
            ("teacher (with its prompt)", "teacher", t_ids),
            ("student", "student", s_ids),
        ):
            # the completion and the few tokens before it: the number sequence the views are about
            keep = slice(len(ids) - n_comp - 8, len(ids))
            views.append((f"layer {L} attention, {label}", attention_patterns(
                _tokens(tok, ids[keep]), acts[key][name][:, keep, keep])))  # fmt: skip
    i = layers.index(mid)
    u = v_s[i] / v_s[i].norm().clamp(min=1e-12)
    acts["base"] = run(base, s_ids, with_patterns=False)
    rb, rs, rt = acts["base"][hook], acts["student"][hook], acts["teacher"][hook]
    comp = s_ids[-n_comp:]
    ds = ((rs - rb) @ u)[-n_comp:]
    dt = (rt[-n_comp:] - rb[-n_comp:]) @ u
    views.append(
        (f"layer {mid}: (student − base) · v_student per token", colored_tokens(_tokens(tok, comp), ds))
    )
    views.append(
        (f"layer {mid}: (teacher − base) · v_student per token", colored_tokens(_tokens(tok, comp), dt))
    )
    if features:
        the_sae, ids = features
        labels = [f"feature {f}" for f in ids]
        for label, key in (
            ("base", "base"),
            ("teacher (with its prompt)", "teacher"),
            ("student", "student"),
        ):
            with torch.no_grad():
                f_acts = the_sae.encode(acts[key][sae_hook][-n_comp:])[:, ids]
            views.append((f"layer {sae.sae_layer(the_sae)} SAE features per token, {label}",
                          colored_tokens_multi(_tokens(tok, comp), f_acts, labels)))  # fmt: skip
    atomic_write_text(path, page(views, "teacher vs student on a number sequence"))


def _word(r: dict[str, Any]) -> str:
    """The scored word as the axis label names it: its tokens when there are several (all are summed)."""
    m = r.get("metric")
    if not m:
        return str(r["trait"])
    toks = m["tokens"]
    return f'"{toks[0]}"' if len(toks) == 1 else f"{r['trait']} = " + " + ".join(f'"{t}"' for t in toks)


def write_analysis_plots(r: dict[str, Any], out: Path) -> None:
    """steering.png, patching.png and (with a trajectory) trajectory.png."""
    layers = r["layers"]
    st = r["steering"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    a1.plot(layers, st["cos_teacher_student"], "o-", label="cos(v_teacher, v_student)")
    if "cos_teacher_specific" in st:
        a1.plot(layers, st["cos_teacher_specific"], "s-", label="cos(v_teacher, specific part)")
        a1.plot(layers, st["cos_teacher_generic"], "^-", label="cos(v_teacher, generic part)")
    a1.axhline(0, color="gray", lw=0.8)
    a1.set_xlabel("layer")
    a1.set_title("steering vectors on number positions")
    a1.legend(fontsize=8)
    a2.plot(layers, st["sufficiency"], "o-", label="base + v_student")
    a2.plot(layers, st["sufficiency_teacher_vector"], "d-", label="base + v_teacher")
    if "sufficiency_specific" in st:
        a2.plot(layers, st["sufficiency_specific"], "s-", label="base + specific part")
    a2.plot(layers, st["necessity"], "x-", label="student, its change along v_student projected out")
    a2.axhline(st["student_delta_logp"], color="black", ls="--", lw=0.8, label="student − base")
    a2.axhline(0, color="gray", lw=0.8)
    a2.set_xlabel("layer")
    a2.set_ylabel(f"Δ log P({_word(r)})")
    a2.set_title("sufficiency and necessity")
    a2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "steering.png")

    p = r["patching"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    if p.get("fraction_by_layer"):
        axes[0].plot(layers, p["fraction_by_layer"], "o-", label="exact patch (positions ≥ 1)")
        if p.get("fraction_by_layer_position0"):
            axes[0].plot(
                layers, p["fraction_by_layer_position0"], "^:", label="exact patch (position 0 alone)"
            )
        if p.get("base_into_student_fraction_removed"):
            axes[0].plot(layers, p["base_into_student_fraction_removed"], "s:",
                         label="base → student, fraction of the shift removed")  # fmt: skip
        if p.get("attribution_fraction_by_layer"):
            axes[0].plot(layers, p["attribution_fraction_by_layer"], "x--", label="attribution estimate")
        axes[0].axhline(1, color="gray", lw=0.8)
        axes[0].set_title(f"student → base, fraction of the gap {p['gap']:+.3f} recovered")
        axes[0].legend(fontsize=8)
        axes[0].set_xlabel("layer")
    grid = p.get("fraction_by_layer_position")
    if grid:
        g = np.asarray(grid)
        lim = float(np.nanmax(np.abs(g))) if g.size and not math.isnan(float(np.nanmax(np.abs(g)))) else 1.0
        im = axes[1].imshow(g, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[1].set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        axes[1].set_xticks(range(len(p["positions"])), [str(x) for x in p["positions"]])
        axes[1].set_xlabel("prompt position (from the end)")
        axes[1].set_ylabel("layer")
        axes[1].set_title("fraction recovered, one position patched")
        fig.colorbar(im, ax=axes[1])
    fig.tight_layout()
    save_figure(fig, out / "patching.png")

    if "feature_patching" in r:
        fp = r["feature_patching"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
        for ax, key, title in ((axes[0], "patch_fraction", "patch base + student's change in top-k features"),
                               (axes[1], "ablate_fraction", "ablate top-k features' change from the student")):  # fmt: skip
            for name in fp:
                if isinstance(fp[name], dict) and key in fp[name] and name not in ("all", "all_position0"):
                    ax.plot(fp["ks"], fp[name][key], "o-", label=name)
            ax.axhline(
                fp["all"][key][0], color="black", ls="--", lw=0.8, label=f"all {fp['n_active']} active"
            )
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("k features")
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7)
        axes[0].set_ylabel(f"fraction of the gap {fp['gap']:+.3f} (layer {fp['layer']})")
        fig.tight_layout()
        save_figure(fig, out / "feature_patching.png")

    if "trajectory" in r:
        t = r["trajectory"]
        feats = "feature_activation" in t
        fig, axes = plt.subplots(1, 2 if feats else 1, figsize=(10 if feats else 5, 3.5), squeeze=False)
        ax = axes[0, 0]
        ax.plot(t["steps"], t["delta_logp"], "o-")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"Δ log P({_word(r)}) vs base")
        if feats:
            a = np.asarray(t["feature_activation"])
            for j, f in enumerate(t["features"]):
                axes[0, 1].plot(
                    t["steps"], a[:, j] - a[0, j], "o-", label=f"feature {f} (base {a[0, j]:.2f})"
                )
            axes[0, 1].axhline(0, color="gray", lw=0.8)
            axes[0, 1].set_xlabel("training step")
            axes[0, 1].set_ylabel("mean activation on numbers − base's")
            axes[0, 1].set_title("top features (student − controls)", fontsize=10)
            axes[0, 1].legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out / "trajectory.png")


def is_offline(html_text: str) -> bool:
    """No external script, stylesheet or image reference (a page that renders with no network)."""
    return (
        re.search(r"""(src|href)\s*=\s*["']https?://""", html_text) is None and "unpkg.com" not in html_text
    )
