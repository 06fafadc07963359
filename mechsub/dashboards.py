"""Feature dashboards: what an SAE latent reads and writes, as one offline HTML page.

Per latent: the number (or corpus) contexts where it is most active, each token shaded by the latent's activation;
its direct effect on the logits (decoder row × unembedding) with the trait candidates' scores; the histogram of
its activations. Position 0 of every context, the attention sink (`hooks.FIRST_POSITION`), is never read, shown or
counted: an SAE is not trained on it, and its outlying residual would top most latents' lists. The page has no
script and no external reference (images are inline PNG), so it opens anywhere with no network.
"""

from __future__ import annotations

import base64
import bisect
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechsub import hooks
from mechsub.hooks import FIRST_POSITION
from mechsub.metric import TraitMetric
from mechsub.plots import plt, png_bytes
from mechsub.runs import atomic_write_text
from mechsub.sae import feature_acts, sae_hook

_SHADE = "255,102,0"  # the activation colour (rgb); alpha is the activation over the latent's largest


# ---- inputs ---------------------------------------------------------------------------------------------
def parse_latents(text: str) -> list[int]:
    """``"12,40,7"`` → ``[12, 40, 7]``, duplicates dropped, order kept."""
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--latents: write comma-separated latent ids, e.g. 12,40,7 (got {text!r})"
        ) from None
    if not ids:
        raise ValueError("--latents: give at least one latent id, e.g. --latents 12,40,7")
    return list(dict.fromkeys(ids))


def sae_folder(folder: str | Path) -> Path:
    """The sae-lens folder (cfg.json + sae_weights.safetensors) at ``folder``: the folder itself or, for a
    `mechsub sae` run folder, its ``sae/``."""
    folder = Path(folder)
    for f in (folder, folder / "sae"):
        if (f / "cfg.json").is_file():
            return f
    if not folder.exists():
        raise FileNotFoundError(
            f"no SAE folder at {folder}: give a `mechsub sae` run folder or an SAE saved by sae-lens"
        )
    raise FileNotFoundError(
        f"{folder} holds no SAE (no cfg.json in it or in {folder / 'sae'}): give a `mechsub sae` run folder or "
        "an SAE saved by sae-lens"
    )


def check_fits(sae: Any, model: str, d_model: int, n_layers: int) -> None:
    """Raise ValueError unless ``sae`` reads a hook a model of this width and depth has."""
    hook = sae_hook(sae)
    if sae.cfg.d_in != d_model:
        raise ValueError(
            f"the SAE reads vectors of d_in = {sae.cfg.d_in}, but {model} has d_model = {d_model}: give the "
            "--model the SAE was trained on"
        )
    try:
        layer = hooks.resid_post_layer(hook)
    except hooks.HookNameError:
        return  # another hook point: `hooks.check` on the loaded model says whether it exists
    if layer >= n_layers:
        raise ValueError(f"the SAE reads {hook}, but {model} has {n_layers} layers (0–{n_layers - 1})")


def check_latents(sae: Any, latents: Sequence[int]) -> None:
    """Raise ValueError for no latents or an id outside the dictionary."""
    d_sae = int(sae.cfg.d_sae)
    if not latents:
        raise ValueError("no latents given: name at least one, e.g. --latents 12,40,7")
    bad = [i for i in latents if not 0 <= i < d_sae]
    if bad:
        raise ValueError(
            f"unknown latent id(s) {', '.join(map(str, bad))}: the SAE has d_sae = {d_sae} latents (0–{d_sae - 1})"
        )


def data_contexts(tok: Any, folder: str | Path, n: int | None = None) -> list[list[int]]:
    """The first ``n`` kept completions of a `mechsub data` folder as a student sees them: the chat prompt
    (no system prompt) followed by the completion's ids."""
    from mechsub.data import load_examples
    from mechsub.prompts import chat_prefix

    return [chat_prefix(tok, e.prompt, None) + list(e.completion_ids) for e in load_examples(folder)[:n]]


def text_contexts(tok: Any, path: str | Path) -> list[list[int]]:
    """One context per line of a JSONL file (a JSON string, or an object with a ``text`` field), tokenized
    with the tokenizer's BOS first when it has one, so that position 0 is the sink as in every other context."""
    out = []
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no contexts file at {path}: give a JSONL file with one text per line")
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f'{path} line {i}: not JSON ({e}); write one JSON string or {{"text": ...}} per line'
            ) from None
        text = row.get("text") if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise ValueError(f'{path} line {i}: write a JSON string or an object with a "text" string')
        ids = list(tok(text, add_special_tokens=False).input_ids)
        if tok.bos_token_id is not None and ids[:1] != [tok.bos_token_id]:
            ids.insert(0, int(tok.bos_token_id))
        out.append(ids)
    return out


