"""The localisation battery (`mechsub.battery`) on the tiny random model with a random sae-lens SAE."""

import copy
import json

import numpy as np
import pytest
import torch
from scipy import stats as st

from mechsub import battery, hooks
from mechsub.metric import TraitMetric
from mechsub.prompts import trait_prompt

CFG = battery.BatteryConfig(ks=(1, 5), n_random=3, n_questions=2, n_rank_questions=1)


def _perturbed(lm, scale, seed=0):
    other = copy.copy(lm)
    other.model = copy.deepcopy(lm.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.model.model.layers[0].mlp.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def _random_sae(folder, layer, d_in=64, d_sae=128, seed=0):
    """A random (untrained) sae-lens TopK SAE reading ``blocks.{layer}.hook_resid_post``, saved in its format:
    its reconstruction error is large, so the error term matters."""
    from sae_lens import TopKTrainingSAEConfig
    from sae_lens.registry import get_sae_training_class

    torch.manual_seed(seed)
    sae = get_sae_training_class("topk")[0](TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=8))
    sae.cfg.metadata.hook_name = hooks.resid_post(layer)
    sae.save_inference_model(str(folder))
    return folder


@pytest.fixture(scope="module")
def sae0(tmp_path_factory):
    folder = _random_sae(tmp_path_factory.mktemp("sae") / "l0", 0)
    return battery.load_saes([folder], "tiny", 2, 64, [0])[0]


def test_pairs_rotate_to_the_next_trait():
    ps = battery.pairs(["owl", "dog", "cat", "lion"], [0, 1])
    assert [(p.trait, p.control) for p in ps[:4]] == [
        ("owl", "dog"),
        ("dog", "cat"),
        ("cat", "lion"),
        ("lion", "owl"),
    ]
    assert [p.replicate for p in ps] == [0] * 4 + [1] * 4 and ps[4].name == "r1-owl"
    qs, rank = battery.questions("animal", 10, 10)
    assert len(qs) == len(rank) == 10 and not set(qs) & set(rank)


def test_a_student_patched_into_itself_has_no_gap_and_the_rule_leaves_it_out(tiny, sae0, tmp_path):
    rec = battery.measure(tiny, tiny, sae0.sae, 0, "owl", "animal", CFG)
    assert rec["gap"] == 0.0 and rec["topk_share"] == [None, None] and rec["whole_share"] is None
    # through the battery: both pairs of the replicate are a model against itself
    m = battery.run(CFG, battery.pairs(["owl", "dog"], [0]), {("owl", 0): "a", ("dog", 0): "a"},
                    lambda _: tiny, {0: sae0}, "animal", tmp_path)  # fmt: skip
    assert m["n_pairs"] == 2 and m["n_pairs_included"] == 0 and not any(p["included"] for p in m["pairs"])
    layer = m["layers"]["0"]
    assert (
        layer["n_pairs"] == 0
        and layer["topk"][0]["share"]["mean"] is None
        and layer["topk"][0]["matched"] is None
    )
    assert m["goal"]["best"] is None and not m["goal"]["met"]
    text = battery.report_md(m, "cmd", 1.0)
    assert "not measurable" in text and "0 of 2 pairs" in text
    for f in (tmp_path / "metrics.json", *(tmp_path / "units").iterdir()):  # strict JSON: no NaN
        json.loads(f.read_text(), parse_constant=lambda c, f=f: pytest.fail(f"{c} in {f.name}"))


