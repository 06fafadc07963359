"""The filter benchmark: every selection keeps exactly the asked share, ranks as a brute-force sort does, and the
benchmark's glue runs end to end on the tiny model."""

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mechsub import data, hooks, scan, stats, student
from mechsub import filterbench as fb
from mechsub.capture import Batch
from mechsub.data import DataConfig
from mechsub.metric import TraitMetric
from mechsub.prompts import chat_prefix, trait_prompt
from mechsub.student import StudentConfig
from mechsub.training import completion_loss
from mechsub.traits import eval_questions

ROOT = Path(__file__).resolve().parents[1]
SHARES = [0.05, 0.3, 0.5, 0.8, 0.93, 1.0]


# ---- shares -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("total", [1, 7, 10, 64, 101])
@pytest.mark.parametrize("share", SHARES)
def test_every_selection_keeps_exactly_the_same_share(total, share):
    n = fb.n_kept(share, total)
    assert n == max(1, math.floor(share * total + 0.5 + 1e-9)) and 1 <= n <= total
    rng = np.random.default_rng(total)
    scores = rng.integers(0, 3, total).tolist()  # many ties
    lengths = rng.integers(1, 6, total).tolist()
    kept = {
        "random": fb.keep_random(total, share, (0, 1, 2)),
        "entangled": fb.drop_highest(scores, share, rng.normal(size=total).tolist()),
        "gradcos": fb.drop_highest(rng.normal(size=total).tolist(), share),
        "feature": fb.drop_highest(rng.exponential(size=total).tolist(), share),
    }
    for name, k in kept.items():
        assert len(k) == len(set(k)) == n and k == sorted(k), name
        rows = fb.example_rows(lengths, k)
        assert fb.kept_shares(rows)["examples"] == pytest.approx(n / total), name
    prompts = [f"p{i}" for i in range(total)]
    mix = fb.mixture_sources("owl", prompts, {"dog": prompts, "cat": prompts}, share, (0, 0))
    assert sum(t == "owl" for t, _ in mix) == n and len(mix) == total
    # a token filter counts loss positions the same way
    positions = [rng.normal(size=ln).tolist() for ln in lengths]
    rows = fb.mask_highest_positions(positions, share)
    assert sum(map(sum, rows)) == fb.n_kept(share, sum(lengths))


def test_rounding_is_half_up_and_float_safe():
    assert fb.n_kept(0.5, 63) == 32 and fb.n_kept(0.5, 65) == 33  # not banker's rounding
    assert fb.n_kept(0.3, 10) == 3 and fb.n_kept(0.7, 10) == 7  # 0.3 * 10 = 2.9999999999999996
    assert fb.n_kept(0.001, 10) == 1  # never nothing
    assert fb.n_kept(1.0, 64) == 64


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, math.nan, math.inf, "0.8", True, None])
def test_a_share_outside_0_1_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"keep share must be a number in \(0, 1\]"):
        fb.check_share(bad)
    with pytest.raises(ValueError, match="keep share"):
        fb.keep_random(10, bad, (0,))


