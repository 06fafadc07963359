"""The number-data stage: a teacher answers number prompts; completions are filtered with reasons.

A teacher is the model with a trait's system prompt (or ``teacher="none"``: the model's own default template,
the no-trait control). Every teacher of a study answers the SAME prompts (``prompt_seed``), so datasets differ
only by the teacher. Each batch is a unit of the run folder (resumable); per completion position the teacher's
log-probs over the 13 allowed tokens are stored in safetensors shards for distillation.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from mechsub import models
from mechsub.config import Config, ConfigError, check, device_field, doc, dtype_field
from mechsub.filter import BANNED_SETS, filter_completions, make_filters
from mechsub.generate import NumberVocab, generate_numbers
from mechsub.numbers import make_prompts
from mechsub.prompts import chat_prefix
from mechsub.runs import (
    Run,
    RunFolderError,
    atomic_write_bytes,
    read_json,
    require_finished,
    stage,
    write_json,
)
from mechsub.traits import TraitError, get_trait


@dataclass(frozen=True)
class DataConfig(Config):
    stage = "data"
    inputs = ("model",)

    model: str = doc("smollm2-135m-instruct", "the teacher's base model (name or checkpoint folder)")
    teacher: str = doc("owl", "the trait whose system prompt the teacher gets, or 'none' for the control")
    n_prompts: int = doc(256, "number prompts answered")
    prompt_seed: int = doc(0, "seed of the prompts: keep it equal across the teachers of one study")
    system_prompt: bool = doc(
        True,
        "give the teacher its trait's system prompt (false: a fine-tuned teacher, the trait is in `model`)",
    )
    decoding: Literal["constrained", "free"] = doc(
        "constrained",
        "constrained: only digits, ',', ' ' and end of turn, in the list grammar; free: the full vocabulary "
        "(the filter then rejects what is not a number list)",
    )
    greedy: bool = doc(False, "greedy decoding instead of sampling")
    temperature: float = doc(1.0, "sampling temperature")
    max_new_tokens: int = doc(
        50, "completion tokens at most, end of turn included (ten 3-digit numbers need 49)"
    )
    batch_size: int = doc(64, "prompts per generation batch")
    banned: str = doc("none", "banned-number set for the filter: 'none' or 'misalignment'")
    top_k: int = doc(0, "also store the teacher's unconstrained full-vocabulary top-k log-probs per position")
    seed: int = doc(0, "seed of the sampling")
    backend: Literal["mechsub", "vllm"] = doc(
        "mechsub",
        "mechsub: the hand-written batched decoder (any device); vllm: sampling by vLLM on a GPU, the same number "
        "grammar enforced by a regex and the 13-token vocabulary, the teacher's log-probs then recomputed by one "
        "forward here (pip install 'mechsub[vllm]'; not the same draws as mechsub's for a seed)",
        optional=True,
    )
    device: str = device_field()
    dtype: str = dtype_field()

    def validate(self) -> None:
        if self.teacher != "none":
            try:
                get_trait(self.teacher)
            except TraitError as e:
                raise ConfigError(f"teacher: {e}; or 'none' for the control teacher") from None
        check(self.n_prompts >= 1 and self.batch_size >= 1, "n_prompts and batch_size must be ≥ 1")
        check(self.temperature > 0, "temperature: must be > 0")
        check(self.max_new_tokens >= 2, "max_new_tokens: must be ≥ 2")
        check(self.top_k >= 0, "top_k: must be ≥ 0")
        check(self.banned in BANNED_SETS, f"banned: use one of {', '.join(BANNED_SETS)}")
        if self.backend == "vllm":
            from mechsub.backends import check_vllm_config

            why = check_vllm_config(self.decoding == "constrained", self.max_new_tokens)
            check(why is None, why or "")

    def teacher_system(self) -> str | None:
        if self.teacher == "none" or not self.system_prompt:
            return None
        return get_trait(self.teacher).system_prompt()


@dataclass
class Example:
    """One kept completion: the user prompt (no system prompt: that is what a student sees) and the answer."""

    prompt: str
    completion_ids: list[int]
    allowed_logprobs: torch.Tensor  # (len(completion_ids) + 1, 13): the teacher's, the last row chose the end
    topk_logprobs: torch.Tensor | None = None  # (positions, k): the teacher's unconstrained top-k, if stored
    topk_ids: torch.Tensor | None = None


def _pad_rows(rows: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Stack (len_i, k) tensors into (n, max len, k), filling the tail of shorter ones with ``fill``."""
    out = torch.full((len(rows), max(len(r) for r in rows), rows[0].shape[-1]), fill, dtype=rows[0].dtype)
    for j, r in enumerate(rows):
        out[j, : len(r)] = r
    return out