def test_all_latents_plus_error_is_the_whole_residual_patch(tiny, sae0):
    student = _perturbed(tiny, 0.05)
    sae = sae0.sae
    # by hand: the student − receiver residual change = every latent's change through W_dec + the error's change
    metric, name = TraitMetric.of(tiny.tokenizer, "owl"), hooks.resid_post(0)
    ids = torch.tensor(
        [metric.inputs(trait_prompt(tiny.tokenizer, "Which single animal speaks to you?", "animal"))]
    )
    x_b, x_s = (hooks.read(lm, ids, [name])[name][0] for lm in (tiny, student))
    with torch.no_grad():
        f_b, f_s = sae.encode(x_b), sae.encode(x_s)
        err = (x_s - sae.decode(f_s)) - (x_b - sae.decode(f_b))
        feats = (f_s - f_b) @ sae.W_dec
    torch.testing.assert_close(feats + err, x_s - x_b, atol=1e-5, rtol=1e-5)
    assert err.norm() > 0.1 * (x_s - x_b).norm()  # a random SAE: the error is no rounding
    rec = battery.measure(tiny, student, sae, 0, "owl", "animal", CFG)
    assert abs(rec["gap"]) > 1e-4 and rec["gap"] == pytest.approx(rec["whole_gap"], abs=1e-6)
    assert rec["all_error_share"] == pytest.approx(rec["whole_share"], abs=1e-4)
    assert rec["all_share"] != pytest.approx(rec["whole_share"], abs=1e-3)
    assert len(rec["topk_share"]) == 2 and [len(m["draws"]) for m in rec["matched"]] == [3, 3]
    assert rec["position0_share"] == pytest.approx(rec["residual_scan"]["fraction_by_layer_position0"][0])


def _record(rep, trait, gap, shares, draws, layer=3):
    m = [{"mean": float(np.mean(d)), "p_value": 0.5, "rank": 2, "draws": d} for d in draws]
    return {"replicate": rep, "trait": trait, "control": "x", "layer": layer, "gap": gap, "gap_ci95": [0, 1],
            "topk_share": shares, "matched": m, "all_share": 0.9, "all_error_share": 1.0, "whole_share": 1.0,
            "position0_share": 0.1 * rep, "seconds": 2.0}  # fmt: skip


def test_aggregation_is_over_replicates_as_by_hand():
    cfg = battery.BatteryConfig(ks=(1, 5), n_random=4)
    rng = np.random.default_rng(0)
    recs, shares = [], {}
    for rep in range(3):
        for trait in ("owl", "dog"):
            s = rng.uniform(0, 1, 2).tolist()
            shares[(rep, trait)] = s
            recs.append(_record(rep, trait, 0.5, s, [rng.uniform(-0.1, 0.2, 4).tolist() for _ in range(2)]))
    recs.append(
        _record(2, "cat", 0.01, [50.0, 50.0], [[9.0] * 4, [9.0] * 4])
    )  # a gap under the rule: left out
    m = battery.aggregate(recs, cfg)
    assert m["n_pairs"] == 7 and m["n_pairs_included"] == 6
    # k = 1: the mean over each replicate's pairs, then a t-interval over the 3 replicates
    per_rep = np.array([np.mean([shares[(r, t)][0] for t in ("owl", "dog")]) for r in range(3)])
    half = st.t.ppf(0.975, 2) * per_rep.std(ddof=1) / np.sqrt(3)
    got = m["layers"]["3"]["topk"][0]
    assert got["share"]["mean"] == pytest.approx(per_rep.mean())
    assert got["share"]["ci95"] == pytest.approx([per_rep.mean() - half, per_rep.mean() + half])
    assert got["share"]["n_replicates"] == 3 and m["layers"]["3"]["n_pairs"] == 6
    # the matched draws: pooled over the included pairs; the combined p over draw indices
    inc = [r for r in recs if r["gap"] >= 0.05]
    pooled = np.concatenate([r["matched"][0]["draws"] for r in inc])
    assert got["matched"]["mean"] == pytest.approx(pooled.mean()) and got["matched"]["n_draws"] == 24
    assert got["matched"]["p2_5_p97_5"] == pytest.approx(np.percentile(pooled, [2.5, 97.5]).tolist())
    draw_means = np.mean([np.mean([r["matched"][0]["draws"] for r in inc if r["replicate"] == q], 0)
                          for q in range(3)], 0)  # fmt: skip
    assert got["matched"]["combined_p"] == pytest.approx((1 + np.sum(draw_means >= per_rep.mean())) / 5)
    diff = np.array([np.mean([r["topk_share"][0] - r["matched"][0]["mean"] for r in inc if r["replicate"] == q])
                     for q in range(3)])  # fmt: skip
    assert got["minus_matched"]["mean"] == pytest.approx(diff.mean())
    assert m["layers"]["3"]["position0"]["mean"] == pytest.approx(0.1)  # replicates 0, 1, 2: 0.0, 0.1, 0.2
    best = max((e["share"]["mean"], e["k"]) for e in m["layers"]["3"]["topk"])
    assert m["goal"]["best"]["share"] == pytest.approx(best[0]) and m["goal"]["met"] == (best[0] >= 0.5)