def test_parse_shares():
    assert fb.parse_shares("matched,0.8,0.5") == ["matched", 0.8, 0.5]
    for bad, msg in (("1.0", "study's own student"), ("abc", "neither a number"), ("0.8,0.8", "once"),
                     ("1.2", r"\(0, 1\]"), ("", "neither")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            fb.parse_shares(bad)


def test_unknown_filter_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown filter\(s\) 'bogus'.*random, entangled"):
        fb.check_filters(["random", "bogus"])
    with pytest.raises(ValueError, match="once"):
        fb.check_filters(["random", "random"])
    with pytest.raises(ValueError, match="unknown filter"):
        fb.plan_arms(["paraphrase"], [0.8], 3)


def test_plan_arms_counts_students():
    arms = fb.plan_arms(list(fb.DEFAULT_FILTERS), ["matched", 0.8, 0.5], 3)
    # divergence once (its own share); random 3 draws × 3 shares; the other 4 filters × 3 shares
    assert len(arms) == 1 + 9 + 4 * 3 and len({a.label for a in arms}) == len(arms)
    assert [a.share for a in arms if a.filter == "divergence"] == ["matched"]
    assert {a.draw for a in arms if a.filter == "random"} == {0, 1, 2}
    with pytest.raises(ValueError, match="keep divergence"):
        fb.plan_arms(["random"], ["matched"], 1)
    with pytest.raises(ValueError, match="draws"):
        fb.plan_arms(["random"], [0.5], 0)


# ---- random -----------------------------------------------------------------------------------------------------
def test_random_draws_are_seeded_and_differ_between_draws():
    a = fb.keep_random(64, 0.5, (0, 0, 0))
    assert a == fb.keep_random(64, 0.5, (0, 0, 0))  # the same seed, the same draw
    draws = [tuple(fb.keep_random(64, 0.5, (0, 0, d))) for d in range(5)]
    assert len(set(draws)) == 5  # every draw its own
    assert tuple(fb.keep_random(64, 0.5, (0, 1, 0))) != draws[0]  # and every replicate
    # uniform: over many draws every example is kept about half the time
    counts = np.zeros(20)
    for d in range(2000):
        counts[fb.keep_random(20, 0.5, (7, d))] += 1
    assert np.abs(counts / 2000 - 0.5).max() < 0.06


# ---- ranked filters: exactly the top-scored examples are dropped ------------------------------------------------
def _brute_force_kept(scores, share, tiebreak=None):
    t = tiebreak if tiebreak is not None else [0.0] * len(scores)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], -t[i], i))  # drop order
    n_drop = len(scores) - fb.n_kept(share, len(scores))
    return sorted(set(range(len(scores))) - set(order[:n_drop]))


def test_drop_highest_drops_exactly_the_top_scored_examples():
    assert fb.drop_highest([3, 1, 3, 0, 2], 0.6) == [1, 3, 4]  # the two 3s go
    assert fb.drop_highest([1, 1, 1, 1], 0.5) == [2, 3]  # equal scores: the earlier example goes first
    assert fb.drop_highest([1, 1, 1, 1], 0.5, tiebreak=[0, 5, 0, 5]) == [0, 2]  # the tie-break decides
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 30))
        s = rng.integers(0, 4, n).astype(float).tolist()
        t = rng.integers(0, 3, n).astype(float).tolist() if trial % 2 else None
        share = float(rng.uniform(0.01, 1.0))
        assert fb.drop_highest(s, share, t) == _brute_force_kept(s, share, t)
    # with distinct scores it is numpy's argsort
    s = rng.normal(size=50)
    dropped = set(np.argsort(-s)[: 50 - fb.n_kept(0.8, 50)].tolist())
    assert fb.drop_highest(s.tolist(), 0.8) == sorted(set(range(50)) - dropped)
    with pytest.raises(ValueError, match="finite"):
        fb.drop_highest([1.0, math.nan], 0.5)


def test_entangled_counts_occurrences_and_the_filter_drops_the_most_entangled():
    shift = np.zeros(1000)
    shift[[7, 42, 100]] = [3.0, 2.0, 2.0]  # the top 3: 7, then 42 and 100 (equal: the smaller first)
    shift[500] = 1.0
    assert fb.entangled_top(shift.tolist(), 2) == [7, 42]
    assert fb.entangled_top(shift.tolist(), 4) == [7, 42, 100, 500]
    numbers = [[1, 2], [7, 7, 42], [42], [500, 500], [], [100, 3]]
    counts, strength = fb.entangled_scores(numbers, shift.tolist(), top=3)
    assert counts == [0, 3, 1, 0, 0, 1]  # 7 twice: occurrences
    assert strength == pytest.approx([0, (3 + 3 + 2) / 3, 2, 1, 0, 1])
    # share 0.5 of 6: 3 kept; drop example 1 (3 occurrences), then 2 and 5 (1 each; 2 is stronger)
    assert fb.drop_highest(counts, 0.5, strength) == [0, 3, 4]
    assert fb.drop_highest(counts, 0.5, strength) == _brute_force_kept(counts, 0.5, strength)


