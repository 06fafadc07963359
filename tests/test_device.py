"""Placement (device/dtype) and the optional backends, on the CPU: what resolves where, what enters a run's
identity, the vLLM grammar and scorer without vLLM, data-parallel gradients without a second process, nnsight's
read by the same names. The GPU itself: tests/test_gpu.py."""

import importlib.util
import random

import pytest
import torch

from mechsub import backends, data, device, hooks, models, parallel, runs, training
from mechsub.config import ConfigError
from mechsub.data import DataConfig
from mechsub.evaluate import EvalConfig
from mechsub.generate import NumberVocab, generate_numbers, grammar_mask, next_state
from mechsub.prompts import chat_prefix
from mechsub.student import StudentConfig
from mechsub.teacher import TeacherConfig


def test_auto_is_the_cpu_in_float32_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve() == (torch.device("cpu"), torch.float32)
    assert device.resolve("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(device.DeviceError, match="no CUDA"):
        device.resolve("cuda")


def test_auto_is_cuda_in_bf16_where_a_gpu_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.resolve() == (torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device.resolve("auto", "auto") == (torch.device("cuda"), torch.float32)
    assert device.placement("cuda:1", "fp16").tag == "cuda/float16"


@pytest.mark.parametrize("field, value", [("device", "gpu"), ("dtype", "float8"), ("device", "cuda:x")])
def test_configs_reject_unknown_placements(field, value):
    for cls in (DataConfig, EvalConfig, TeacherConfig):
        with pytest.raises(ConfigError, match=field):
            cls(**{field: value})


def test_placement_fields_never_enter_the_config_identity():
    # a config.json written before these fields existed names the same run as auto and as explicit cpu/float32
    old = {k: v for k, v in DataConfig().to_dict().items() if k not in ("device", "dtype", "backend")}
    ident = DataConfig.identity_of(old)
    for cfg in (
        DataConfig(),
        DataConfig(device="cpu", dtype="float32"),
        DataConfig(device="cuda", dtype="bf16"),
    ):
        assert DataConfig.identity_of(cfg.to_dict()) == ident
    assert "backend" in DataConfig.identity_of(DataConfig(backend="vllm").to_dict())


def test_a_run_off_the_cpu_records_where_and_is_stale_for_a_cpu_run(monkeypatch, tmp_path):
    cfg = StudentConfig(model="tiny", data=str(tmp_path))
    cpu = runs.identity(cfg)
    assert "compute" not in cpu  # the identity of every earlier (CPU) run is unchanged
    assert runs.describe(cfg, ident=cpu)["compute"] == "cpu/float32"
    monkeypatch.setattr(device, "of_config", lambda c: device.Placement(torch.device("cuda"), torch.bfloat16))
    gpu = runs.identity(cfg)
    assert gpu["compute"] == "cuda/bfloat16" and gpu["config"] == cpu["config"]
    assert runs._stale_reasons({"identity": cpu}, gpu) == ["computed on cpu/float32, now on cuda/bfloat16"]
    assert runs._stale_reasons({"identity": gpu}, gpu) == []


def test_load_places_the_model_and_the_default_is_todays_cpu_model(tiny):
    same = models.load("tiny", device="auto" if not torch.cuda.is_available() else "cpu", dtype="auto")
    assert all(
        torch.equal(a, b) for a, b in zip(same.model.parameters(), tiny.model.parameters(), strict=True)
    )
    half = models.load("tiny", dtype="bf16")
    assert (
        half.dtype == torch.bfloat16 and half.info()["dtype"] == "bfloat16" and half.info()["device"] == "cpu"
    )


# ---- vLLM: the grammar as a regex, the scorer, the missing extra ----------------------------------------------
def _walk(rng, remaining=1000):
    """A random completion the grammar allows, as text."""
    digits, count = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    last, sep = torch.full((1,), -1), torch.full((1,), -1)
    text = ""
    for step in range(60):
        allowed = (
            grammar_mask(digits, count, last, sep, remaining=remaining - step)[0].nonzero().flatten().tolist()
        )
        c = rng.choice(allowed)
        if c == 12:
            return text
        text += "0123456789, "[c]
        digits, count, last, sep = next_state(torch.tensor([c]), digits, count, last, sep)
    raise AssertionError("the grammar never ended")


def test_the_regex_accepts_what_the_grammar_allows_and_nothing_else():
    rng = random.Random(0)
    for _ in range(300):
        assert backends.regex_accepts(_walk(rng))
    for good in ("7", "1, 22, 333", "1,2,3", "10 20 30", ", ".join(["999"] * 10)):
        assert backends.regex_accepts(good), good
    for bad in ("", "1234", "1, 2,3", "1 2,3", "1,, 2", "1, ", " 1", ", ".join(["1"] * 11), "١٢"):
        assert not backends.regex_accepts(bad), bad
    assert len(", ".join(["999"] * 10)) + 1 == backends.LONGEST


def test_the_vllm_backend_needs_room_for_the_longest_list():
    with pytest.raises(ConfigError, match="max_new_tokens"):
        DataConfig(backend="vllm", max_new_tokens=20)
    DataConfig(backend="vllm", max_new_tokens=20, decoding="free")
    DataConfig(backend="vllm")
    with pytest.raises(ConfigError, match="backend"):
        DataConfig.from_dict({"backend": "hf"})


@pytest.mark.parametrize("constrained, top_k", [(True, 0), (True, 3), (False, 0)])
def test_scoring_drawn_tokens_gives_what_the_decoder_stored(tiny, constrained, top_k):
    tok = tiny.tokenizer
    vocab = NumberVocab.of(tok)
    prompts = [chat_prefix(tok, f"Continue: {i}, {i + 3}, {2 * i}", "You love owls.") for i in range(6)]
    # a cap of 8 cuts some completions (no end row) and lets others end
    gen = generate_numbers(tiny.model, prompts, vocab, max_new_tokens=8, generator=torch.Generator().manual_seed(1),
                           pad_id=2, top_k=top_k, constrained=constrained)  # fmt: skip
    assert {len(t) for t in gen.tokens} != {8}
    got = backends.score_numbers(tiny.model, prompts, gen.tokens, vocab, max_new_tokens=8, constrained=constrained,
                                 top_k=top_k, pad_id=2)  # fmt: skip
    assert got.tokens == gen.tokens
    for a, b in zip(got.allowed_logprobs, gen.allowed_logprobs, strict=True):
        assert a.shape == b.shape and torch.equal(a.isinf(), b.isinf())
        assert torch.allclose(a[a.isfinite()], b[b.isfinite()], atol=1e-4)
    if top_k:
        assert got.topk_ids is not None and gen.topk_ids is not None
        for a, b in zip(got.topk_ids, gen.topk_ids, strict=True):
            assert torch.equal(a, b)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_the_vllm_backend_without_vllm_names_the_extra(tmp_path):
    cfg = DataConfig(model="tiny", n_prompts=2, batch_size=2, backend="vllm")
    with pytest.raises(ImportError, match=r"pip install 'mechsub\[vllm\]'"):
        data.run(cfg, tmp_path / "d")


def test_a_missing_extra_is_named():
    with pytest.raises(ImportError, match=r"pip install 'mechsub\[accelerate\]'"):
        device.need("mechsub_no_such_module", "accelerate", "launcher='accelerate'")


# ---- accelerate: the data-parallel split is the single-process update -----------------------------------------
def _sft_items(tok, n):
    rng = random.Random(3)
    return [
        training.Item(chat_prefix(tok, f"Numbers after {i}?", None),
                      list(tok(", ".join(str(rng.randrange(100)) for _ in range(rng.randrange(1, 5))),
                               add_special_tokens=False).input_ids))
        for i in range(n)
    ]  # fmt: skip


def test_shards_weighted_by_their_share_sum_to_the_full_batch_gradient():
    lm = models.load("tiny")
    tok, m = lm.tokenizer, lm.model
    head = m.get_output_embeddings().weight
    allowed = NumberVocab.of(tok).ids
    batch = _sft_items(tok, 5)  # items of unequal length: an unweighted mean of shard means would be wrong

    def grads(items, scale=1.0):
        m.zero_grad()
        (training.completion_loss(m.model, head, allowed, items, "sft", 2) * scale).backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    full = grads(batch)
    for world in (2, 3):
        total = [torch.zeros_like(g) for g in full]
        for rank in range(world):
            par = parallel.Parallel(rank=rank, world=world)
            part = par.shard(batch)
            total = [t + g for t, g in zip(total, grads(part, par.share(part, batch)), strict=True)]
        assert all(torch.allclose(t, f, atol=1e-6) for t, f in zip(total, full, strict=True))


def test_one_process_under_accelerate_trains_as_without_it(tmp_path):
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate is not installed")
    par = parallel.start("accelerate")
    assert (par.world, par.is_main) == (1, True)
    spec = training.TrainSpec(model="tiny", objective="sft", lora_r=4, lora_alpha=8, lr=1e-3, checkpoint_every=0,
                              seed=0)  # fmt: skip
    out = []
    for name, p in (("single", None), ("acc", par)):
        lm = models.load("tiny")
        items = _sft_items(lm.tokenizer, 6)
        out.append(training.fit(lm, items, [[0, 1, 2], [3, 4, 5]], spec, tmp_path / name, name, par=p))
    assert out[0]["first_loss"] == out[1]["first_loss"] and out[0]["last_loss"] == out[1]["last_loss"]


# ---- nnsight: the same read, by the same names (remote=True runs it on NDIF) ---------------------------------
def test_nnsight_read_equals_the_hook_read(tiny):
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    wanted = [hooks.resid_post(1), hooks.EMBED, hooks.block(0, "hook_mlp_out")]  # not in forward order
    want = hooks.read(tiny, ids, wanted)
    got = hooks.read_nnsight(tiny, ids, wanted)
    assert list(got) == wanted
    assert all(torch.equal(got[n], want[n]) for n in wanted)
