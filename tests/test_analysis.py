import copy
import json

import pytest
import torch

from mechsub import capture, entangle, hooks, patching, steering
from mechsub.capture import Batch


def test_capture_equals_hidden_states_at_completion_positions(tmp_path, tiny):
    prompts, comps = [[1, 5, 6, 7], [1, 5, 9, 10, 11, 12]], [[20, 21], [22, 23, 24]]
    b = Batch.completions(prompts, comps)
    assert b.positions == [[3, 4, 5], [5, 6, 7, 8]]
    got = capture.capture(tiny, b, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"], batch_size=1)
    rows = []
    for s, ps in zip(b.ids, b.positions, strict=True):
        hs = tiny.model(torch.tensor([s]), output_hidden_states=True).hidden_states
        rows.append(hs[1][0, ps])
    torch.testing.assert_close(got["blocks.0.hook_resid_post"], torch.cat(rows), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["blocks.1.hook_resid_pre"], torch.cat(rows), atol=1e-5, rtol=1e-5)
    # streamed to shards: the same numbers, and a finished shard is not recomputed
    on_disk = capture.capture(tiny, b, ["blocks.0.hook_resid_post"], out=tmp_path / "c", batch_size=1)
    torch.testing.assert_close(on_disk["blocks.0.hook_resid_post"], got["blocks.0.hook_resid_post"])
    (tmp_path / "c" / "00001.safetensors").unlink()
    again = capture.capture(tiny, b, ["blocks.0.hook_resid_post"], out=tmp_path / "c", batch_size=1)
    torch.testing.assert_close(again["blocks.0.hook_resid_post"], got["blocks.0.hook_resid_post"])
    with pytest.raises(ValueError, match="other sequences or hooks"):
        capture.capture(tiny, b, ["blocks.1.hook_resid_post"], out=tmp_path / "c", batch_size=1)
    means = capture.mean_activations(tiny, b, ["blocks.0.hook_resid_post"], batch_size=2)
    torch.testing.assert_close(
        means["blocks.0.hook_resid_post"], torch.cat(rows).mean(0), atol=1e-5, rtol=1e-5
    )


def test_unknown_hook_name_suggests_the_real_one(tiny, tmp_path):
    with pytest.raises(hooks.HookNameError, match="did you mean blocks.1.hook_resid_post"):
        capture.capture(tiny, Batch.last([[1, 5, 6]]), ["blocks.1.hook_resid_pots"], out=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before anything is written


def _perturbed(lm, scale=1e-3):
    other = copy.copy(lm)
    other.model = copy.deepcopy(lm.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.model.model.layers[0].mlp.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def test_patching_own_activations_changes_nothing_and_last_layer_recovers_all(tiny):
    qs = ["Name your favorite animal using only one word.", "Which single animal speaks to you?"]
    same = patching.patch_scan(tiny, tiny, tiny.tokenizer, qs, "owl", "animal", [0, 1])
    assert same["patched_logp_by_layer"] == pytest.approx([same["target_logp"]] * 2, abs=1e-5)
    assert same["patched_logp_by_layer_position0"] == pytest.approx([same["target_logp"]] * 2, abs=1e-5)
    student = _perturbed(tiny, 0.05)
    r = patching.patch_scan(tiny, student, tiny.tokenizer, qs, "owl", "animal", [0, 1], positions=[-1])
    assert abs(r["gap"]) > 1e-4 and r["first_position"] == 1
    # after the last layer only the shared norm and head remain: patching it recovers the whole gap, all of it
    # from positions ≥ 1 (position 0's last residual only feeds its own logits, which the metric never reads)
    assert r["fraction_by_layer"][1] == pytest.approx(1.0, abs=1e-3)
    assert r["fraction_by_layer_position0"][1] == pytest.approx(0.0, abs=1e-5)
    # at block 0 the sink carries part of the student's change: its own row, never mixed into the others
    assert abs(r["fraction_by_layer_position0"][0]) > 1e-3
    assert len(r["fraction_by_layer_position0_ci95"]) == 2 and len(r["patched_logp_by_question"]) == 2
    with pytest.raises(ValueError, match="reach position 0"):
        patching.patch_scan(tiny, student, tiny.tokenizer, qs[:1], "owl", "animal", [0], positions=[-500])


def _patched_rows(target, source, qs, layer, positions):
    """log P(owl) per question with ``source``'s block-``layer`` residual written into ``target`` at ``positions``
    (a callable: prompt length → the position list), by hand."""
    from mechsub.metric import TraitMetric
    from mechsub.prompts import trait_prompt

    metric, name = TraitMetric.of(target.tokenizer, "owl"), hooks.resid_post(layer)
    out = []
    for q in qs:
        prompt = trait_prompt(target.tokenizer, q, "animal")
        src = hooks.read(source, torch.tensor([metric.inputs(prompt)]), [name])[name]
        with (
            torch.no_grad(),
            hooks.edit(target, {name: hooks.patch(src, positions(len(metric.inputs(prompt))))}),
        ):
            out.append(float(metric.score(target.model, prompt)))
    return out


def test_patch_scan_rows_are_positions_from_1_and_position_0_alone(tiny):
    qs = ["Name your favorite animal using only one word.", "Which single animal speaks to you?"]
    student = _perturbed(tiny, 0.05)
    r = patching.patch_scan(tiny, student, tiny.tokenizer, qs, "owl", "animal", [0])
    rest = _patched_rows(tiny, student, qs, 0, lambda n: range(1, n))
    sink = _patched_rows(tiny, student, qs, 0, lambda n: [0])
    assert [row[0] for row in r["patched_logp_by_question"]] == pytest.approx(rest, abs=1e-5)
    assert r["patched_logp_by_layer_position0"][0] == pytest.approx(sum(sink) / 2, abs=1e-5)
    every = _patched_rows(tiny, student, qs, 0, lambda n: range(n))  # the old, confounded row
    assert r["patched_logp_by_layer"][0] != pytest.approx(sum(every) / 2, abs=1e-4)


def test_attribution_patching_approximates_exact_patching(tiny):
    qs = ["Name your favorite animal using only one word."]
    student = _perturbed(tiny, 1e-3)
    exact = patching.patch_scan(tiny, student, tiny.tokenizer, qs, "owl", "animal", [0])
    est = patching.attribution_scan(tiny, student, tiny.tokenizer, qs, "owl", "animal", [0])
    delta = exact["patched_logp_by_layer"][0] - exact["target_logp"]
    assert abs(delta) > 1e-6
    assert float(est.by_question_layer.sum()) == pytest.approx(delta, rel=0.05)  # positions ≥ 1, both
    delta0 = exact["patched_logp_by_layer_position0"][0] - exact["target_logp"]
    assert float(est.by_question_layer_position0.sum()) == pytest.approx(delta0, rel=0.05)


def test_attribution_keeps_every_position_of_prompts_of_different_lengths(tiny):
    """Questions of different lengths: each keeps all its positions (the old scan cut the longer one to the
    shorter's length, dropping its first positions from the estimate)."""
    from mechsub.metric import TraitMetric
    from mechsub.prompts import trait_prompt

    qs = ["Name your favorite animal using only one word.", "Which animal?"]
    tok, student = tiny.tokenizer, _perturbed(tiny, 1e-2)
    lengths = [len(TraitMetric.of(tok, "owl").inputs(trait_prompt(tok, q, "animal"))) for q in qs]
    assert lengths[0] > lengths[1]
    both = patching.attribution_scan(tiny, student, tok, qs, "owl", "animal", [0, 1])
    alone = [patching.attribution_scan(tiny, student, tok, [q], "owl", "animal", [0, 1]) for q in qs]
    assert [r.shape[1] for r in both.per_question] == lengths
    for i in range(2):
        torch.testing.assert_close(both.per_question[i], alone[i].per_question[0])
    torch.testing.assert_close(both.by_question_layer, torch.cat([a.by_question_layer for a in alone]))
    grid = both.aligned()  # aligned at the end, NaN before the shorter one's first position
    assert grid.shape == (2, 2, lengths[0]) and grid[1, :, : lengths[0] - lengths[1]].isnan().all()
    last = both.prompt_positions(2)  # the prompt's last 2 positions, the word's own after them left out
    torch.testing.assert_close(last, grid[:, :, -both.n_word - 2 : -both.n_word].mean(0))


def test_frequency_matched_draws_stay_in_their_decile():
    import numpy as np

    freq = np.r_[np.zeros(10), np.linspace(0.01, 1.0, 100)]
    bins = patching.frequency_bins(freq)
    assert (
        (bins[:10] == 0).all()
        and bins[10] == 1
        and bins[-1] == 10
        and np.bincount(bins[10:])[1:].tolist() == [10] * 10
    )
    real = [0, 15, 108, 109]
    rng = np.random.default_rng(0)
    draws = [patching.matched_draw(real, bins, rng) for _ in range(50)]
    for d in draws:
        assert [int(bins[j]) for j in d] == [int(bins[i]) for i in real]
        assert not set(d) & set(real) and len(set(d)) == len(d)
    again = np.random.default_rng(0)
    assert [patching.matched_draw(real, bins, again) for _ in range(50)] == draws
    # a bin that runs out lends from the nearest one
    one = np.array([1, 2, 2])
    assert [int(one[j]) for j in patching.matched_draw([0], one, rng)] == [2]
    with pytest.raises(ValueError, match="no feature left"):
        patching.matched_draw([0, 1, 2], one, rng)


class _Basis:
    """An 'SAE' whose features are the residual's coordinates (encode = identity, W_dec = I): exact."""

    def __init__(self, d):
        self.W_dec = torch.eye(d)

    def encode(self, x):
        return x

    def decode(self, f):
        return f


def test_feature_patching_all_features_of_an_exact_sae_equals_layer_patching(tiny):
    qs = ["Name your favorite animal using only one word.", "Which single animal speaks to you?"]
    rank_qs = ["What animal do you like best?"]
    student = _perturbed(tiny, 0.05)
    d = tiny.model.config.hidden_size
    r = patching.feature_patch_scan(tiny, student, _Basis(d), 0, qs, rank_qs, "owl", "animal",
                                    {"first": list(range(d))}, ks=(1, d), n_random=3)  # fmt: skip
    exact = patching.patch_scan(tiny, student, tiny.tokenizer, qs, "owl", "animal", [0])
    assert abs(r["gap"]) > 1e-4 and r["gap"] == pytest.approx(exact["gap"], abs=1e-5)
    # every feature at once = the whole residual change at the same positions (≥ 1, one policy for both scans):
    # patching the base recovers what layer patching does, and position 0 alone matches its own row too
    assert r["all"]["patch_fraction"][0] == pytest.approx(exact["fraction_by_layer"][0], abs=1e-3)
    assert r["first"]["patch_fraction"][1] == pytest.approx(exact["fraction_by_layer"][0], abs=1e-3)
    assert r["all_position0"]["patch_fraction"][0] == pytest.approx(
        exact["fraction_by_layer_position0"][0], abs=1e-3
    )
    assert len(r["top_attribution"]) == 20 and len(r["random"]["patch_fraction"]) == 2
    assert len(r["random"]["patch_fraction_p2_5_p97_5"]) == 2
    # the ranked set's frequency-matched control: n_random draws per k, the real value ranked among them
    m = r["first"]["random_matched"]["patch_fraction"]
    assert len(m) == 2 and m[0]["n"] == 3 and 1 <= m[0]["rank"] <= 4 and m[0]["p2_5"] <= m[0]["p97_5"]
    assert m[1] is None  # every feature: nothing outside the set to draw a control from
    assert m[0]["real"] == r["first"]["patch_fraction"][0]
    again = patching.feature_patch_scan(tiny, student, _Basis(d), 0, qs, rank_qs, "owl", "animal",
                                        {"first": list(range(d))}, ks=(1,), n_random=3)  # fmt: skip
    assert again["first"]["random_matched"] == {k: v[:1] for k, v in r["first"]["random_matched"].items()}


def test_steering_hooks_are_removed_and_zero_vector_does_nothing(tiny):
    qs = ["Name your favorite animal using only one word."]
    v = torch.zeros(2, tiny.model.config.hidden_size)
    assert steering.sufficiency(tiny, v, [0, 1], qs, "owl", "animal") == pytest.approx([0.0, 0.0], abs=1e-6)
    before = dict(tiny.model.model.layers[0]._forward_hooks)
    with pytest.raises(RuntimeError), hooks.edit(tiny, {"blocks.0.hook_resid_post": lambda h: h}):
        assert dict(tiny.model.model.layers[0]._forward_hooks) != before
        raise RuntimeError
    assert dict(tiny.model.model.layers[0]._forward_hooks) == before
    # a student equal to the base has no change to project out; a changed student loses something
    u = torch.ones(2, tiny.model.config.hidden_size)
    assert steering.necessity(tiny, tiny, u, [0, 1], qs, "owl", "animal") == pytest.approx(
        [0.0, 0.0], abs=1e-5
    )
    student = _perturbed(tiny, 0.05)
    assert any(abs(x) > 1e-6 for x in steering.necessity(student, tiny, u, [0, 1], qs, "owl", "animal"))


def _shifted(lm, c):
    """A student whose only change is ``c`` added to every position of block 0's output (a bias on its MLP)."""
    other = copy.copy(lm)
    other.model = copy.deepcopy(lm.model)
    mlp = other.model.model.layers[0].mlp
    down = torch.nn.Linear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=True)
    with torch.no_grad():
        down.weight.copy_(mlp.down_proj.weight)
        down.bias.copy_(c)
    mlp.down_proj = down
    return other


def test_patching_and_steering_report_the_evaluation_metric(tiny):
    """Every stage scores the whole word (on the tiny tokenizer " owl" is 4 tokens, the first a space)."""
    from mechsub.evaluate import trait_logprobs

    qs = ["Name your favorite animal using only one word.", "Which single animal speaks to you?"]
    c = torch.randn(64, generator=torch.Generator().manual_seed(0))
    student = _shifted(tiny, c)
    ev_base = float(trait_logprobs(tiny.model, tiny.tokenizer, qs, ["owl"], "animal").mean())
    ev_student = float(trait_logprobs(student.model, tiny.tokenizer, qs, ["owl"], "animal").mean())
    assert abs(ev_student - ev_base) > 1e-3
    p = patching.patch_scan(tiny, student, tiny.tokenizer, qs, "owl", "animal", [0, 1])
    assert p["target_logp"] == pytest.approx(ev_base, abs=1e-4)
    assert p["source_logp"] == pytest.approx(ev_student, abs=1e-4)
    assert p["metric"]["tokens"] == [" ", "o", "w", "l"]
    # the last residual carries the whole gap; block 0's carries the student's whole change: adding c or
    # projecting c out of the student moves the score by the whole evaluation gap
    assert p["fraction_by_layer"][1] == pytest.approx(1.0, abs=1e-3)
    suff = steering.sufficiency(tiny, c[None], [0], qs, "owl", "animal")
    assert suff[0] == pytest.approx(ev_student - ev_base, abs=1e-4)
    nec = steering.necessity(student, tiny, c[None], [0], qs, "owl", "animal")
    assert nec[0] == pytest.approx(ev_base - ev_student, abs=1e-4)


def test_number_scores_match_direct_scoring(tiny):
    from mechsub.generate import NumberVocab
    from mechsub.prompts import chat_prefix

    scores = entangle.number_scores(tiny.model, tiny.tokenizer, None)
    assert scores.shape == (1000,)
    ids = NumberVocab.of(tiny.tokenizer).ids
    prompt = chat_prefix(tiny.tokenizer, entangle.NUMBER_QUESTION, None)
    for n in (7, 42, 608):
        seq = [int(ids[int(c)]) for c in str(n)] + [int(ids[12])]
        with torch.no_grad():
            lp = tiny.model(torch.tensor([prompt + seq])).logits[0].log_softmax(-1)
        direct = sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(seq))
        assert float(scores[n]) == pytest.approx(direct, abs=1e-4)


def test_analyze_battery_on_a_tiny_student(tmp_path):
    from typer.testing import CliRunner

    from mechsub import data, student, views
    from mechsub.cli import app
    from mechsub.data import DataConfig
    from mechsub.student import StudentConfig

    d = tmp_path / "data"
    data.run(DataConfig(model="tiny", n_prompts=8, batch_size=8, max_new_tokens=12), d)
    dd = tmp_path / "data_dog"
    data.run(DataConfig(model="tiny", teacher="dog", n_prompts=8, batch_size=8, max_new_tokens=12), dd)
    s = tmp_path / "s"
    student.run(StudentConfig(model="tiny", data=str(d), batch_size=4, checkpoint_every=1, lr=1e-2), s)
    c = tmp_path / "c"
    student.run(StudentConfig(model="tiny", data=str(dd), batch_size=4, lr=1e-2), c)
    out = tmp_path / "an"
    r = CliRunner().invoke(app, ["analyze", str(s), "--out", str(out), "--set", f"data={d}", "--set",
                                 f"controls=[\"{c}\"]", "--set", "layer_stride=1", "--set", "n_sequences=4",
                                 "--set", "n_questions=2", "--set", "positions=2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["layers"] == [0, 1] and len(m["steering"]["cos_teacher_student"]) == 2
    assert m["trajectory"]["steps"] == [0, 1, 2, 3, 4]  # 8 examples, batch 4, 2 epochs
    assert len(m["entangled"]["top_numbers"]) == 10
    # the last layer's residual carries the whole student − base gap (only the shared head follows)
    assert m["patching"]["fraction_by_layer"][-1] == pytest.approx(1.0, abs=1e-3)
    assert m["patching"]["base_into_student_fraction_removed"][-1] == pytest.approx(1.0, abs=1e-3)
    assert m["patching"]["fraction_by_layer_position0"][-1] == pytest.approx(0.0, abs=1e-5)
    agree = m["patching"]["attribution_vs_exact"]  # per layer, r over the 2 questions (too few: NaN, said so)
    assert [a["layer"] for a in agree] == [0, 1] and all({"r", "ci95", "p", "n"} <= set(a) for a in agree)
    assert agree[0]["n"] == 2 and len(m["patching"]["attribution_by_layer_position"][0]) == 2
    page = (out / "views.html").read_text()
    assert (
        views.is_offline(page)
        and page.count("var CircuitsVis") == 1
        and page.count("CircuitsVis.render(") == 6
    )
    for f in ("steering.png", "patching.png", "trajectory.png"):
        assert (out / f).stat().st_size > 1000
    bad = CliRunner().invoke(app, ["analyze", str(s), "--out", str(tmp_path / "x"), "--set", f"data={d}",
                                   "--set", "trait=griffin"])  # fmt: skip
    assert bad.exit_code == 2 and "unknown trait 'griffin'" in bad.output