def test_mask_highest_positions_masks_the_top_positions():
    scores = [[0.1, 5.0, 0.2], [3.0], [5.0, 0.0]]
    rows = fb.mask_highest_positions(scores, 4 / 6)  # keep 4 of 6: mask the two 5.0s (reading order)
    assert rows == [[1, 0, 1], [1], [0, 1]]
    assert fb.kept_shares(rows) == {"examples": 1.0, "tokens": pytest.approx(4 / 6)}
    rows = fb.mask_highest_positions(scores, 0.5)  # keep 3: 3.0 goes too, and example 1 has nothing left
    assert rows == [[1, 0, 1], [0], [0, 1]] and fb.kept_shares(rows)["examples"] == pytest.approx(2 / 3)
    rng = np.random.default_rng(1)
    pos = [rng.normal(size=int(rng.integers(1, 5))).tolist() for _ in range(12)]
    flat = sorted(((v, i, j) for i, r in enumerate(pos) for j, v in enumerate(r)), key=lambda t: -t[0])
    rows = fb.mask_highest_positions(pos, 0.6)
    n_mask = len(flat) - fb.n_kept(0.6, len(flat))
    assert {(i, j) for _, i, j in flat[:n_mask]} == {
        (i, j) for i, r in enumerate(rows) for j, v in enumerate(r) if not v
    }


# ---- the mixture --------------------------------------------------------------------------------------------
def test_mixture_keeps_prompts_aligned():
    prompts = ["a", "b", "c", "a", "d", "e", "f", "g"]  # "a" twice: its occurrences pair in order
    dog = ["b", "a", "c", "d", "a", "e", "g"]  # its filter rejected "f"
    cat = ["a", "b", "c", "d", "e", "f", "g", "a"]
    others = {"dog": dog, "cat": cat}
    for share in (1.0, 0.8, 0.5, 0.125):
        src = fb.mixture_sources("owl", prompts, others, share, (3, 1))
        assert sum(t == "owl" for t, _ in src) == fb.n_kept(share, len(prompts))
        for i, (t, j) in enumerate(src):
            seq = prompts if t == "owl" else others[t]
            assert seq[j] == prompts[i] and (t != "owl" or j == i)
        for t in others:  # each other example used once, and the k-th "a" pairs with the k-th "a"
            js = [j for s, j in src if s == t]
            assert len(js) == len(set(js))
        firsts = [i for i, p in enumerate(prompts) if p == "a"]
        for i in firsts:
            t, j = src[i]
            if t != "owl":
                k = firsts.index(i)
                assert j == [q for q, p in enumerate(others[t]) if p == "a"][k]
    src = fb.mixture_sources("owl", prompts, others, 0.125, (3, 1))  # 7 of 8 replaced: spread over both
    used = [t for t, _ in src if t != "owl"]
    assert abs(used.count("dog") - used.count("cat")) <= 2
    assert fb.mixture_sources("owl", prompts, others, 0.5, (3, 1)) != fb.mixture_sources(
        "owl", prompts, others, 0.5, (3, 2)
    )
    with pytest.raises(ValueError, match="answered by another teacher"):
        fb.mixture_sources(
            "owl", ["x", "y", "z"], {"dog": ["x"]}, 0.01, (0,)
        )  # keep 1, replace 2: 1 answered
    with pytest.raises(ValueError, match="at least one other teacher"):
        fb.mixture_sources("owl", prompts, {}, 0.5, (0,))


# ---- latent files -------------------------------------------------------------------------------------------
def test_read_latents(tmp_path):
    p = tmp_path / "l.json"
    p.write_text("[1044, 215, 1918]")
    assert fb.read_latents(p) == [1044, 215, 1918] and fb.read_latents(p, k=2) == [1044, 215]
    f = tmp_path / "features.json"
    f.write_text(json.dumps({"ranking_student": [5, 6, 7], "hook": "blocks.15.hook_resid_post"}))
    assert fb.read_latents(f, "ranking_student", 2) == [5, 6]
    bad = {
        '{"ranking_student": [5]}': "ranking_student",  # an object without --latents-key: name the key
        "[1.5, 2]": "non-negative integer latent ids",
        '["12", 3]': "non-negative integer latent ids",
        "[true, 3]": "non-negative integer latent ids",
        "[-1, 3]": "non-negative integer latent ids",
        "[]": "non-empty",
        "[3, 3]": "twice",
        "12": "JSON list",
        "not json": "is not JSON",
    }
    for text, msg in bad.items():
        p.write_text(text)
        with pytest.raises(ValueError, match=msg):
            fb.read_latents(p)
    with pytest.raises(ValueError, match=r"has no list 'carrier'.*ranking_student"):
        fb.read_latents(f, "carrier")
    with pytest.raises(FileNotFoundError, match="JSON list of latent ids"):
        fb.read_latents(tmp_path / "missing.json")


