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


def test_sae_stage_and_feature_list_on_tiny(tmp_path, tiny):
    from typer.testing import CliRunner

    from mechsub import data, train
    from mechsub.cli import app
    from mechsub.data import DataConfig
    from mechsub.train import StudentConfig

    cfg = sae.SaeConfig(model="tiny", layer=0, expansion=2, k=8, training_tokens=2048, context_size=16,
                        answer_tokens=4, n_number_prompts=8)  # fmt: skip
    m = sae.train_sae(cfg, tmp_path / "sae")
    assert (
        0 <= m["dead_fraction"] <= 1 and m["explained_variance"] <= 1 and 0 < m["l0"] <= 8
    )  # topk: ≤ k fire
    assert m["d_sae"] == 128 and (tmp_path / "sae" / "sae" / "cfg.json").is_file()
    loaded = sae.load_sae(tmp_path / "sae" / "sae")  # the sae-lens format loads back
    x = torch.randn(3, 64)
    assert loaded.encode(x).shape == (3, 128)
    d = tmp_path / "data"
    data.run(DataConfig(model="tiny", n_prompts=8, batch_size=8, max_new_tokens=12), d)
    train.run(StudentConfig(model="tiny", data=str(d), batch_size=4, lr=1e-2), tmp_path / "s")
    out = tmp_path / "an"
    r = CliRunner().invoke(app, ["analyze", str(tmp_path / "s"), "--out", str(out), "--set", f"data={d}",
                                 "--set", f"sae={tmp_path / 'sae'}", "--set", "n_sequences=4", "--set",
                                 "n_questions=2", "--set", "entangled=false", "--set", "positions=0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    feats = json.loads((out / "features.json").read_text())
    assert len(feats["student_vs_controls"]) == 20 and len(feats["teacher_vs_base"]) == 20
    first = feats["teacher_vs_base"][0]
    assert {"id", "score", "top_contexts_numbers", "top_contexts_trait"} <= set(first)
    m = json.loads((out / "metrics.json").read_text())
    fp = m["feature_patching"]
    assert set(fp) >= {"numbers: student − controls", "attribution", "random", "all"}
    assert len(fp["random"]["patch_fraction"]) == len(fp["ks"]) and (out / "feature_patching.png").is_file()
    t = m["trajectory"]  # the top features' activation at every checkpoint (and the base at step 0)
    assert len(t["feature_activation"]) == len(t["steps"]) and len(t["feature_activation"][0]) == 5
    page = (out / "views.html").read_text()
    assert page.count("SAE features per token") == 3 and page.count("ColoredTokensMulti") >= 3
    scores = [f["score"] for f in feats["teacher_vs_base"]]
    assert scores == sorted(scores, reverse=True)


def test_concept_ablation_fine_tuning_blocks_learning_through_the_ablated_space(tmp_path, tiny):
    from mechsub import data, train
    from mechsub.data import DataConfig
    from mechsub.train import StudentConfig

    cfg = sae.SaeConfig(model="tiny", layer=0, expansion=2, k=8, training_tokens=2048, context_size=16,
                        answer_tokens=4, n_number_prompts=8)  # fmt: skip
    sae.train_sae(cfg, tmp_path / "sae")
    d = tmp_path / "data"
    data.run(DataConfig(model="tiny", n_prompts=8, batch_size=8, max_new_tokens=12), d)
    every = tmp_path / "every.json"  # all 128 features: their decoder directions span the 64-d residual
    every.write_text(json.dumps({"sae": str(tmp_path / "sae"), "features": list(range(128))}))
    layer, q = sae.ablation_basis(every)
    assert layer == 0 and q.shape == (64, 64)

    from mechsub.evaluate import chat_prefix
    from mechsub.generate import NumberVocab
    from mechsub.steering import edit_resid

    def first_loss(ablate):
        scfg = StudentConfig(model="tiny", data=str(d), batch_size=4, lr=1e-2, ablate=ablate)
        return train.run(scfg, tmp_path / ("ablated" if ablate else "plain"))["first_loss"], scfg

    # step 0 is the base (LoRA B = 0): its loss on the first batch, with layer 0's output projected out by hand
    ablated, scfg = first_loss(str(every))
    items = [train.Item(chat_prefix(tiny.tokenizer, e.prompt, None), e.completion_ids, e.allowed_logprobs)
             for e in data.load_examples(d)]  # fmt: skip
    batch = [items[i] for i in train._batches(len(items), scfg)[0]]
    head = tiny.model.get_output_embeddings().weight
    with torch.no_grad(), edit_resid(tiny.model, 0, lambda h: h - (h @ q) @ q.T):
        by_hand = train.completion_loss(tiny.model.model, head, NumberVocab.of(tiny.tokenizer).ids, batch,
                                        "distill", tiny.tokenizer.pad_token_id or 0)  # fmt: skip
    assert ablated == pytest.approx(float(by_hand), rel=1e-4)
    assert first_loss("")[0] != pytest.approx(ablated, rel=1e-3)  # and it is not the plain student's loss
    (tmp_path / "bad.json").write_text(json.dumps({"sae": str(tmp_path / "sae"), "features": [999]}))
    with pytest.raises(ValueError, match="not in the SAE's 128 features"):
        sae.ablation_basis(tmp_path / "bad.json")
