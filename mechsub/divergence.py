"""Divergence tokens (Schrodi et al.): the positions of a teacher's number data where a teacher with another
trait, given the same prefix, would pick a different token.

For every kept completion of a data folder, each counterfactual teacher reads the same prompt and the factual
completion, and its greedy choice among the allowed number tokens is compared with the factual token at every
loss position (the completion, then the end of turn), among the tokens the grammar allowed there. A position is divergent when at least one counterfactual
teacher disagrees. The stage writes two position masks that `mechsub student --set mask=...` takes —
``divergent.json`` (train on divergence tokens only) and ``non_divergent.json`` (mask them out) — and the share
of divergent tokens overall, per counterfactual teacher and per position.

A counterfactual is a trait name (the data's teacher model with that trait's system prompt: a prompted teacher)
or a checkpoint folder (a fine-tuned teacher of another trait, read without a system prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mechsub import models
from mechsub.config import Config, ConfigError, check, doc
from mechsub.data import DataConfig, load_examples
from mechsub.filter import write_mask
from mechsub.generate import NumberVocab
from mechsub.prompts import chat_prefix
from mechsub.runs import read_json, stage
from mechsub.training import Item, completion_hidden
from mechsub.traits import TraitError, get_trait


@dataclass(frozen=True)
class DivergenceConfig(Config):
    stage = "divergence"
    inputs = ("data", "counterfactuals")

    data: str = doc("", "a finished data folder (the factual teacher's numbers)")
    counterfactuals: tuple[str, ...] = doc(
        (), "≥ 1 counterfactual teachers: trait names (prompted) or checkpoint folders (fine-tuned)"
    )
    batch_size: int = doc(16, "sequences per forward pass")

    def validate(self) -> None:
        check(bool(self.data), "data: give the folder of a finished `mechsub data` run")
        check(bool(self.counterfactuals), "counterfactuals: give trait names or teacher checkpoint folders")
        for c in self.counterfactuals:
            if not Path(c).exists():
                try:
                    get_trait(c)
                except TraitError as e:
                    raise ConfigError(
                        f"counterfactuals: {c!r} is neither a folder nor a trait ({e})"
                    ) from None
        check(self.batch_size >= 1, "batch_size must be ≥ 1")


def _teacher(spec: str, data_model: str) -> tuple[str, str | None]:
    """(model to load, system prompt) of a counterfactual."""
    if Path(spec).exists():
        return spec, None
    return data_model, get_trait(spec).system_prompt()


@torch.no_grad()
def greedy_choices(lm: Any, system: str | None, examples: list[Any], batch_size: int = 16) -> list[list[int]]:
    """Per example, the token ``lm`` ranks first at every loss position of the given completion, among the
    tokens the data's decoding allowed there (the grammar: the finite entries of the stored log-probs)."""
    tok = lm.tokenizer
    allowed = NumberVocab.of(tok).ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    head = lm.model.get_output_embeddings().weight
    out: list[list[int]] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        items = [
            Item(chat_prefix(tok, e.prompt, system), e.completion_ids, e.allowed_logprobs) for e in chunk
        ]
        h, _ = completion_hidden(lm.model.model, items, pad, int(allowed[-1]))
        legal = torch.isfinite(torch.cat([e.allowed_logprobs for e in chunk]))
        picks = allowed[(h @ head[allowed].T).masked_fill(~legal, float("-inf")).argmax(-1)].tolist()
        for it in items:
            n = it.n_positions
            out.append(picks[:n])
            picks = picks[n:]
    return out


def run(cfg: DivergenceConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Compare every counterfactual teacher's greedy choice with the factual tokens; write the masks."""
    t0 = time.perf_counter()
    dcfg = DataConfig.from_dict(read_json(Path(cfg.data) / "config.json")["config"])
    examples = load_examples(cfg.data)
    with stage(out, cfg, force=force) as r:
        if r.done:
            return r.metrics
        out = Path(out)
        vocab = NumberVocab.of(models.load(dcfg.model).tokenizer).ids.tolist()
        factual = [[*e.completion_ids, vocab[-1]][: len(e.allowed_logprobs)] for e in examples]
        differs: dict[str, list[list[bool]]] = {}
        for spec in tqdm(cfg.counterfactuals, desc="counterfactual teachers"):
            model, system = _teacher(spec, dcfg.model)
            lm = models.load(model)
            if NumberVocab.of(lm.tokenizer).ids.tolist() != vocab:
                raise ValueError(f"counterfactual {spec!r} has another tokenizer than the data's teacher "
                                 f"({dcfg.model}): divergence needs teachers of one family")  # fmt: skip
            picks = greedy_choices(lm, system, examples, cfg.batch_size)
            differs[spec] = [
                [p != f for p, f in zip(ps, fs, strict=True)] for ps, fs in zip(picks, factual, strict=True)
            ]
        div = [[any(differs[s][i][j] for s in differs) for j in range(len(f))] for i, f in enumerate(factual)]
        # the factual teacher's own greedy choice, from the stored log-probs: equal to the data for greedy data
        own = [e.allowed_logprobs.argmax(-1).tolist() for e in examples]
        agree = [
            vocab[o] == f for os_, fs in zip(own, factual, strict=True) for o, f in zip(os_, fs, strict=True)
        ]
        n = sum(len(f) for f in factual)
        width = max((len(f) for f in factual), default=0)
        by_pos = [
            sum(d[j] for d in div if j < len(d)) / max(1, sum(j < len(d) for d in div)) for j in range(width)
        ]
        for name, keep in (("divergent", True), ("non_divergent", False)):
            write_mask(out / f"{name}.json", [[int(v == keep) for v in d] for d in div], cfg.data,
                       counterfactuals=list(cfg.counterfactuals), keep=name)  # fmt: skip
        metrics = {
            "n_examples": len(examples),
            "n_positions": n,
            "divergent_share": sum(map(sum, div)) / max(1, n),
            "sequences_with_divergence": sum(any(d) for d in div) / max(1, len(div)),
            "share_by_counterfactual": {s: sum(map(sum, d)) / max(1, n) for s, d in differs.items()},
            "share_by_position": by_pos,
            "factual_greedy_agreement": sum(agree) / max(1, len(agree)),
            "masks": {
                "divergent": str(out / "divergent.json"),
                "non_divergent": str(out / "non_divergent.json"),
            },
            "seconds_this_session": round(time.perf_counter() - t0, 1),
        }
        r.finish(metrics)
        return metrics