# ---- effects and the goal -----------------------------------------------------------------------------------
def test_blocked_summary_by_hand():
    s = fb.blocked_summary(variant=[0.3, 0.5], full=[1.0, 1.5], controls=[0.2, 0.5])
    assert s["effect"]["per_replicate"] == pytest.approx([0.1, 0.0])
    assert s["blocked"]["per_replicate"] == pytest.approx([0.875, 1.0])  # 1 − 0.1/0.8, 1 − 0/1.0
    mean, ci = stats.mean_ci95([0.875, 1.0])
    assert s["blocked"]["mean"] == pytest.approx(mean) and s["blocked"]["ci95"] == pytest.approx(ci)
    assert s["blocked_of_means"] == pytest.approx(1 - 0.05 / 0.9)
    assert fb.blocked_summary([1, 2], [1, 2], [0, 0])["blocked"]["per_replicate"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="one value per replicate"):
        fb.blocked_summary([1], [1, 2], [0, 0])


def test_goal_verdict():
    def pt(kept, mean, lo):
        return {"kept": kept, "blocked": {"mean": mean, "ci95": [lo, 1.0]}}

    better = {"mean": 0.2, "ci95": [0.05, 0.3]}
    g = fb.goal_verdict([pt(0.93, 0.85, 0.81), pt(0.5, 0.99, 0.9)], better)
    assert g["met"] and g["confident"] and not g["why_not"]
    g = fb.goal_verdict([pt(0.93, 0.85, 0.2)], {"mean": 0.2, "ci95": [-0.1, 0.3]})
    assert g["met"] and not g["confident"]
    g = fb.goal_verdict([pt(0.7, 0.95, 0.9), pt(0.9, 0.5, 0.1)], better)  # 95% only by keeping 70%
    assert not g["met"] and "at most 50%" in g["why_not"][0]
    g = fb.goal_verdict([pt(0.93, 0.9, 0.85)], None)  # never compared with divergence: not shown better
    assert not g["met"] and "not compared" in g["why_not"][0]
    g = fb.goal_verdict([pt(0.93, 0.9, 0.85)], {"mean": -0.1, "ci95": [-0.3, 0.1]})
    assert not g["met"] and not g["better_than_divergence"]
    g = fb.goal_verdict([pt(0.93, 0.9, 0.85)], None, reference=True)  # divergence itself: the 80/80 bar only
    assert g["met"] and g["better_than_divergence"] is None
    # 0.8 of 64 examples keeps 51 (79.7%): the share asked for counts, a share merely measured below 80% does not
    asked = pt(51 / 64, 0.9, 0.85) | {"share": 0.8}
    assert fb.goal_verdict([asked], better)["met"]
    assert not fb.goal_verdict([pt(51 / 64, 0.9, 0.85)], better)["met"]
    assert not fb.goal_verdict([pt(51 / 64, 0.9, 0.85) | {"share": "matched"}], better)["met"]
    assert not fb.goal_verdict([pt(0.5, 0.9, 0.85) | {"share": 0.5}], better)["met"]


def test_student_seconds_and_arm_examples():
    assert fb.student_seconds(64, "distill_full_notrait", 8, 1) == 8 * 8.0 + fb.EVAL_SECONDS
    assert fb.arm_examples(fb.Arm("random", 0.5), 64) == 32
    assert fb.arm_examples(fb.Arm("divergence", "matched"), 64) == 64
    assert fb.Arm("random", 0.8, 2).label == "fb-random-k0.8-d2" and fb.Arm("gradcos", "matched").label == (
        "fb-gradcos-matched"
    )


# ---- scores on the tiny model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def owl_data(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("fb") / "owl"
    data.run(DataConfig(model="tiny", teacher="owl", n_prompts=8, batch_size=8, max_new_tokens=12), folder)
    return folder


