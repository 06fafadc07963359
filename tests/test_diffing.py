import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as st

from mechsub import diffing, hooks
from mechsub.metric import TraitMetric, score_prompts

PROMPTS = [[1, 20, 21, 22, 23], [1, 30, 31, 32, 33, 34, 35], [1, 40, 41, 42]]
COMPS = [[50, 51, 52, 53, 54, 55], [60, 61], [70, 71, 72, 73]]


def _student(tiny):
    return copy.deepcopy(tiny)


def test_first_positions_follow_the_policy_and_never_read_bos():
    assert diffing.first_positions(5, 11, 3) == [4, 5, 6]
    assert diffing.first_positions(5, 6, 3) == [4, 5]  # a short completion reaches fewer positions
    with pytest.raises(ValueError, match="BOS"):
        diffing.first_positions(1, 5, 3)


def test_difference_gives_back_a_planted_shift(tiny):
    student = _student(tiny)
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with hooks.edit(student, {hooks.resid_post(0): lambda h: h + v}):
        d = diffing.activation_difference(tiny, student, PROMPTS, COMPS, [0, 1], n_first_tokens=4)
    for j in range(4):
        torch.testing.assert_close(d.delta[0, j], v, atol=1e-5, rtol=0)
    torch.testing.assert_close(d.mean(0), v, atol=1e-5, rtol=0)
    # the second row (7 + 2 tokens) reaches positions 6, 7, 8 only: 3 of the 4
    assert d.counts == (3, 3, 3, 2)
    assert not torch.allclose(d.delta[1, 0], v, atol=1e-2)  # the next block transforms it


def test_difference_equals_a_hand_computation_at_a_later_layer(tiny):
    student = _student(tiny)
    with torch.no_grad():
        student.model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    d = diffing.activation_difference(tiny, student, PROMPTS, COMPS, [1], n_first_tokens=3)
    name = hooks.resid_post(1)
    rows: list[list[torch.Tensor]] = [[], [], []]
    for p, c in zip(PROMPTS, COMPS, strict=True):
        ids = torch.tensor([p + c])
        hb, hs = hooks.read(tiny, ids, [name])[name][0], hooks.read(student, ids, [name])[name][0]
        for j in range(3):
            q = len(p) - 1 + j
            if q < len(p) + len(c):
                rows[j].append(hs[q] - hb[q])
    for j in range(3):
        torch.testing.assert_close(d.delta[0, j], torch.stack(rows[j]).mean(0), atol=1e-5, rtol=1e-4)


def test_a_change_at_position_0_alone_gives_no_difference(tiny):
    student = _student(tiny)

    def bos_only(h):
        h = h.clone()
        h[:, 0] += 100.0
        return h

    with hooks.edit(student, {hooks.resid_post(1): bos_only}):
        d = diffing.activation_difference(tiny, student, PROMPTS, COMPS, [1], n_first_tokens=3)
    assert d.delta.abs().max() < 1e-5


def _letters(tok, n=22):
    # single-token candidates: the tiny tokenizer has one token per character
    words = [chr(ord("a") + i) for i in range(n)]
    return [TraitMetric(w, (tok.convert_tokens_to_ids(w),), (w,)) for w in words]


def test_logit_lens_ranks_first_a_planted_unembedding_row(tiny):
    metrics = _letters(tiny.tokenizer)
    W = tiny.model.get_output_embeddings().weight.detach()
    gamma = tiny.model.model.norm.weight.detach()
    for m in metrics:
        planted = W[m.ids[0]] / gamma  # the final norm multiplies by gamma: undo it
        scores = dict(
            zip([x.word for x in metrics], diffing.logit_lens_scores(tiny, planted, metrics), strict=True)
        )
        assert diffing.rank_of(scores, m.word) == 1, m.word
        # relative to a base mean: the shift still names it
        mu = torch.randn(64, generator=torch.Generator().manual_seed(1))
        rel = diffing.logit_lens_scores(tiny, 20 * planted, metrics, base_mean=mu)
        assert diffing.rank_of(dict(zip([x.word for x in metrics], rel, strict=True)), m.word) == 1, m.word


