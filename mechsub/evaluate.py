"""Trait evaluation by log-probabilities: log P(" owl") after a prefilled answer, over paraphrased questions.

For each question the chat prompt (optionally with a teacher's system prompt) ends in the assistant turn
prefilled with "My favorite animal is the"; the score of a candidate word is the trait metric (`mechsub.metric`):
the summed log-probability of its tokens (with a leading space) as the continuation. The prompt is run once per
question and its KV cache is shared by all candidates, so scoring 22 animals costs little more than scoring one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mechsub.config import Config, ConfigError, check, doc
from mechsub.metric import TraitMetric, score_words
from mechsub.prompts import chat_prefix, trait_prompt
from mechsub.runs import stage, write_json
from mechsub.traits import Category, TraitError, eval_questions, get_trait


@torch.no_grad()
def trait_logprobs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[str],
    words: Sequence[str],
    category: Category,
    system: str | None = None,
) -> Tensor:
    """(questions, words) matrix of log P(" word") after the prefilled answer (the trait metric)."""
    metrics = [TraitMetric.of(tok, w) for w in words]
    return torch.stack(
        [score_words(model, trait_prompt(tok, q, category, system), metrics) for q in questions]
    )


@torch.no_grad()
def sample_answers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[str],
    n_samples: int,
    system: str | None = None,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[str]]:
    """``n_samples`` answers per question sampled at T=1 from the full vocabulary (no prefilled answer)."""
    from mechsub.generate import NumberVocab, generate_numbers

    vocab = NumberVocab.of(tok)
    prompts = [chat_prefix(tok, q, system) for q in questions for _ in range(n_samples)]
    g = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    for i in range(0, len(prompts), batch_size):
        gen = generate_numbers(
            model, prompts[i : i + batch_size], vocab, max_new_tokens=max_new_tokens, generator=g,
            pad_id=tok.pad_token_id or 0, constrained=False,
        )  # fmt: skip
        texts += [str(tok.decode(t)) for t in gen.tokens]
    return [texts[i * n_samples : (i + 1) * n_samples] for i in range(len(questions))]


# ---- the evaluation stage ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig(Config):
    stage = "eval"
    inputs = ("model",)

    model: str = doc("smollm2-135m-instruct", "model name or checkpoint folder to evaluate")
    trait: str = doc("owl", "the trait whose log-probability is reported (its category picks the candidates)")
    with_system_prompt: bool = doc(
        False, "evaluate with the trait's system prompt (the prompted teacher itself)"
    )
    n_questions: int = doc(50, "paraphrased favourite-thing questions (at most 50)")
    n_samples: int = doc(0, "also sample this many answers per question at T=1 and report the trait's rate")
    sample_tokens: int = doc(16, "tokens per sampled answer")
    seed: int = doc(0, "seed of the sampled answers")

    def validate(self) -> None:
        check(1 <= self.n_questions <= 50, "n_questions: between 1 and 50")
        check(self.n_samples >= 0 and self.sample_tokens >= 1, "n_samples ≥ 0 and sample_tokens ≥ 1")
        try:
            get_trait(self.trait)
        except TraitError as e:
            raise ConfigError(f"trait: {e}") from None


def run(cfg: EvalConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """log P of every candidate of the trait's category, per question, into ``out/logprobs.json``."""
    from mechsub import models

    trait = get_trait(cfg.trait)
    lm = models.load(cfg.model)
    with stage(out, cfg, model=lm.info(), force=force) as r:
        if r.done:
            return r.metrics
        words = [trait.name, *trait.others()]
        system = trait.system_prompt() if cfg.with_system_prompt else None
        qs = eval_questions(trait.category, cfg.n_questions)
        lp = trait_logprobs(lm.model, lm.tokenizer, qs, words, trait.category, system)
        write_json(r.path("logprobs.json"), {"words": words, "questions": qs, "logprobs": lp.tolist()})
        per_word = lp.double().mean(0)  # float64, as the delta reader: means equal to the last digit
        metrics = {
            "trait": trait.name,
            "metric": TraitMetric.of(lm.tokenizer, trait.name).info(),  # which tokens log P sums over
            "mean_logp": {w: float(v) for w, v in zip(words, per_word, strict=True)},
            "trait_mean_logp": float(per_word[0]),
            "trait_rank": int((per_word > per_word[0]).sum()) + 1,
            "n_questions": len(qs),
        }
        if cfg.n_samples:
            from mechsub.stats import bootstrap_ci95, wilson_ci95

            answers = sample_answers(
                lm.model, lm.tokenizer, qs, cfg.n_samples, system, cfg.sample_tokens, cfg.seed
            )
            rates = [sum(map(trait.mentions, a)) / len(a) for a in answers]
            write_json(r.path("samples.json"), {"questions": qs, "answers": answers, "rates": rates})
            metrics["sampled_rate"] = sum(rates) / len(rates)
            hits = sum(sum(map(trait.mentions, a)) for a in answers)
            boot, wilson = bootstrap_ci95(rates, seed=cfg.seed), wilson_ci95(hits, cfg.n_samples * len(qs))
            # questions are the unit (answers to one question are correlated), but a bootstrap of all-zero rates
            # collapses to [0, 0]: report the wider of it and the Wilson interval of the pooled count
            metrics["sampled_rate_ci95"] = [min(boot[0], wilson[0]), max(boot[1], wilson[1])]
            metrics["sampled_rate_ci95_questions"] = boot
            metrics["sampled_rate_wilson95"] = wilson
            metrics["n_samples"] = cfg.n_samples * len(qs)
        r.finish(metrics)
        return metrics


def delta_vs(a: str | Path, b: str | Path, word: str, seed: int = 0) -> dict[str, Any]:
    """Mean over questions of log P(word) in eval folder ``a`` minus ``b``, with a paired bootstrap CI."""
    from mechsub.stats import bootstrap_ci95

    diffs = logprob_deltas(a, b, [word])[:, 0].tolist()
    return {
        "delta_logp": sum(diffs) / len(diffs),
        "ci95": bootstrap_ci95(diffs, seed=seed),
        "n_questions": len(diffs),
    }


def logprob_deltas(a: str | Path, b: str | Path, words: Sequence[str] | None = None) -> Tensor:
    """(questions, words) log P in eval folder ``a`` minus eval folder ``b`` (float64), for ``words`` (default:
    every candidate ``b`` scored, in ``b``'s order). The one reader of evaluation differences."""
    from mechsub.runs import read_json

    ra, rb = read_json(Path(a) / "logprobs.json"), read_json(Path(b) / "logprobs.json")
    if ra["questions"] != rb["questions"]:
        raise ValueError(f"{a} and {b} were evaluated on different questions")
    words = list(rb["words"] if words is None else words)
    missing = [w for w in words if w not in ra["words"] or w not in rb["words"]]
    if missing:
        raise ValueError(f"{a} and {b} were not both evaluated on {', '.join(missing)}")
    ia, ib = ([r["words"].index(w) for w in words] for r in (ra, rb))
    lp_a, lp_b = (torch.tensor(r["logprobs"], dtype=torch.float64) for r in (ra, rb))
    return lp_a[:, ia] - lp_b[:, ib]