def test_a_second_run_reuses_the_unit_files_and_gives_identical_metrics(tiny, sae0, tmp_path):
    models = {"owl0": _perturbed(tiny, 0.05, 1), "dog0": _perturbed(tiny, 0.05, 2)}
    loads = []

    def load(i):
        loads.append(i)
        return models[i]

    args = (battery.pairs(["owl", "dog"], [0]), {("owl", 0): "owl0", ("dog", 0): "dog0"})
    lines = []
    m1 = battery.run(CFG, *args, load, {0: sae0}, "animal", tmp_path, progress=lines.append)
    assert sorted(loads) == ["dog0", "owl0"]  # each student once for the replicate's two pairs
    first = (tmp_path / "metrics.json").read_text()
    units = sorted(p.name for p in (tmp_path / "units").iterdir())
    assert units == ["r0-dog-l0.json", "r0-owl-l0.json"] and "elapsed" in lines[0]
    loads.clear()
    m2 = battery.run(CFG, *args, load, {0: sae0}, "animal", tmp_path, progress=lines.append)
    assert loads == [] and "reused" in lines[-1]
    assert m2 == m1 and (tmp_path / "metrics.json").read_text() == first
    # other settings: the units are measured again
    battery.run(CFG.replace(n_random=2), *args, load, {0: sae0}, "animal", tmp_path)
    assert sorted(loads) == ["dog0", "owl0"]
    text = battery.report_md(m1, "cmd", 1.0)
    assert "| 0 | " in text and "Re-create: `cmd`" in text
    battery.plot(m1, tmp_path / "shares.png")
    assert (tmp_path / "shares.png").stat().st_size > 1000