def test_relative_lens_of_no_shift_is_zero(tiny):
    metrics = _letters(tiny.tokenizer)
    mu = torch.randn(64, generator=torch.Generator().manual_seed(2))
    assert max(map(abs, diffing.logit_lens_scores(tiny, torch.zeros(64), metrics, base_mean=mu))) < 1e-5


def test_steering_along_a_candidates_row_raises_it_most(tiny):
    metrics = _letters(tiny.tokenizer)[:6]
    prompts = [[1, 20, 21, 22], [1, 30, 31, 32, 33]]
    W = tiny.model.get_output_embeddings().weight.detach()
    target = metrics[3]
    out = diffing.steering_scores(tiny, W[target.ids[0]], 1, prompts, metrics, norms=[0.0, 50.0])
    assert out.shape == (2, 6)
    assert out[0].abs().max() < 1e-5  # norm 0: the unsteered base
    assert int(out[1].argmax()) == 3
    # the hook is gone afterwards
    torch.testing.assert_close(
        score_prompts(tiny.model, prompts, metrics), score_prompts(tiny.model, prompts, metrics)
    )


def test_centred_removes_the_replicate_mean_of_the_others():
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([3.0, 3.0])
    out = diffing.centred({("owl", 0): a, ("dog", 0): b, ("cat", 1): c})
    torch.testing.assert_close(out[("owl", 0)], a - b)
    torch.testing.assert_close(out[("dog", 0)], b - a)
    assert ("cat", 1) not in out  # alone in its replicate


def test_rank_is_pessimistic_on_ties():
    assert diffing.rank_of({"owl": 1.0, "dog": 1.0, "cat": 0.0}, "owl") == 2
    assert diffing.rank_of({"owl": 2.0, "dog": 1.0, "cat": 0.0}, "owl") == 1
    assert diffing.rank_of({"owl": -1.0, "dog": 1.0, "cat": 0.0}, "owl") == 3


def test_mean_rank_p_matches_a_hand_count():
    assert diffing.mean_rank_p([1], 22) == pytest.approx(1 / 22)
    assert diffing.mean_rank_p([2], 22) == pytest.approx(2 / 22)
    # two units, ranks (1, 2): sums ≤ 3 are (1,1), (1,2), (2,1)
    assert diffing.mean_rank_p([1, 2], 22) == pytest.approx(3 / 484)
    assert diffing.mean_rank_p([22, 22], 22) == pytest.approx(1.0)


def test_identification_against_a_hand_computed_case():
    cands = [chr(ord("a") + i) for i in range(18)] + ["owl", "dog", "cat", "lion"]
    rng = np.random.default_rng(0)

    def scores_with_rank(word, rank):
        vals = sorted(rng.normal(size=22), reverse=True)
        others = [c for c in cands if c != word]
        out = {word: vals[rank - 1]}
        out.update(zip(others, vals[: rank - 1] + vals[rank:], strict=True))
        return out

    planted = {("owl", 0): 1, ("dog", 0): 1, ("cat", 0): 3, ("lion", 0): 22}
    res = diffing.identification({u: scores_with_rank(u[0], r) for u, r in planted.items()})
    assert res["hits"] == 2 and res["n_units"] == 4 and res["chance"] == pytest.approx(1 / 22)
    q = 21 / 22
    assert res["p_binomial"] == pytest.approx(1 - q**4 - 4 * (1 / 22) * q**3)
    assert res["p_binomial"] == pytest.approx(st.binomtest(2, 4, 1 / 22, alternative="greater").pvalue)
    assert res["mean_rank"] == pytest.approx(27 / 4)
    assert res["ranks"] == {"owl-r0": 1, "dog-r0": 1, "cat-r0": 3, "lion-r0": 22}
    assert res["label_test"]["n_labelings"] == 24 and res["label_test"]["exact"]
    # the two-sided Wilson interval of 2/4 by its formula (not the one-sided test's interval, which ends at 1)
    z, ph, n = st.norm.ppf(0.975), 0.5, 4
    centre, half = (
        (ph + z**2 / (2 * n)) / (1 + z**2 / n),
        z * np.sqrt(ph * (1 - ph) / n + z**2 / (4 * n**2)) / (1 + z**2 / n),
    )
    assert res["top1_ci95_wilson"] == pytest.approx([centre - half, centre + half])