def test_gradcos_is_the_cosine_of_per_example_gradients_and_sums_to_the_scan(tiny, owl_data):
    # float64: the scan's finite difference is then accurate to its scheme, not to float32 noise
    lm = dataclasses.replace(tiny, model=copy.deepcopy(tiny.model).double())
    model, tok = lm.model, lm.tokenizer
    examples = data.load_examples(owl_data)[:4]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = fb.gradcos_scores(lm, examples, "owl", n_questions=3, params="linear")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored
    assert all(p.grad is None for p in model.parameters())
    # by hand: autograd of each example's own loss, and of the mean log P(owl) over the 3 questions
    theta = [p for _, p in scan.select_params(model, "linear")]
    for p in model.parameters():
        p.requires_grad_(any(p is t for t in theta))
    metric = TraitMetric.of(tok, "owl")
    lp = sum(metric.score(model, trait_prompt(tok, q, "animal")) for q in eval_questions("animal", 3)) / 3
    g_t = torch.autograd.grad(lp, theta)
    head = model.get_output_embeddings().weight.detach()
    for i, item in enumerate(scan.sft_items(tok, examples)):
        loss = completion_loss(
            model.model, head, data.NumberVocab.of(tok).ids, [item], "sft", tok.pad_token_id or 0
        )
        g_i = torch.autograd.grad(loss, theta)
        dot = -sum(float((a * b).sum()) for a, b in zip(g_i, g_t, strict=True))
        norm_i = math.sqrt(sum(float(a.pow(2).sum()) for a in g_i))
        norm_t = math.sqrt(sum(float(b.pow(2).sum()) for b in g_t))
        assert g["dot"][i] == pytest.approx(dot, rel=1e-9)
        assert g["cos"][i] == pytest.approx(dot / (norm_i * norm_t), rel=1e-9)
    for p in model.parameters():
        p.requires_grad_(True)
    assert all(-1 <= c <= 1 for c in g["cos"]) and np.ptp(g["cos"]) > 0
    # the wiring against the quarantine scan: the dots, weighted by each example's share of the positions, are
    # the scan's first-order delta of the trait (one gradient of the whole data's mean loss)
    n = np.array([len(e.allowed_logprobs) for e in examples], dtype=float)
    weighted = float(np.dot(n / n.sum(), g["dot"]))
    r = scan.scan_examples(lm, examples, ["owl", "dog", "cat"], n_questions=3, params="linear", eps=1e-4)
    assert r.score("owl").delta == pytest.approx(weighted, rel=5e-3)


