"""Smoke test of the GPU path: skipped where torch sees no CUDA device. The tiny model on cuda in bf16 generates
number data, is scored, read by hook name and trains a step; everything else is tested on the CPU."""

import pytest
import torch

from mechsub import backends, hooks, models, training
from mechsub.generate import NumberVocab, generate_numbers
from mechsub.prompts import chat_prefix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_tiny_on_cuda_generates_reads_and_trains(tmp_path):
    lm = models.load("tiny", device="auto", dtype="auto")
    assert lm.device.type == "cuda"
    tok = lm.tokenizer
    vocab = NumberVocab.of(tok)
    prompts = [chat_prefix(tok, f"Continue: {i}, {i + 1}", None) for i in range(4)]
    gen = generate_numbers(lm.model, prompts, vocab, max_new_tokens=12, generator=torch.Generator().manual_seed(0),
                           pad_id=2, top_k=2)  # fmt: skip
    assert all(lp.device.type == "cpu" and lp.dtype == torch.float32 for lp in gen.allowed_logprobs)
    scored = backends.score_numbers(lm.model, prompts, gen.tokens, vocab, max_new_tokens=12, pad_id=2)
    assert [len(a) for a in scored.allowed_logprobs] == [len(a) for a in gen.allowed_logprobs]
    acts = hooks.read(lm, torch.tensor([prompts[0]]), [hooks.resid_post(1)])
    assert acts[hooks.resid_post(1)].device.type == "cuda"
    items = [
        training.Item(p, t, lp) for p, t, lp in zip(prompts, gen.tokens, gen.allowed_logprobs, strict=True)
    ]
    spec = training.TrainSpec(model="tiny", objective="distill", lora_r=4, lora_alpha=8, lr=1e-3,
                              checkpoint_every=0, seed=0)  # fmt: skip
    m = training.fit(lm, items, [[0, 1, 2, 3]], spec, tmp_path, "gpu")
    assert m["steps"] == 1 and m["first_loss"] == m["first_loss"]  # finite, not NaN
    assert models.load(m["final_checkpoint"]).base == "tiny"