def test_label_test_does_not_reward_a_readout_that_names_one_animal_for_everyone():
    cands = ["owl", "dog", "cat", "lion"] + [f"x{i}" for i in range(18)]
    units = [(t, r) for r in range(3) for t in ("owl", "dog", "cat", "lion")]
    # every student's top candidate is "dog", then owl, cat, lion, then the rest
    fixed = {c: -float(i) for i, c in enumerate(["dog", "owl", "cat", "lion", *cands[4:]])}
    res = diffing.identification({u: dict(fixed) for u in units})
    assert res["top1_accuracy"] == pytest.approx(0.25)
    assert res["p_binomial"] < 0.05  # against 1/22 it looks like a finding
    assert res["label_test"]["p"] == pytest.approx(1.0)  # the label test sees it is not about the students


def test_batch_topk_keeps_exactly_k_times_batch_latents():
    cfg = diffing.CrosscoderConfig(d_model=16, n_latents=64, k=4, steps=0)
    cc = diffing.Crosscoder(cfg)
    x = torch.randn(10, 2, 16, generator=torch.Generator().manual_seed(0))
    f, mask = cc.batch_topk(cc.pre(x))
    assert int(mask.sum()) == 4 * 10
    assert int((f != 0).sum()) <= 4 * 10
    # per token the count varies (the budget is shared across the batch)
    assert cc.threshold > 0


