import json

import pytest
import torch

from mechsub import sae


class _Identity:
    """A perfect 'SAE': encode and decode are the identity."""

    def encode(self, x):
        return x.clamp(min=0) * 0 + x

    def decode(self, f):
        return f


def test_quality_of_a_perfect_reconstruction(tiny):
    windows = [[1, 5, 6, 7, 8, 9, 10, 11]] * 4
    q = sae.quality(tiny, _Identity(), 0, windows)
    assert q["loss_increase"] == pytest.approx(0.0, abs=1e-5)
    assert q["explained_variance"] == pytest.approx(1.0, abs=1e-5)


def test_an_sae_without_a_recorded_hook_is_refused():
    with pytest.raises(ValueError, match="records no hook name"):
        sae.sae_hook(_Identity())


def test_sae_stage_and_feature_list_on_tiny(tmp_path, tiny):
    from typer.testing import CliRunner

    from mechsub import data, student
    from mechsub.cli import app
    from mechsub.data import DataConfig
    from mechsub.student import StudentConfig

    cfg = sae.SaeConfig(model="tiny", layer=0, expansion=2, k=8, training_tokens=2048, context_size=16,
                        answer_tokens=4, n_number_prompts=8)  # fmt: skip
    m = sae.run(cfg, tmp_path / "sae")
    assert (
        0 <= m["dead_fraction"] <= 1 and m["explained_variance"] <= 1 and 0 < m["l0"] <= 8
    )  # topk: ≤ k fire
    assert m["d_sae"] == 128 and (tmp_path / "sae" / "sae" / "cfg.json").is_file()
    loaded = sae.load_sae(tmp_path / "sae" / "sae")  # the sae-lens format loads back
    assert sae.sae_hook(loaded) == cfg.hook and sae.sae_layer(loaded) == cfg.layer  # it records its own hook
    x = torch.randn(3, 64)
    assert loaded.encode(x).shape == (3, 128)
    d = tmp_path / "data"
    data.run(DataConfig(model="tiny", n_prompts=8, batch_size=8, max_new_tokens=12), d)
    student.run(StudentConfig(model="tiny", data=str(d), batch_size=4, lr=1e-2), tmp_path / "s")
    out = tmp_path / "an"
    r = CliRunner().invoke(app, ["analyze", str(tmp_path / "s"), "--out", str(out), "--set", f"data={d}",
                                 "--set", f"sae={tmp_path / 'sae'}", "--set", "n_sequences=4", "--set",
                                 "n_questions=2", "--set", "entangled=false", "--set", "positions=0",
                                 "--set", "n_random_draws=3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    feats = json.loads((out / "features.json").read_text())
    assert len(feats["student_vs_controls"]) == 20 and len(feats["teacher_vs_base"]) == 20
    first = feats["teacher_vs_base"][0]
    assert {"id", "score", "top_contexts_numbers", "top_contexts_trait"} <= set(first)
    m = json.loads((out / "metrics.json").read_text())
    fp = m["feature_patching"]
    assert set(fp) >= {"numbers: student − controls", "attribution", "random", "all"}
    assert len(fp["random"]["patch_fraction"]) == len(fp["ks"]) and (out / "feature_patching.png").is_file()
    assert fp["n_random"] == 3 and fp["first_position"] == 1 and "all_position0" in fp
    matched = fp["attribution"]["random_matched"]["patch_fraction"]  # per k: 3 frequency-matched draws
    assert len(matched) == len(fp["ks"]) and all(c is None or c["n"] == 3 for c in matched)
    t = m["trajectory"]  # the top features' activation at every checkpoint (and the base at step 0)
    assert len(t["feature_activation"]) == len(t["steps"]) and len(t["feature_activation"][0]) == 5
    page = (out / "views.html").read_text()
    assert page.count("SAE features per token") == 3 and page.count("ColoredTokensMulti") >= 3
    scores = [f["score"] for f in feats["teacher_vs_base"]]
    assert scores == sorted(scores, reverse=True)


def test_concept_ablation_fine_tuning_blocks_learning_through_the_ablated_space(tmp_path, tiny):
    from mechsub import data, student, training
    from mechsub.data import DataConfig
    from mechsub.filter import ablation_basis, write_ablation
    from mechsub.student import StudentConfig

    cfg = sae.SaeConfig(model="tiny", layer=0, expansion=2, k=8, training_tokens=2048, context_size=16,
                        answer_tokens=4, n_number_prompts=8)  # fmt: skip
    sae.run(cfg, tmp_path / "sae")
    d = tmp_path / "data"
    data.run(DataConfig(model="tiny", n_prompts=8, batch_size=8, max_new_tokens=12), d)
    every = tmp_path / "every.json"  # all 128 features: their decoder directions span the 64-d residual
    write_ablation(every, tmp_path / "sae", range(128))
    layer, q = ablation_basis(every)
    assert layer == 0 and q.shape == (64, 64)

    from mechsub import hooks
    from mechsub.generate import NumberVocab
    from mechsub.prompts import chat_prefix

    def first_loss(ablate):
        scfg = StudentConfig(model="tiny", data=str(d), batch_size=4, lr=1e-2, ablate=ablate)
        return student.run(scfg, tmp_path / ("ablated" if ablate else "plain"))["first_loss"], scfg

    # step 0 is the base (LoRA B = 0): its loss on the first batch, with layer 0's output projected out by hand
    ablated, scfg = first_loss(str(every))
    items = [training.Item(chat_prefix(tiny.tokenizer, e.prompt, None), e.completion_ids, e.allowed_logprobs)
             for e in data.load_examples(d)]  # fmt: skip
    batch = [items[i] for i in student._batches(len(items), scfg)[0]]
    head = tiny.model.get_output_embeddings().weight

    def project(h):  # projected out at positions ≥ 1; position 0, the attention sink, left alone
        out = h - (h @ q) @ q.T
        out[:, 0] = h[:, 0]
        return out

    with torch.no_grad(), hooks.edit(tiny, {"blocks.0.hook_resid_post": project}):
        by_hand = training.completion_loss(tiny.model.model, head, NumberVocab.of(tiny.tokenizer).ids, batch,
                                        "distill", tiny.tokenizer.pad_token_id or 0)  # fmt: skip
    assert ablated == pytest.approx(float(by_hand), rel=1e-4)
    assert first_loss("")[0] != pytest.approx(ablated, rel=1e-3)  # and it is not the plain student's loss
    # the control: as many random orthonormal directions at the SAE's layer, one draw per seed
    from mechsub.filter import random_basis, write_random_ablation

    write_random_ablation(tmp_path / "rand.json", tmp_path / "sae", 5, seed=2)
    rand = ablation_basis(tmp_path / "rand.json")
    assert rand.layer == 0 and torch.equal(rand.basis, random_basis(64, 5, seed=2))
    write_ablation(tmp_path / "bad.json", tmp_path / "sae", [999])
    with pytest.raises(ValueError, match="not in the SAE's 128 features"):
        ablation_basis(tmp_path / "bad.json")
    # feature ids name directions of one SAE's weights: the file records their hash, and a retrained SAE (here its
    # decoder rewritten) is refused rather than read as other directions under the same ids
    from safetensors.torch import load_file, save_file

    from mechsub.files import sha256_file

    weights = tmp_path / "sae" / "sae" / "sae_weights.safetensors"
    assert json.loads(every.read_text())["sae_sha256"] == sha256_file(weights)
    tensors = load_file(str(weights))
    tensors["W_dec"] = tensors["W_dec"].flip(0).contiguous()
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="not the one these feature ids were chosen on"):
        ablation_basis(every)
    assert ablation_basis(tmp_path / "rand.json").layer == 0  # random directions do not depend on the weights


def _small(**changes):
    base = {"model": "tiny", "layer": 0, "expansion": 2, "k": 8, "training_tokens": 2048, "context_size": 16,
            "answer_tokens": 4, "n_number_prompts": 8}  # fmt: skip
    return sae.SaeConfig.from_dict({**base, **changes})


def test_k_beyond_the_dictionary_fails_in_validate():
    from mechsub.config import ConfigError

    assert _small(k=128).k == 128  # d_sae = 2 × 64: every feature may fire
    with pytest.raises(ConfigError, match=r"k: 129 .*d_sae = expansion 2 × d_model 64 = 128"):
        _small(k=129)
    assert _small(architecture="standard", k=1000).k == 1000  # k means nothing to a standard SAE


def test_layer_beyond_a_shipped_model_fails_in_validate():
    from mechsub.config import ConfigError

    with pytest.raises(ConfigError, match=r"layer: tiny has 2 layers \(0–1\), so there is no layer 2"):
        _small(layer=2)
    with pytest.raises(ConfigError, match=r"layer: smollm2-135m-instruct has 30 layers"):
        _small(model="smollm2-135m-instruct", layer=30)


def _no_loading(monkeypatch):
    from mechsub import models

    def refuse(*a, **k):
        raise AssertionError("the model's weights were loaded before the config was checked")

    monkeypatch.setattr(models, "load", refuse)


def test_layer_beyond_a_checkpoint_fails_before_loading_or_writing(tmp_path, monkeypatch, tiny):
    from mechsub import models
    from mechsub.config import ConfigError

    ck = models.save_checkpoint(tiny, tmp_path / "ck")
    cfg = _small(model=str(ck), layer=5)  # not a shipped model: its shape is read when the stage starts
    _no_loading(monkeypatch)
    with pytest.raises(ConfigError, match=r"layer: .*ck has 2 layers"):
        sae.run(cfg, tmp_path / "sae")
    with pytest.raises(ConfigError, match=r"k: 200 .* = 128"):
        sae.run(_small(model=str(ck), k=200), tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


def test_shape_unknown_until_loaded_still_fails_before_writing(tmp_path, monkeypatch, tiny):
    from mechsub import models
    from mechsub.config import ConfigError

    monkeypatch.setattr(models, "shape_of", lambda name: None)  # say the shape cannot be read without loading
    monkeypatch.setattr(models, "load", lambda name, **k: tiny)
    with pytest.raises(ConfigError, match=r"layer: .* has 2 layers"):
        sae.run(_small(model=str(tmp_path / "some-checkpoint"), layer=3), tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


# --- on a `mechsub corpus` folder (issue 13): cache, train from it, quality on held-out windows ---------------
class _Fixed:
    """A planted 'SAE': encode is the identity, decode(f) = mean + scale · (f − mean)."""

    def __init__(self, scale, mean=0.0):
        self.scale, self.mean = scale, mean

    def encode(self, x):
        return x

    def decode(self, f):
        return self.mean + self.scale * (f - self.mean)


def test_reconstruction_quality_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g) + 3
    x[:, 4] = 0  # a feature (here: a coordinate) that never fires is dead
    q = sae.reconstruction_quality(_Fixed(1.0), x, batch=64)
    assert q["explained_variance"] == pytest.approx(1.0, abs=1e-12)
    assert q["dead_fraction"] == pytest.approx(1 / 6) and q["l0"] == pytest.approx(5.0)
    # halfway to the mean: the error is a quarter of the variance around the mean, so EV = 3/4
    q = sae.reconstruction_quality(_Fixed(0.5, x.mean(0)), x, batch=64)
    assert q["explained_variance"] == pytest.approx(0.75, abs=1e-5) and q["quality_tokens"] == 300
    by_hand = 1 - ((x - x.mean(0)) * 0.5).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert q["explained_variance"] == pytest.approx(float(by_hand), abs=1e-5)


def test_loss_recovered_is_one_for_a_perfect_and_zero_for_an_empty_reconstruction(tiny):
    windows = torch.randint(3, 99, (5, 10), generator=torch.Generator().manual_seed(0)).tolist()
    perfect = sae.loss_recovered(tiny, _Fixed(1.0), 1, windows, batch_size=2)
    ids = torch.tensor(windows)
    with torch.no_grad():
        clean = float(tiny.model(ids, labels=ids).loss)
    assert perfect["ce_clean"] == pytest.approx(clean, abs=1e-5) and perfect["ce_tokens"] == 5 * 9
    assert perfect["ce_spliced"] == pytest.approx(clean, abs=1e-5)
    assert perfect["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    empty = sae.loss_recovered(tiny, _Fixed(0.0), 1, windows, batch_size=2)
    assert empty["ce_spliced"] == pytest.approx(empty["ce_zero_ablation"], abs=1e-6)
    assert empty["ce_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert empty["ce_zero_ablation"] != pytest.approx(clean, abs=1e-3)  # the ablation does something


def test_sink_tokens_are_left_out_of_the_quality_figures_by_hand():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g) + 3
    x[::20] *= 100  # 10 massive rows (5%)
    thr = sae.sink_threshold(x, 10.0)
    norms = x.norm(dim=-1)
    assert thr == pytest.approx(10 * float(norms.median()))
    assert (
        sae.not_sinks(x, thr).tolist() == (norms <= thr).tolist()
        and int((~sae.not_sinks(x, thr)).sum()) == 10
    )
    assert sae.sink_threshold(x, 0.0) is None and bool(sae.not_sinks(x, None).all())
    half = _Fixed(0.5, x.mean(0))
    q = sae.reconstruction_quality(half, x, batch=64, sink_norm_threshold=thr)
    kept = x[norms <= thr]
    by_hand = 1 - (half.decode(kept) - kept).pow(2).sum() / (kept - kept.mean(0)).pow(2).sum()
    assert q["explained_variance"] == pytest.approx(float(by_hand), abs=1e-5)
    assert q["quality_tokens"] == 190 and q["sink_share"] == pytest.approx(0.05)
    # without the rule the massive rows dominate both sums
    assert sae.reconstruction_quality(half, x, batch=64)["sink_share"] == 0


def test_loss_recovered_keeps_the_model_residual_at_sink_tokens(tiny):
    windows = torch.randint(3, 99, (4, 10), generator=torch.Generator().manual_seed(0)).tolist()
    # a threshold below every norm: every token is a sink, so neither edit changes anything
    edited = sae.loss_recovered(tiny, _Fixed(0.0), 1, windows, batch_size=2, sink_norm_threshold=1e-6)
    assert edited["ce_spliced"] == pytest.approx(edited["ce_clean"], abs=1e-6)
    assert edited["ce_zero_ablation"] == pytest.approx(edited["ce_clean"], abs=1e-6)
    assert edited["ce_recovered"] != edited["ce_recovered"]  # nan: nothing to recover
    # a threshold above every norm: the same as no rule
    none = sae.loss_recovered(tiny, _Fixed(0.0), 1, windows, batch_size=2)
    above = sae.loss_recovered(tiny, _Fixed(0.0), 1, windows, batch_size=2, sink_norm_threshold=1e9)
    assert above == pytest.approx(none)


def test_sink_norm_ratio_is_checked():
    from mechsub.config import ConfigError

    with pytest.raises(ConfigError, match="sink_norm_ratio"):
        _small(sink_norm_ratio=0.5)


def _tiny_corpus(path, seed=0, windows=160):
    from mechsub import corpus
    from mechsub.corpus import CorpusConfig

    cfg = CorpusConfig(model="tiny", sources=(), project_share=1.0, target_tokens=16 * windows, context_size=16,
                       shard_windows=64, seed=seed)  # fmt: skip
    corpus.run(cfg, path, force=True)
    return str(path)


def _on_corpus(c, **changes):
    base = {"model": "tiny", "layer": 1, "expansion": 2, "k": 8, "training_tokens": 4096, "corpus": c,
            "held_out_windows": 32, "ce_windows": 8, "batch_tokens": 128, "lr": 3e-3}  # fmt: skip
    return sae.SaeConfig.from_dict({**base, **changes})


def test_sae_trains_from_a_shared_multi_layer_cache_and_reports_quality(tmp_path, tiny, monkeypatch):
    from sae_lens.registry import get_sae_training_class

    from mechsub import actcache

    c = _tiny_corpus(tmp_path / "corpus")
    ccfg = actcache.CacheConfig(model="tiny", corpus=c, layers=(0, 1), train_windows=100, held_out_windows=32,
                                dtype="float32", shard_windows=40)  # fmt: skip
    cm = actcache.run(ccfg, tmp_path / "cache")
    assert cm["train"]["rows"] == 100 * 15 and cm["held_out"]["rows"] == 32 * 15
    actcache.run(ccfg.replace(layers=(0,)), tmp_path / "cache0")
    # the SAE reads only the cache: no capture happens in its stage
    monkeypatch.setattr(actcache, "write_cache", lambda *a, **k: pytest.fail("captured despite a cache"))
    cfg = _on_corpus(c, cache=str(tmp_path / "cache"))
    m = sae.run(cfg, tmp_path / "sae")
    assert m["quality_tokens"] == 32 * 15 and m["ce_tokens"] == 8 * 15 and m["training_tokens"] == 4096
    assert m["epochs"] == pytest.approx(4096 / 1500, abs=1e-3) and 0 < m["l0"] <= 8
    assert 0 <= m["dead_fraction"] <= 1
    # a random tiny model's next-token loss barely depends on one layer's residual (both ≈ ln 99), so which of
    # clean and zero-ablated is lower is chance: check the figure's definition, not its sign
    # (the definition itself is tested by hand in test_loss_recovered_is_one_for_a_perfect_...)
    assert m["ce_recovered"] == pytest.approx(
        (m["ce_zero_ablation"] - m["ce_spliced"]) / (m["ce_zero_ablation"] - m["ce_clean"]), rel=1e-6
    )
    loaded = sae.load_sae(tmp_path / "sae" / "sae")
    assert sae.sae_layer(loaded) == 1 and loaded.cfg.d_sae == 128
    # it learned: its held-out reconstruction beats the same SAE before training
    held = actcache.CachedActivations(tmp_path / "cache" / "held_out", cfg.hook).all()
    torch.manual_seed(cfg.seed)
    untrained = get_sae_training_class("topk")[0](sae.training_sae_config(cfg, 64))
    assert m["mse_per_token"] < 0.5 * sae.reconstruction_quality(untrained, held)["mse_per_token"]
    # the sink threshold travels with the saved SAE, and the figures are measured under it
    assert (
        loaded.sink_norm_threshold == pytest.approx(m["sink_norm_threshold"]) and m["sink_norm_threshold"] > 0
    )
    assert sae.reconstruction_quality(loaded, held, sink_norm_threshold=loaded.sink_norm_threshold)[
        "explained_variance"
    ] == pytest.approx(m["explained_variance"], abs=1e-4)  # the saved SAE is the one measured
    assert sae.run(cfg, tmp_path / "sae") == m  # finished: reused
    with pytest.raises(ValueError, match="held-out windows"):
        sae.run(_on_corpus(c, cache=str(tmp_path / "cache"), held_out_windows=16), tmp_path / "sae2")
    with pytest.raises(ValueError, match=r"caches blocks\.0\S*, not blocks\.1"):
        sae.run(_on_corpus(c, cache=str(tmp_path / "cache0")), tmp_path / "sae3")


def test_a_changed_corpus_makes_the_sae_run_stale(tmp_path, tiny):
    from mechsub import runs

    c = _tiny_corpus(tmp_path / "corpus")
    cfg = _on_corpus(c, training_tokens=1024)
    m = sae.run(cfg, tmp_path / "sae")
    assert m["cache"] == "own" and not (tmp_path / "sae" / "cache").exists()  # its own cache is deleted
    with runs.recording() as events:
        assert sae.run(cfg, tmp_path / "sae") == m
    assert [e.status for e in events] == ["reused"]
    _tiny_corpus(tmp_path / "corpus", seed=1)  # the same folder, other text
    with runs.recording() as events:
        sae.run(cfg, tmp_path / "sae")
    assert [(e.status, e.reason) for e in events] == [("rerun", "inputs changed: corpus")]
    # a cache records the corpus it read: one of the old corpus is refused for the new one
    old_cache = {"corpus": "outputs:" + "0" * 64, "hooks": [cfg.hook], "n_windows": 32}
    with pytest.raises(ValueError, match="another corpus"):
        sae._check_cache(old_cache, cfg, cfg.hook, "train")


def test_corpus_fields_are_checked_and_optional():
    from mechsub.config import ConfigError

    with pytest.raises(ConfigError, match="set corpus too"):
        _small(cache="somewhere")
    with pytest.raises(ConfigError, match="ce_windows"):
        _small(corpus="c", ce_windows=300)
    assert _small(architecture="batchtopk").architecture == "batchtopk"
    # the new fields at their defaults leave an old run's identity as it was
    assert "corpus" not in json.loads(_small().identity()) and "corpus" in json.loads(
        _small(corpus="c").identity()
    )


def test_cache_vs_activations_store_bench_runs_both_paths_on_the_same_windows(tmp_path, tiny):
    windows = torch.randint(3, 99, (40, 16), generator=torch.Generator().manual_seed(0)).tolist()
    cfg = _small(layer=1, batch_tokens=128)
    b = sae.bench_cache_vs_store(tiny, windows, cfg, tmp_path / "c", dtype="float32")
    assert b["tokens"] == 40 * 15 // 128 * 128 and b["hook"] == "blocks.1.hook_resid_post"
    assert b["cache"]["tokens_per_s"] > 0 and b["store"]["tokens_per_s"] > 0  # figures, not a race
    assert not (tmp_path / "c").exists()  # the bench's cache is removed


def test_feature_acts_reads_sink_tokens_as_zero_rows_and_keeps_the_others(tiny):
    from mechsub.capture import Batch

    batch = Batch([[1, 5, 6, 7, 8, 9], [1, 12, 13, 14]], [[1, 2, 3, 4, 5], [1, 2, 3]])
    hook = "blocks.1.hook_resid_post"
    plain = sae.feature_acts(tiny, _Fixed(1.0), hook, batch)  # identity encoder: the residual itself
    assert plain.shape[0] == 8
    norms = plain.norm(dim=-1)
    planted = _Fixed(1.0)
    planted.sink_norm_threshold = float(norms.median())  # about half the rows count as sinks
    masked = sae.feature_acts(tiny, planted, hook, batch)
    sinks = norms > planted.sink_norm_threshold
    assert masked.shape == plain.shape and 0 < int(sinks.sum()) < 8
    assert torch.equal(masked[sinks], torch.zeros_like(masked[sinks]))
    assert torch.allclose(masked[~sinks], plain[~sinks])
    # a column subset keeps the same rule
    cols = sae.feature_acts(tiny, planted, hook, batch, features=[0, 2])
    assert torch.allclose(cols, masked[:, [0, 2]])