def test_a_bad_sae_folder_or_layer_is_a_clear_error(tmp_path, sae0):
    with pytest.raises(FileNotFoundError, match="no SAE folder"):
        battery.load_saes([tmp_path / "missing"], "tiny", 2, 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no SAE"):
        battery.load_saes([tmp_path / "empty"], "tiny", 2, 64)
    with pytest.raises(ValueError, match="SAE of layer 0, not of layer 1"):
        battery.load_saes([sae0.folder], "tiny", 2, 64, [1])
    with pytest.raises(ValueError, match="two SAEs of layer 0"):
        battery.load_saes([sae0.folder, sae0.folder], "tiny", 2, 64)
    deep = _random_sae(tmp_path / "l5", 5)
    with pytest.raises(ValueError, match="has 2 layers"):
        battery.load_saes([deep], "tiny", 2, 64)
    with pytest.raises(ValueError, match="d_model = 32"):
        battery.load_saes([sae0.folder], "other", 2, 32)


def test_the_scan_options_leave_the_patch_direction_as_it_was(tiny, sae0):
    from mechsub import patching

    student, qs, rank_qs = (
        _perturbed(tiny, 0.05),
        battery.questions("animal", 2, 1)[0],
        ["What animal do you like best?"],
    )
    args = (tiny, student, sae0.sae, 0, qs, rank_qs, "owl", "animal", {})
    full = patching.feature_patch_scan(*args, ks=(1, 5), n_random=3)
    lean = patching.feature_patch_scan(*args, ks=(1, 5), n_random=3, ablate=False, plain_random=False,
                                       keep_draws=True)  # fmt: skip
    assert "random" not in lean and "ablate_fraction" not in lean["attribution"] and "all_error" not in lean
    assert lean["attribution"]["patch_fraction"] == full["attribution"]["patch_fraction"]
    assert lean["all"]["patch_fraction"] == full["all"]["patch_fraction"]
    got, want = lean["attribution"]["random_matched"], full["attribution"]["random_matched"]
    assert list(got) == ["patch_fraction"]
    assert [{k: v for k, v in d.items() if k != "draws"} for d in got["patch_fraction"]] == want[
        "patch_fraction"
    ]
    assert [len(d["draws"]) for d in got["patch_fraction"]] == [3, 3]


def test_gradients_exist_for_a_frozen_receiver(tiny):
    """A LoRA student loads merged with frozen weights: its activations carry no graph of their own; the
    attribution still gets the same gradients as from trainable weights."""
    from mechsub import patching

    frozen = copy.copy(tiny)
    frozen.model = copy.deepcopy(tiny.model).requires_grad_(False)
    metric, names = TraitMetric.of(tiny.tokenizer, "owl"), [hooks.resid_post(0), hooks.resid_post(1)]
    prompt = trait_prompt(tiny.tokenizer, "Which single animal speaks to you?", "animal")
    a, g, lp = patching._grads(tiny, metric, prompt, names)
    fa, fg, flp = patching._grads(frozen, metric, prompt, names)
    assert flp == pytest.approx(lp, abs=1e-6)
    for n in names:
        torch.testing.assert_close(fa[n], a[n])
        torch.testing.assert_close(fg[n], g[n])
    assert not any(p.grad is not None for p in tiny.model.parameters())


def test_batched_forwards_give_the_one_question_numbers(tiny, sae0):
    """Rows of different lengths right-padded in one forward score as they do alone (float rounding aside)."""
    from mechsub import patching

    student, rank_qs = _perturbed(tiny, 0.05), ["What animal do you like best?", "Which animal?"]
    qs = [
        "Name your favorite animal using only one word.",
        "Which animal?",
        "Which single animal speaks to you?",
    ]
    args = (tiny, student, sae0.sae, 0, qs, rank_qs, "owl", "animal", {})
    one = patching.feature_patch_scan(*args, ks=(1, 5), n_random=3, error=True)
    many = patching.feature_patch_scan(*args, ks=(1, 5), n_random=3, error=True, batch=7)
    assert many["top_attribution"] == one["top_attribution"] and many["gap"] == pytest.approx(
        one["gap"], abs=1e-6
    )
    for key in ("attribution", "random", "all", "all_error", "all_position0"):
        for d in ("patch_fraction", "ablate_fraction"):
            assert many[key][d] == pytest.approx(one[key][d], abs=1e-5), (key, d)
    p1 = patching.patch_scan(tiny, student, tiny.tokenizer, qs, "owl", "animal", [0, 1])
    pn = patching.patch_scan(tiny, student, tiny.tokenizer, qs, "owl", "animal", [0, 1], batch=3)
    for key in ("target_logp_by_question", "source_logp_by_question", "patched_logp_by_question",
                "patched_logp_by_layer_position0"):  # fmt: skip
        assert np.allclose(pn[key], p1[key], atol=1e-5), key


@pytest.mark.parametrize(
    ("reps", "verdict"),
    [
        ([0.9, 0.2, 0.7], "not established (the mean reaches"),  # mean 0.6 ≥ 0.5, interval's lower end below
        ([0.62, 0.6, 0.61], "met (the Bonferroni"),  # one cell: the corrected interval is the 95% one
        ([0.1, 0.2, 0.3], "not met"),
    ],
)
def test_the_goal_verdict_rests_on_the_interval(reps, verdict):
    cfg = battery.BatteryConfig(ks=(1,), n_random=2)
    recs = [_record(r, "owl", 0.5, [s], [[0.0, 0.0]]) for r, s in enumerate(reps)]
    text = battery.report_md(battery.aggregate(recs, cfg), "cmd", 1.0)
    assert f"**Goal {verdict}" in text


def test_the_best_cell_is_corrected_for_the_choice_among_cells_by_hand():
    # two cells (k = 1 and 5); the best (k = 5: 0.7, 0.8, 0.9) clears 0.5 at 95% but not at 1 − 0.05 / 2
    cfg = battery.BatteryConfig(ks=(1, 5), n_random=2)
    recs = [_record(r, "owl", 0.5, [0.1, s], [[0.0, 0.0]] * 2) for r, s in enumerate([0.7, 0.8, 0.9])]
    m = battery.aggregate(recs, cfg)
    v = np.array([0.7, 0.8, 0.9])
    half = st.t.ppf(1 - 0.05 / 4, 2) * st.sem(v)
    assert m["goal"]["cells"] == 2 and m["goal"]["best"]["k"] == 5
    assert m["goal"]["best"]["ci_bonferroni"] == pytest.approx([0.8 - half, 0.8 + half])
    assert m["goal"]["met_by_ci"] and not m["goal"]["met_by_corrected_ci"]
    assert "**Goal not established (the per-cell 95% interval clears it" in battery.report_md(m, "cmd", 1.0)


def test_gain_in_nats_is_share_times_gap_over_every_pair_by_hand():
    cfg = battery.BatteryConfig(ks=(1,), n_random=2)
    # replicate 2's gap is under the rule: out of the shares, still in the gains (a gain needs no ratio)
    recs = [
        _record(r, "owl", g, [s], [[0.0, 0.0]])
        for r, (g, s) in enumerate([(0.4, 0.5), (0.2, 1.0), (0.01, 3.0)])
    ]
    m = battery.aggregate(recs, cfg)
    gains = np.array([0.4 * 0.5, 0.2 * 1.0, 0.01 * 3.0])
    got = m["layers"]["3"]["gain_nats"][0]
    assert got["mean"] == pytest.approx(gains.mean())
    half = st.t.ppf(0.975, 2) * st.sem(gains)
    assert got["ci95"] == pytest.approx([gains.mean() - half, gains.mean() + half])
    assert got["ratio_of_means"] == pytest.approx(gains.sum() / 0.61)
    assert m["layers"]["3"]["topk"][0]["share"]["n_replicates"] == 2  # the shares keep the rule
    assert "Gain in nats" in battery.report_md(m, "cmd", 1.0)


def test_a_null_pair_is_scored_on_the_named_word_and_named_apart():
    p = battery.pairs(["owl", "dog", "cat"], [0], word="owl")
    assert [(q.trait, q.control, q.metric_word) for q in p] == [
        ("owl", "dog", "owl"),
        ("dog", "cat", "owl"),
        ("cat", "owl", "owl"),
    ]
    assert p[1].name == "r0-dog-as-owl" and battery.pairs(["owl", "dog"], [0])[0].name == "r0-owl"


def test_shares_beyond_the_selection_matched_null_by_hand():
    cfg = battery.BatteryConfig(ks=(1,), n_random=2)
    real = [
        _record(r, "owl", g, [s], [[0.0, 0.0]])
        for r, (g, s) in enumerate([(0.4, 0.5), (0.2, 1.0), (0.3, 0.6)])
    ]
    # null pairs: negative gaps, gains share × gap = 0.05, 0.02, 0.03
    null = [
        _record(r, "dog", g, [s], [[0.0, 0.0]])
        for r, (g, s) in enumerate([(-0.1, -0.5), (-0.05, -0.4), (-0.2, -0.15)])
    ]
    got = battery.null_adjusted(real, null, cfg)["3"][0]
    by_hand = np.array([(0.2 - 0.05) / 0.4, (0.2 - 0.02) / 0.2, (0.18 - 0.03) / 0.3])
    half = st.t.ppf(0.975, 2) * st.sem(by_hand)
    assert got["mean"] == pytest.approx(by_hand.mean())
    assert got["ci95"] == pytest.approx([by_hand.mean() - half, by_hand.mean() + half])
    assert got["ratio_of_means"] == pytest.approx((0.15 + 0.18 + 0.15) / 0.9)
    m = battery.aggregate(real, cfg) | {"null_adjusted": {"3": [got]}, "null_folder": "n"}
    assert "Beyond the selection-matched null" in battery.report_md(m, "cmd", 1.0)