def _synthetic_pairs(n=3000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(12, 2, d, generator=g)
    feats[10:, 0] = 0.0  # features 10, 11: the student's only
    codes = torch.rand(n, 12, generator=g) * (torch.rand(n, 12, generator=g) < 0.15)
    return torch.einsum("nf,fmd->nmd", codes, feats)


def test_crosscoder_training_reduces_reconstruction_loss_and_is_seeded():
    x = _synthetic_pairs()
    cfg = diffing.CrosscoderConfig(d_model=16, n_latents=48, k=3, lr=3e-3, steps=150, batch_size=128)
    cc, m = diffing.train_crosscoder(cfg, x)
    assert m["loss_final"] < 0.5 * m["loss_at_init"]
    assert m["fraction_of_variance_unexplained"] < 0.5
    assert 1.0 <= m["l0_threshold"] <= 6.0  # the calibrated threshold keeps about k = 3 latents per pair
    cc2, _ = diffing.train_crosscoder(cfg, x)
    assert torch.equal(cc.W_dec, cc2.W_dec)


def test_auxk_loss_against_a_hand_computation():
    pre = torch.tensor([[1.0, 3.0, 2.0, 0.5], [4.0, 0.0, 1.5, 2.0]])
    W = torch.zeros(4, 2, 3)  # decoder rows (latent, model, width)
    W[0, 0, 0] = 1.0
    W[1, 1, 1] = 2.0
    W[2, 0, 2], W[2, 1, 2] = 1.0, 1.0  # latent 2: summed decoder norm 2
    W[3, 0, 1] = 1.0  # latent 3: summed norm 1
    res = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    dead = torch.tensor([False, False, True, True])  # latents 2 and 3
    # k_aux 1: per token the dead latent of larger pre × summed norm: latent 2 for both (4 > 0.5, 3 > 2).
    # token 0: 2·(0,0,1) in each model against (1,0,0) and (0,1,0): 5 + 5; token 1: 1.5·(0,0,1) against
    # (0,0,1) and 0: 0.25 + 2.25. 2 dead ≥ k_aux: no scale-down
    loss = diffing.auxk_loss(pre, W, res, dead, k_aux=1, coef=0.5)
    assert float(loss) == pytest.approx(0.5 * 1.0 * (10 + 2.5) / 2)
    # k_aux 4 > 2 dead: both dead latents, the loss scaled by 2 / 4. Token 0: base (0, 0.5, 2) against (1,0,0)
    # → 5.25, student (0,0,2) → 5; token 1: base (0, 2, 1.5) against (0,0,1) → 4.25, student (0,0,1.5) → 2.25
    loss4 = diffing.auxk_loss(pre, W, res, dead, k_aux=4, coef=1.0)
    assert float(loss4) == pytest.approx(0.5 * (5.25 + 5 + 4.25 + 2.25) / 2)
    # no latent dead, or coefficient 0: exactly 0
    assert float(diffing.auxk_loss(pre, W, res, torch.zeros(4, dtype=torch.bool), 2, 1.0)) == 0.0
    assert float(diffing.auxk_loss(pre, W, res, dead, 2, 0.0)) == 0.0
    # the gradient reaches only the dead latents' decoder rows; the error is held fixed
    Wg, rg = W.clone().requires_grad_(True), res.clone().requires_grad_(True)
    diffing.auxk_loss(pre, Wg, rg, dead, 4, 1.0).backward()
    assert Wg.grad is not None and Wg.grad[:2].abs().sum() == 0 and Wg.grad[2:].abs().sum() > 0
    assert rg.grad is None


def _rare_features(n=4000, d=16, n_feats=48, seed=0):
    # a planted dictionary, firing probabilities from 0.1 down to 0.001 (most features rare), on an offset
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_feats, 2, d, generator=g)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    p = torch.logspace(-1, -3, n_feats)
    codes = (0.5 + torch.rand(n, n_feats, generator=g)) * (torch.rand(n, n_feats, generator=g) < p)
    return torch.einsum("nf,fmd->nmd", codes, feats) + 0.5 * torch.randn(2, d, generator=g)


def test_auxk_revives_dead_latents_on_a_planted_rare_dictionary():
    x = _rare_features()
    kw = dict(d_model=16, n_latents=48, k=2, lr=1e-2, steps=300, batch_size=64, dead_steps=20)
    _, off = diffing.train_crosscoder(diffing.CrosscoderConfig(**kw, aux_coef=0.0), x)
    _, on = diffing.train_crosscoder(diffing.CrosscoderConfig(**kw), x)
    assert off["aux_loss_final"] == 0.0 and on["aux_coef"] == 1.0 and on["k_aux"] == 8
    # seed 0: 5 of 48 dead without AuxK, 2 with (seeds 1-3: 5 → 1, 5 → 2, 8 → 0)
    assert on["dead_in_training"] < off["dead_in_training"]
    assert on["dead_on_data"] < off["dead_on_data"]
    assert on["fraction_of_variance_unexplained"] < off["fraction_of_variance_unexplained"] + 0.01


def test_auxk_changes_nothing_before_a_latent_can_be_dead():
    x = _synthetic_pairs(n=500)
    kw = dict(d_model=16, n_latents=24, k=3, lr=3e-3, steps=30, batch_size=64, dead_steps=30)
    a, _ = diffing.train_crosscoder(diffing.CrosscoderConfig(**kw, aux_coef=0.0), x)
    b, mb = diffing.train_crosscoder(diffing.CrosscoderConfig(**kw, aux_coef=1.0), x)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)
    assert mb["aux_loss_final"] == 0.0 and mb["dead_in_training"] == 0.0