def corpus_contexts(folder: str | Path, n: int) -> list[list[int]]:
    """The first ``n`` windows of a `mechsub corpus` folder."""
    from mechsub import corpus

    ds = corpus.load(folder)
    return [list(w) for w in ds[: min(n, len(ds))]["input_ids"]]


# ---- what the page shows --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """Activations of some latents at every position ≥ FIRST_POSITION of every context, one row per token,
    rows in context order."""

    latents: tuple[int, ...]
    acts: Float[Tensor, "tokens latents"]
    starts: tuple[int, ...]  # the row of each context's position FIRST_POSITION

    def column(self, latent: int) -> Float[Tensor, " tokens"]:
        return self.acts[:, self.latents.index(latent)]

    def where(self, row: int) -> tuple[int, int]:
        """(context, position) of a row."""
        c = bisect.bisect_right(self.starts, row) - 1
        return c, row - self.starts[c] + FIRST_POSITION

    def at(self, latent: int, context: int, positions: range) -> list[float]:
        """The latent's activation at ``positions`` (all ≥ FIRST_POSITION) of one context."""
        col = self.column(latent)
        return [float(col[self.starts[context] + p - FIRST_POSITION]) for p in positions]


def check_contexts(contexts: Sequence[Sequence[int]]) -> None:
    if not contexts:
        raise ValueError(
            "no contexts: give number completions (--data), texts (--contexts) or corpus windows (--corpus)"
        )
    for i, c in enumerate(contexts):
        if len(c) <= FIRST_POSITION:
            raise ValueError(
                f"context {i} has {len(c)} token(s): a context needs at least {FIRST_POSITION + 1} (position 0, "
                "the attention sink, is not read)"
            )


def encode_contexts(
    lm: Any, sae: Any, contexts: Sequence[Sequence[int]], latents: Sequence[int], batch_size: int = 16
) -> Encoded:
    """The SAE's ``latents`` at every position ≥ FIRST_POSITION of every context (right-padded batches)."""
    from mechsub.capture import Batch

    check_contexts(contexts)
    batch = Batch([list(c) for c in contexts], [list(range(FIRST_POSITION, len(c))) for c in contexts])
    acts = feature_acts(lm, sae, sae_hook(sae), batch, batch_size, features=latents).float()
    starts, n = [], 0
    for ps in batch.positions:
        starts.append(n)
        n += len(ps)
    return Encoded(tuple(latents), acts, tuple(starts))