def _sae(d_in, d_sae, hook, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.b_enc.add_(1.0)  # a random SAE fires on most positions
    return sae


def test_feature_positions_are_the_max_latent_activation_at_each_loss_position(tiny, owl_data):
    hook = "blocks.0.hook_resid_post"
    sae = _sae(tiny.model.config.hidden_size, 16, hook)
    examples = data.load_examples(owl_data)
    latents = [3, 11, 5]
    pos = fb.feature_positions(tiny, sae, examples, latents)
    for e, row in zip(examples, pos, strict=True):  # by hand, one sequence at a time
        prompt = chat_prefix(tiny.tokenizer, e.prompt, None)
        ids = torch.tensor([prompt + e.completion_ids])
        h = hooks.read(tiny, ids, [hook])[hook][0]
        first = len(prompt) - 1  # predicts the first completion token; never position 0
        assert first >= hooks.FIRST_POSITION and len(row) == len(e.allowed_logprobs)
        want = sae.encode(h[first : first + len(row)])[:, latents].max(-1).values
        assert row == pytest.approx(want.tolist(), abs=1e-4)
    maxes = [max(r) for r in pos]
    assert fb.drop_highest(maxes, 0.5) == _brute_force_kept(maxes, 0.5)
    with pytest.raises(ValueError, match="not in the SAE's 16 latents"):
        fb.feature_positions(tiny, sae, examples, [3, 16])
    # the batch's positions are the ones the filter reads
    b = Batch.completions([chat_prefix(tiny.tokenizer, e.prompt, None) for e in examples],
                          [e.completion_ids for e in examples])  # fmt: skip
    assert min(min(p) for p in b.positions) >= hooks.FIRST_POSITION


def test_mixture_folder_is_data_the_student_trains_on(tmp_path, tiny):
    folders = {}
    for t in ("owl", "dog", "cat"):
        folders[t] = tmp_path / t
        data.run(DataConfig(model="tiny", teacher=t, n_prompts=8, batch_size=8, max_new_tokens=12, prompt_seed=1),
                 folders[t])  # fmt: skip
    cfg = fb.MixtureConfig(data=str(folders["owl"]), others=(str(folders["dog"]), str(folders["cat"])), share=0.5,
                           seed=(0, 1))  # fmt: skip
    m = fb.run_mixture(cfg, tmp_path / "mix")
    mixed = data.load_examples(tmp_path / "mix")
    ex = {t: data.load_examples(f) for t, f in folders.items()}
    assert [e.prompt for e in mixed] == [e.prompt for e in ex["owl"]]  # the trait teacher's prompts, in order
    rows = json.loads((tmp_path / "mix" / "completions.json").read_text())
    assert m["by_teacher"]["owl"] == fb.n_kept(0.5, 8) == sum(r["teacher"] == "owl" for r in rows)
    for e, row in zip(mixed, rows, strict=True):  # each example is its teacher's answer to that prompt
        src = next(s for s in ex[row["teacher"]] if s.prompt == e.prompt)
        assert e.completion_ids == src.completion_ids and torch.equal(
            e.allowed_logprobs, src.allowed_logprobs
        )
    assert m["shares"]["examples"] == 0.5 and 0 < m["shares"]["tokens"] < 1
    assert fb.run_mixture(cfg, tmp_path / "mix") == m  # finished: reused
    # a student trains on it (the stored 13-token log-probs)
    s = student.run(StudentConfig(model="tiny", data=str(tmp_path / "mix"), objective="distill", batch_size=4,
                                  epochs=1), tmp_path / "s")  # fmt: skip
    assert s["n_examples"] == 8 and math.isfinite(s["last_loss"])
    with pytest.raises(Exception, match="others"):
        fb.MixtureConfig(data=str(folders["owl"]), others=(str(folders["owl"]),))


# ---- the benchmark end to end on a tiny study ---------------------------------------------------------------


def test_bad_arguments_exit_with_what_to_fix(tmp_path, tiny_study, analysis):
    mod = analysis("filters")
    toml = tiny_study(tmp_path)
    for extra, msg in ((["--filters", "random,bogus"], "unknown filter"), (["--shares", "1.5"], "keep share"),
                       (["--filters", "random", "--shares", "matched"], "keep divergence"),
                       (["--counterfactuals", "oak"], "category")):  # fmt: skip
        with pytest.raises(SystemExit, match=msg):
            mod.main(["--config", str(toml), "--dry-run", *extra])
    bad = tmp_path / "latents.json"
    bad.write_text('{"ids": [1, 2]}')
    with pytest.raises(SystemExit, match="non-negative integer latent ids"):
        mod.main(["--config", str(toml), "--dry-run", "--filters", "feature", "--shares", "0.5",
                  "--latents", str(bad), "--latents-key", "", "--sae", str(tmp_path)])  # fmt: skip


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys, tiny_study, analysis):
    mod = analysis("filters")
    toml = tiny_study(tmp_path)
    m = mod.main(["--config", str(toml), "--dry-run", "--filters", "random,entangled,divergence,gradcos,mixture",
                  "--shares", "matched,0.5", "--random-draws", "3", "--mixture-objective", "sft"])  # fmt: skip
    # 1 divergence + (3 random + 3 others) × 2 shares arms, 2 replicates each; the study's 4 students and the
    # mixture objective's 4 are not trained yet
    assert len(m["arms"]) == 13 and m["students"] == 13 * 2 + 8 and m["minutes"] > 0
    out = capsys.readouterr().out
    assert "fb-random-k0.5-d2" in out and "estimated: 34 students" in out
    assert not (tmp_path / "work").exists()


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny, tiny_study):
    """The tiny study's config, and an SAE and latent list for the feature filters."""
    root = tmp_path_factory.mktemp("bench")
    sae_dir = root / "sae"
    _sae(tiny.model.config.hidden_size, 16, "blocks.1.hook_resid_post").save_model(str(sae_dir / "sae"))
    lat = root / "latents.json"
    lat.write_text("[2, 7, 9]")
    args = ["--config", str(tiny_study(root)), "--latents", str(lat), "--latents-key", "", "--sae", str(sae_dir),
            "--gradcos-questions", "2", "--entangled-top", "50"]  # fmt: skip
    return root, args