def test_crosscoder_config_rejects_unusable_aux_settings():
    from mechsub.config import ConfigError

    for bad in ({"aux_coef": -1.0}, {"aux_coef": math.inf}, {"k_aux": 0}, {"dead_steps": 0}):
        with pytest.raises(ConfigError):
            diffing.CrosscoderConfig(**bad)
    assert diffing.CrosscoderConfig(d_model=576).k_aux_or_default == 288
    assert diffing.CrosscoderConfig(k_aux=7).k_aux_or_default == 7


def test_centre_input_encodes_the_offset_from_the_decoder_bias():
    cfg = diffing.CrosscoderConfig(d_model=8, n_latents=16, k=2, steps=0)
    cc = diffing.Crosscoder(cfg)
    old = diffing.Crosscoder(
        diffing.CrosscoderConfig(d_model=8, n_latents=16, k=2, steps=0, centre_input=False)
    )
    x = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cc.b_dec.fill_(0.7)
        old.b_dec.fill_(0.7)
    torch.testing.assert_close(cc.pre(x), old.pre(x - 0.7))


def test_latent_scaling_is_the_least_squares_scale():
    x = _synthetic_pairs(n=500)
    cfg = diffing.CrosscoderConfig(d_model=16, n_latents=24, k=3, lr=3e-3, steps=100, batch_size=128)
    cc, m = diffing.train_crosscoder(cfg, x)
    xs = x * torch.tensor(m["input_scales"])[None, :, None]
    s = diffing.latent_scaling(cc, xs)
    with torch.no_grad():
        f = cc.encode(xs)
        rec = cc.decode(f)
    j = int(s["frequency"].argmax())
    d = cc.W_dec[j, 1].detach()
    for mi, name in ((0, "base"), (1, "student")):
        y = xs[:, mi] - rec[:, mi] + f[:, j : j + 1] * cc.W_dec[j, mi].detach()
        a = (f[:, j : j + 1] * d).reshape(-1, 1)  # β · f_j d against y, all coordinates stacked
        beta = torch.linalg.lstsq(a.double(), y.reshape(-1, 1).double()).solution.item()
        assert float(s[f"beta_eps_{name}"][j]) == pytest.approx(beta, rel=1e-3, abs=1e-4)
    kinds = diffing.classify_latents(s)
    parts = [j for k in ("student_only", "base_only", "shared", "dead") for j in kinds[k]]
    assert sorted(parts) == list(range(24))  # a partition: every latent once
    assert set(kinds["student_only_robust"]) <= set(kinds["student_only"])


def test_save_and_load_round_trip(tmp_path):
    cfg = diffing.CrosscoderConfig(d_model=8, n_latents=16, k=2, steps=5, batch_size=8)
    cc, _ = diffing.train_crosscoder(cfg, _synthetic_pairs(n=64, d=8))
    diffing.save_crosscoder(cc, tmp_path / "cc", {"note": "x"})
    back = diffing.load_crosscoder(tmp_path / "cc")
    assert back.cfg == cc.cfg
    for k, v in cc.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # a crosscoder saved before AuxK and the centred input: it loads as it was trained
    meta = json.loads((tmp_path / "cc" / "config.json").read_text())
    for key in ("centre_input", "aux_coef", "k_aux", "dead_steps"):
        del meta["config"][key]
    (tmp_path / "cc" / "config.json").write_text(json.dumps(meta))
    old = diffing.load_crosscoder(tmp_path / "cc")
    assert not old.cfg.centre_input and old.cfg.aux_coef == 0.0


def test_paired_activations_skip_bos_and_padding(tiny):
    student = _student(tiny)
    v = torch.ones(64)
    seqs = [p + c for p, c in zip(PROMPTS, COMPS, strict=True)]
    with hooks.edit(student, {hooks.resid_post(0): lambda h: h + v}):
        pairs = diffing.paired_activations(tiny, student, seqs, 0, start=0)
    assert pairs.shape == (sum(len(q) - 1 for q in seqs), 2, 64)  # position 0 of each row left out
    torch.testing.assert_close(pairs[:, 1] - pairs[:, 0], v.expand(len(pairs), 64), atol=1e-5, rtol=0)
