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