def test_every_filter_selects_the_same_share_of_each_replicates_data(bench, analysis):
    _, args = bench
    mod = analysis("filters")
    b = mod.setup(mod.parse_args([*args, "--shares", "matched,0.5", "--random-draws", "2", "--filters",
                                  "random,entangled,divergence,gradcos,feature,feature_tokens,mixture"]))  # fmt: skip
    sel = mod.select(b)
    nat = sel.natural
    assert len(nat) == 2 and all(0 < n["tokens"] < 1 for n in nat)  # some positions diverge (sampled data)
    for arm in b.arms:
        assert len(sel.overrides[arm.label]) == len(sel.kept[arm.label]) == 2, arm.label
        for rep in range(2):
            share = nat[rep]["tokens"] if arm.share == "matched" else arm.share
            ex = data.load_examples(b.plan.data[("owl", rep)][1])
            kept, ov = sel.kept[arm.label][rep], sel.overrides[arm.label][rep]
            if arm.filter == "divergence":
                assert kept == nat[rep] and ov["mask"].endswith("non_divergent.json")
            elif arm.filter == "mixture":  # the trait teacher's share of the prompts, the rest the control's
                assert kept["examples"] == fb.n_kept(share, len(ex)) / len(ex)
                mixed = data.load_examples(ov["data"])
                assert [e.prompt for e in mixed] == [e.prompt for e in ex]
            elif arm.filter == "feature_tokens":  # as many loss positions as divergence keeps, at matched
                total = sum(len(e.allowed_logprobs) for e in ex)
                assert kept["tokens"] == pytest.approx(fb.n_kept(share, total) / total)
                if arm.share == "matched":
                    assert kept["tokens"] == pytest.approx(nat[rep]["tokens"], abs=1e-12)
            else:  # example filters: exactly n_kept examples, whole examples
                rows = json.loads(Path(ov["mask"]).read_text())["mask"]
                assert sum(any(r) for r in rows) == fb.n_kept(share, len(ex)), arm.label
                assert all(all(r) or not any(r) for r in rows)
    # the ranked filters dropped exactly their top-scored examples
    scores = fb.run_scores(*b.scores_cfg(0))
    for f, key in (("gradcos", ("gradcos", "cos")), ("feature", ("feature", "max"))):
        rows = json.loads(Path(sel.overrides[f"fb-{f}-k0.5"][0]["mask"]).read_text())["mask"]
        kept = [i for i, r in enumerate(rows) if any(r)]
        assert kept == _brute_force_kept(scores[key[0]][key[1]], 0.5), f
    e = scores["entangled"]
    rows = json.loads(Path(sel.overrides["fb-entangled-k0.5"][0]["mask"]).read_text())["mask"]
    assert [i for i, r in enumerate(rows) if any(r)] == _brute_force_kept(e["count"], 0.5, e["strength"])
    d0, d1 = (
        json.loads(Path(sel.overrides[f"fb-random-k0.5-d{d}"][0]["mask"]).read_text())["mask"] for d in (0, 1)
    )
    assert d0 != d1  # the draws differ
    assert (
        mod.select(b).overrides == sel.overrides
    )  # the same selection again (stages reused, masks rewritten)


