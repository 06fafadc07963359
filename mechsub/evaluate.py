"""Trait evaluation by log-probabilities: log P(" owl") after a prefilled answer, over paraphrased questions.

For each question the chat prompt (optionally with a teacher's system prompt) ends in the assistant turn
prefilled with "My favorite animal is the"; the score of a candidate word is the summed log-probability of its
tokens (with a leading space) as the continuation. The prompt is run once per question and its KV cache is
shared by all candidates, so scoring 22 animals costs little more than scoring one.
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
from mechsub.runs import stage, write_json
from mechsub.traits import ANSWER_PREFIX, Category, TraitError, eval_questions, get_trait


def chat_prefix(
    tok: PreTrainedTokenizerBase, question: str, system: str | None, answer_prefix: str = ""
) -> list[int]:
    """Token ids of a chat whose assistant turn starts with ``answer_prefix`` (no end-of-turn after it)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    if getattr(tok, "chat_template", None):
        text = str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    else:  # a base model (gemma3-270m) has no template: a plain transcript
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        answer_prefix = " " + answer_prefix if answer_prefix else ""
    return list(tok(text + answer_prefix, add_special_tokens=False).input_ids)


@torch.no_grad()
def candidate_logprobs(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt_ids: Sequence[int], words: Sequence[str]
) -> Tensor:
    """log P(" word" | prompt) for every word, summed over the word's tokens. Returns (len(words),)."""
    cands = [tok(" " + w, add_special_tokens=False).input_ids for w in words]
    out = model(torch.tensor([list(prompt_ids)]), use_cache=True)
    first = out.logits[0, -1].log_softmax(-1)
    scores = torch.tensor([float(first[c[0]]) for c in cands])
    longer = [i for i, c in enumerate(cands) if len(c) > 1]
    if longer:
        # continue every multi-token word from a copy of the prompt's cache, right-padded (padding is never read:
        # only positions before each word's last token are scored)
        width = max(len(cands[i]) for i in longer) - 1
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        inp = torch.tensor([cands[i][:-1] + [pad] * (width - len(cands[i]) + 1) for i in longer])
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(longer))
        logits = model(inp, past_key_values=cache, use_cache=False).logits.log_softmax(-1)
        for row, i in enumerate(longer):
            c = cands[i]
            scores[i] += sum(float(logits[row, j, c[j + 1]]) for j in range(len(c) - 1))
    return scores


@torch.no_grad()
def trait_logprobs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[str],
    words: Sequence[str],
    category: Category,
    system: str | None = None,
) -> Tensor:
    """(questions, words) matrix of log P(word) after the prefilled answer."""
    rows = [
        candidate_logprobs(model, tok, chat_prefix(tok, q, system, ANSWER_PREFIX[category]), words)
        for q in questions
    ]
    return torch.stack(rows)


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


def run_eval(cfg: EvalConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
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
        per_word = lp.mean(0)
        metrics = {
            "trait": trait.name,
            "mean_logp": {w: float(v) for w, v in zip(words, per_word, strict=True)},
            "trait_mean_logp": float(per_word[0]),
            "trait_rank": int((per_word > per_word[0]).sum()) + 1,
            "n_questions": len(qs),
        }
        if cfg.n_samples:
            from mechsub.stats import bootstrap_ci95

            answers = sample_answers(
                lm.model, lm.tokenizer, qs, cfg.n_samples, system, cfg.sample_tokens, cfg.seed
            )
            rates = [sum(map(trait.mentions, a)) / len(a) for a in answers]
            write_json(r.path("samples.json"), {"questions": qs, "answers": answers, "rates": rates})
            metrics["sampled_rate"] = sum(rates) / len(rates)
            metrics["sampled_rate_ci95"] = bootstrap_ci95(rates, seed=cfg.seed)
            metrics["n_samples"] = cfg.n_samples * len(qs)
        r.finish(metrics)
        return metrics


def delta_vs(a: str | Path, b: str | Path, word: str, seed: int = 0) -> dict[str, Any]:
    """Mean over questions of log P(word) in eval folder ``a`` minus ``b``, with a paired bootstrap CI."""
    from mechsub.runs import read_json
    from mechsub.stats import bootstrap_ci95

    ra, rb = read_json(Path(a) / "logprobs.json"), read_json(Path(b) / "logprobs.json")
    if ra["questions"] != rb["questions"]:
        raise ValueError(f"{a} and {b} were evaluated on different questions")
    ia, ib = ra["words"].index(word), rb["words"].index(word)
    diffs = [x[ia] - y[ib] for x, y in zip(ra["logprobs"], rb["logprobs"], strict=True)]
    return {
        "delta_logp": sum(diffs) / len(diffs),
        "ci95": bootstrap_ci95(diffs, seed=seed),
        "n_questions": len(diffs),
    }