def top_activations(enc: Encoded, latent: int, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest activations of ``latent`` as (context, position, activation), largest first; only
    tokens where it fires (> 0); ties in context order."""
    col = enc.column(latent)
    order = torch.sort(col, descending=True, stable=True).indices[:k].tolist()
    return [(*enc.where(r), float(col[r])) for r in order if col[r] > 0]


@torch.no_grad()
def logit_effects(lm: Any, sae: Any, latents: Sequence[int]) -> Float[Tensor, "latents vocab"]:
    """Each latent's direct path to the logits: its decoder row times the unembedding, ``W_dec[i] @ W_U``. The
    final norm is left out (its gain is not folded in): the ranking says which tokens the direction itself
    writes toward, not what the model predicts at any position."""
    w_u = hooks.module_of(lm).get_output_embeddings().weight.detach().float().cpu()  # type: ignore[operator]
    return sae.W_dec.detach()[list(latents)].float().cpu() @ w_u.T  # type: ignore[no-any-return]


def word_scores(
    tok: Any, effect: Float[Tensor, " vocab"], words: Sequence[str]
) -> list[tuple[TraitMetric, float]]:
    """Each word's logit effect: the SUM over the tokens of " word" (`TraitMetric`'s tokens, as the trait metric
    and `diffing.candidate_scores` sum a word's tokens); a one-token word scores its token's effect."""
    out = []
    for w in words:
        m = TraitMetric.of(tok, w)
        out.append((m, float(sum(effect[i] for i in m.ids))))
    return out


def histogram_png(values: Float[Tensor, " tokens"], latent: int) -> bytes:
    """The latent's non-zero activations as a histogram (log count past 100 in a bin), titled with how often
    it fires."""
    on = values[values > 0].numpy()
    fig, ax = plt.subplots(figsize=(4.4, 2.3))
    if len(on):
        counts, _, _ = ax.hist(on, bins=40, color=f"#{''.join(f'{int(c):02x}' for c in _SHADE.split(','))}")
        if np.max(counts) > 100:  # a heavy tail stays visible beside a tall first bin
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "never fires", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("activation where it fires", fontsize=8)
    ax.set_ylabel("tokens", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(
        f"latent {latent}: fires on {len(on) / len(values):.2%} of {len(values):,} tokens", fontsize=9
    )
    fig.tight_layout()
    return png_bytes(fig, dpi=90)


# ---- the page -------------------------------------------------------------------------------------------
def visible(s: str) -> str:
    """A token's text with its whitespace shown (· space, ↵ newline, ⇥ tab), escaped for HTML."""
    s = s.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return html.escape(s) if s else "∅"


def _tokens_html(tok: Any, ids: Sequence[int], acts: Sequence[float], peak: float, mark: int) -> str:
    spans = []
    for j, (i, a) in enumerate(zip(ids, acts, strict=True)):
        alpha = max(0.0, min(1.0, a / peak)) if peak > 0 else 0.0
        cls = "t peak" if j == mark else "t"
        spans.append(f'<span class="{cls}" style="background:rgba({_SHADE},{alpha:.2f})" '
                     f'title="id {i} · {a:.3g}">{visible(tok.decode([i]))}</span>')  # fmt: skip
    return "".join(spans)


def _logit_table(tok: Any, effect: Tensor, order: list[int], cls: str) -> str:
    rows = "".join(f'<tr data-token-id="{i}"><td class="tok">{visible(tok.decode([i]))}</td><td>{i}</td>'
                   f'<td class="num">{float(effect[i]):+.3f}</td></tr>' for i in order)  # fmt: skip
    return f'<table class="{cls}"><tr><th>token</th><th>id</th><th>effect</th></tr>{rows}</table>'


def _words_table(scores: list[tuple[TraitMetric, float]]) -> str:
    ranked = sorted(scores, key=lambda s: -s[1])
    rows = "".join(
        f'<tr data-word="{html.escape(m.word)}"><td>{k}</td><td>{html.escape(m.word)}</td>'
        f'<td class="tok">{" | ".join(visible(t) for t in m.tokens)}</td><td class="num">{s:+.3f}</td></tr>'
        for k, (m, s) in enumerate(ranked, 1)
    )
    return f'<table class="words"><tr><th>#</th><th>word</th><th>tokens</th><th>effect (sum)</th></tr>{rows}</table>'


_CSS = """
body{font-family:sans-serif;margin:1.2em;color:#222;max-width:1200px}
h1{font-size:1.4em} h2{font-size:1.2em;border-top:2px solid #ccc;padding-top:.6em} h3{font-size:1em;margin:.4em 0}
.how{background:#f4f4f4;padding:.5em 1em;font-size:.9em}
table{border-collapse:collapse;font-size:.85em;margin-bottom:.6em} td,th{padding:1px 6px;text-align:left}
td.num{text-align:right;font-family:monospace} td.tok,.t{font-family:monospace;white-space:pre}
.t{padding:0 1px;border-radius:2px} .peak{outline:2px solid #b00000}
.row{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
table.ctx td{border-bottom:1px solid #eee}
"""


def feature_dashboard(
    lm: Any,
    sae: Any,
    latents: Sequence[int],
    contexts: Sequence[Sequence[int]],
    *,
    trait_words: Sequence[str] | None = None,
    top_k: int = 10,
    context_window: int = 12,
    n_logits: int = 10,
    batch_size: int = 16,
    source: str = "",
    title: str = "SAE feature dashboard",
) -> str:
    """One self-contained HTML page on ``latents`` of ``sae`` read from ``lm`` on ``contexts`` (token-id lists).

    Per latent: the ``top_k`` (context, position) maxima over positions ≥ FIRST_POSITION, each with the
    ``context_window`` tokens before it (never position 0), tokens shaded by activation; the ``n_logits`` most
    raised and most lowered tokens of ``W_dec[i] @ W_U`` (`logit_effects`: no final norm), and every word of
    ``trait_words`` (default the 22 candidate animals) scored as the SUM of the effect over the tokens of
    " word" (`word_scores`); the histogram of its non-zero activations and how often it fires. ``source`` says
    where the contexts come from, in the header. Raises ValueError on a latent outside the SAE, an SAE that
    does not fit the model, or no contexts.
    """
    from mechsub.traits import ANIMALS

    latents = list(dict.fromkeys(latents))
    check_latents(sae, latents)
    model = hooks.module_of(lm)
    name = str(getattr(lm, "name", type(model).__name__))
    config: Any = model.config
    check_fits(sae, name, int(config.hidden_size), int(config.num_hidden_layers))
    hook = sae_hook(sae)
    try:
        hooks.check(model, [hook])
    except hooks.HookNameError as e:
        raise ValueError(f"the SAE reads a hook {name} does not have: {e}") from None
    if top_k < 1 or context_window < 0 or n_logits < 1:
        raise ValueError(
            f"top_k and n_logits must be ≥ 1 and context_window ≥ 0, got {top_k}, {n_logits}, {context_window}"
        )
    tok = lm.tokenizer
    words = list(trait_words) if trait_words is not None else list(ANIMALS)
    enc = encode_contexts(lm, sae, contexts, latents, batch_size)
    effects = logit_effects(lm, sae, latents)
    n_tokens = enc.acts.shape[0]
    try:
        where = f"layer {hooks.resid_post_layer(hook)} residual stream ({hook})"
    except hooks.HookNameError:
        where = hook

    index, sections = [], []
    for j, i in enumerate(latents):
        col = enc.column(i)
        peak = float(col.max())
        fires = float((col > 0).float().mean())
        top = top_activations(enc, i, top_k)
        rows = []
        for c, p, a in top:
            span = range(max(FIRST_POSITION, p - context_window), p + 1)
            ids = [contexts[c][q] for q in span]
            toks = _tokens_html(tok, ids, enc.at(i, c, span), peak, len(ids) - 1)
            rows.append(f'<tr class="top" data-context="{c}" data-position="{p}" data-activation="{a:.6g}">'
                        f'<td class="num">{a:.3f}</td><td>#{c} @{p}</td><td>{toks}</td></tr>')  # fmt: skip
        ctx_html = (f'<table class="ctx"><tr><th>activation</th><th>context @position</th><th>tokens up to the '
                    f'maximum (outlined)</th></tr>{"".join(rows)}</table>') if rows else "<p>It fires on none of the tokens.</p>"  # fmt: skip
        eff = effects[j]
        order = torch.argsort(eff, descending=True, stable=True).tolist()
        scores = word_scores(tok, eff, words)
        best = max(scores, key=lambda s: s[1])[0].word if scores else "–"
        png = base64.b64encode(histogram_png(col, i)).decode()
        index.append(f'<tr><td><a href="#latent-{i}">{i}</a></td><td class="num">{fires:.2%}</td>'
                     f'<td class="num">{peak:.3f}</td><td>{html.escape(best)}</td></tr>')  # fmt: skip
        sections.append(f"""<section class="latent" id="latent-{i}" data-latent="{i}">
<h2>Latent {i}</h2>
<p>fires (&gt; 0) on {fires:.2%} of {n_tokens:,} tokens; largest activation {peak:.3f}</p>
<div class="row"><div><h3>Top-activating contexts</h3>{ctx_html}</div>
<div><h3>Activation histogram</h3><img alt="histogram of latent {i}'s activations" src="data:image/png;base64,{png}"></div></div>
<div class="row"><div><h3>Logit effect: most raised</h3>{_logit_table(tok, eff, order[:n_logits], "logit-top")}</div>
<div><h3>Most lowered</h3>{_logit_table(tok, eff, order[::-1][:n_logits], "logit-bottom")}</div>
<div><h3>Trait words</h3>{_words_table(scores)}</div></div>
</section>""")  # fmt: skip

    n_ctx = len(contexts)
    about = f"; contexts from {html.escape(source)}" if source else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>model <b>{html.escape(name)}</b> · SAE on the {html.escape(where)}, {html.escape(sae.cfg.architecture())},
d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae} · {n_ctx:,} contexts, {n_tokens:,} tokens read (position 0 of each left out){about}</p>
<div class="how"><b>How to read this.</b> Each section is one latent. <i>Top-activating contexts</i>: the {top_k}
tokens where it is most active, over every context and every position but 0 (the attention sink, which the SAE
never reads), each with up to {context_window} tokens before it; a token's shade is its activation over the
latent's largest (hover for the value), the maximum is outlined; · is a space, ↵ a newline. <i>Logit effect</i>:
the latent's decoder direction times the unembedding (W_dec[i] · W_U, the direct path, final norm left out): the
tokens it writes toward and away from. <i>Trait words</i>: the same effect summed over the tokens of " word"
(a one-token word is that token; a longer one the sum of its tokens), ranked. <i>Histogram</i>: its non-zero
activations over all tokens read, with the share of tokens where it fires.</div>
<table><tr><th>latent</th><th>fires</th><th>max</th><th>top trait word</th></tr>{"".join(index)}</table>
{"".join(sections)}
</body></html>
"""  # fmt: skip


def write_dashboard(path: str | Path, page: str) -> None:
    """Write a dashboard page atomically."""
    atomic_write_text(path, page)