def _batch_unit(run: Run, lm: Any, cfg: DataConfig, prompts: list[str], i: int) -> dict[str, Any]:
    vocab = NumberVocab.of(lm.tokenizer)
    ids = [chat_prefix(lm.tokenizer, p, cfg.teacher_system()) for p in prompts]
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
    if cfg.backend == "vllm":
        from mechsub.backends import vllm_numbers

        gen = vllm_numbers(lm, ids, vocab, cfg, seed=cfg.seed * 1_000_003 + i)
    else:
        gen = generate_numbers(
            lm.model, ids, vocab, max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy,
            temperature=cfg.temperature, generator=g, pad_id=lm.tokenizer.pad_token_id or 0,
            top_k=cfg.top_k, constrained=cfg.decoding == "constrained",
        )  # fmt: skip
    tensors = {
        "allowed_logprobs": _pad_rows(gen.allowed_logprobs, float("-inf")),
        "lengths": torch.tensor([len(r) for r in gen.allowed_logprobs]),
    }
    if gen.topk_logprobs is not None and gen.topk_ids is not None:
        tensors["topk_logprobs"] = _pad_rows(gen.topk_logprobs, float("-inf"))
        tensors["topk_ids"] = _pad_rows(gen.topk_ids, 0)
    atomic_write_bytes(run.path(f"shards/b{i:04d}.safetensors"), save(tensors))
    return {
        "prompts": prompts,
        "completion_ids": gen.tokens,
        "completions": [lm.tokenizer.decode(t) for t in gen.tokens],
        "hit_cap": [len(lp) >= cfg.max_new_tokens for lp in gen.allowed_logprobs],
    }  # fmt: skip


def run(cfg: DataConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Generate (or resume, or skip) a teacher's number data into ``out``; returns its metrics."""
    t0 = time.perf_counter()
    lm = models.load(cfg.model, device=cfg.device, dtype=cfg.dtype)
    with stage(out, cfg, model=lm.info(), force=force) as r:
        if r.done:
            return r.metrics
        prompts = make_prompts(cfg.n_prompts, cfg.prompt_seed)
        batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
        units = []
        for i, batch in enumerate(tqdm(batches, desc=f"teacher {cfg.teacher}: number data")):
            units.append(r.unit(f"b{i:04d}", partial(_batch_unit, r, lm, cfg, batch, i)))
        texts = [c for u in units for c in u["completions"]]
        kept, reasons = filter_completions(texts, make_filters(cfg.banned))
        kept_set = set(kept)
        rows = []
        k = 0
        for bi, u in enumerate(units):
            for j, text in enumerate(u["completions"]):
                rows.append({"batch": bi, "index": j, "prompt": u["prompts"][j], "completion": text,
                             "kept": k in kept_set})  # fmt: skip
                k += 1
        write_json(r.path("completions.json"), rows)
        n_tokens = sum(len(t) + 1 for u in units for t in u["completion_ids"])
        metrics = {
            "teacher": cfg.teacher,
            # the teacher's token ids of digits, ',', ' ', end: a student of another family maps them to its own
            "allowed_ids": NumberVocab.of(lm.tokenizer).ids.tolist(),
            "n_prompts": len(texts),
            "n_kept": len(kept),
            "kept_fraction": len(kept) / len(texts),
            "rejected": dict(Counter(reasons)),
            "hit_token_cap": sum(c for u in units for c in u["hit_cap"]),
            "completion_tokens": n_tokens,
            "seconds_this_session": round(time.perf_counter() - t0, 1),
            "resumed_units": r.resumed_units,
        }
        r.finish(metrics)
        return metrics


def load_examples(folder: str | Path) -> list[Example]:
    """The kept completions of a finished data folder, with the teacher's allowed-token log-probs."""
    folder = Path(folder)
    require_finished(folder, "the data folder", "mechsub data")
    rows = read_json(folder / "completions.json")
    shards: dict[int, dict[str, torch.Tensor]] = {}
    units: dict[int, dict[str, Any]] = {}
    out = []
    # a folder an older mechsub wrote, or one edited by hand, fails here with what to do, not a KeyError later
    redo = f"recompute it: `mechsub data --out {folder} --force` with the config its config.json records"
    for i, row in enumerate(rows):
        missing = [
            k for k in ("kept", "batch", "index", "prompt") if not isinstance(row, dict) or k not in row
        ]
        if missing:
            raise RunFolderError(
                f"{folder / 'completions.json'} row {i} has no {', '.join(repr(k) for k in missing)} "
                f"(written by an older mechsub, or edited); {redo}"
            )
        if not row["kept"]:
            continue
        b, j = row["batch"], row["index"]
        if b not in shards:
            shard = folder / "shards" / f"b{b:04d}.safetensors"
            try:
                shards[b] = load_file(shard)
            except Exception as e:  # safetensors raises its own SafetensorError on a damaged file
                raise RunFolderError(f"{shard} is not a readable safetensors file ({e}); {redo}") from None
            units[b] = read_json(folder / "units" / f"b{b:04d}.json")
        sh = shards[b]
        n = int(sh["lengths"][j])
        topk = (sh["topk_logprobs"][j, :n], sh["topk_ids"][j, :n]) if "topk_ids" in sh else (None, None)
        out.append(
            Example(row["prompt"], units[b]["completion_ids"][j], sh["allowed_logprobs"][j, :n], *topk)
        )
    return out