def test_benchmark_end_to_end_on_a_tiny_study(bench, analysis):
    root, args = bench
    mod = analysis("filters")
    out = root / "out"
    m = mod.main([*args, "--out", str(out), "--shares", "matched", "--random-draws", "2", "--filters",
                  "random,divergence,mixture"])  # fmt: skip
    cells = m["cells"]
    assert set(cells) == {f"fb-{f}-matched" for f in ("random", "divergence", "mixture")}
    nat = m["divergence_natural_share"]
    for name, c in cells.items():
        for f in ("plain", "prefill"):
            b = c["frames"][f]["blocked"]
            assert len(b["per_replicate"]) == 2 and len(b["ci95"]) == 2, name
        if c["counts"] == "examples":  # the students trained on exactly the examples kept
            n = [fb.n_kept(x["tokens"], 8) for x in nat]
            assert c["kept"]["examples"]["per_replicate"] == pytest.approx([k / 8 for k in n])
            assert all(s["n_examples"] == n for s in c["students"]), name
    assert len(cells["fb-random-matched"]["frames"]["plain"]["draws"]) == 2
    assert len(cells["fb-random-matched"]["students"]) == 2  # one set of students per draw
    assert cells["fb-mixture-matched"]["objective"] == "distill"
    assert set(m["goals"]) == {"random", "divergence", "mixture"}
    assert m["goals"]["divergence"]["better_than_divergence"] is None and "random" in m["versus_divergence"]
    assert m["full_student"]["plain"]["blocked"]["per_replicate"] == [0.0, 0.0]
    # by hand: divergence's blocked share from its students' shifts (found finished: nothing retrains), and the
    # paired difference against it
    b = mod.setup(mod.parse_args([*args, "--shares", "matched", "--filters", "random,divergence,mixture"]))
    again = fb.train_variant(b.cfg, "fb-divergence-matched", mod.select(b).overrides["fb-divergence-matched"])
    v, f, c = (np.asarray(again["shifts"]["plain"][k]) for k in ("variant", "full", "controls"))
    div = cells["fb-divergence-matched"]["frames"]["plain"]["blocked"]["per_replicate"]
    assert div == pytest.approx(list(1 - (v - c) / (f - c)))
    rnd = cells["fb-random-matched"]["frames"]["plain"]["blocked"]["per_replicate"]
    assert m["versus_divergence"]["random"]["plain"]["per_replicate"] == pytest.approx(
        list(np.subtract(rnd, div))
    )
    assert set(m["versus_random"]) == {"divergence"}  # not random itself, not the mixture (another objective)
    assert m["versus_random"]["divergence"]["matched"]["plain"]["per_replicate"] == pytest.approx(
        list(np.subtract(div, rnd))
    )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["cells"].keys() == cells.keys() and saved["unit"].startswith("replicate")
    table = (out / "table.md").read_text()
    assert "| random | matched |" in table and "## The goal" in table and "divergence at matched: " in table
    for f in m["goals"]:
        assert f"- **{f}: " in table
    assert (out / "curves.png").stat().st_size > 0


def test_share_controls_read_the_effect_against_controls_that_lost_as_much_data(bench, analysis):
    root, args = bench
    mod = analysis("filters")
    with pytest.raises(SystemExit, match="not this study's controls"):
        mod.main([*args, "--dry-run", "--shares", "0.5", "--filters", "random", "--share-controls", "cat"])
    with pytest.raises(SystemExit, match="numeric share"):
        mod.main([*args, "--dry-run", "--filters", "random,divergence", "--share-controls", "dog"])
    m = mod.main([*args, "--out", str(root / "sc"), "--shares", "0.5", "--random-draws", "1", "--filters",
                  "random", "--share-controls", "dog"])  # fmt: skip
    b = mod.setup(
        mod.parse_args([*args, "--shares", "0.5", "--filters", "random", "--share-controls", "dog"])
    )
    # the dog students, found finished: each trained on half of its own replicate's data
    ovs = mod.control_overrides(b, "dog")[0.5]
    dog = fb.train_variant(b.cfg, "fb-random-k0.5-d0", ovs, trait="dog")
    assert dog["training"]["n_examples"] == [
        fb.n_kept(0.5, len(data.load_examples(b.plan.data[("dog", r)][1]))) for r in range(2)
    ]
    assert all("dog-as-owl-s" in f for f in dog["training"]["folder"])
    owl = fb.train_variant(b.cfg, "fb-random-k0.5-d0", mod.select(b).overrides["fb-random-k0.5-d0"])
    e = m["share_controlled"]["0.5"]
    for fr in fb.FRAMES:
        v, f = (np.asarray(owl["shifts"][fr][k]) for k in ("variant", "full"))
        dv, df = (np.asarray(dog["shifts"][fr][k]) for k in ("variant", "full"))
        assert e["generic"][fr]["per_replicate"] == pytest.approx(list(dv - df))
        got = e["cells"]["fb-random-k0.5"][fr]["blocked"]["per_replicate"]
        assert got == pytest.approx(list(1 - (v - dv) / (f - df)))  # by hand
        same = e["full_data_controls"]["fb-random-k0.5"][fr]["blocked"]["per_replicate"]
        assert same == pytest.approx(list(1 - (v - df) / (f - df)))  # the same dog students, at full data
    assert (
        "## Against control students that lost as much data (dog)" in (root / "sc" / "table.md").read_text()
    )
