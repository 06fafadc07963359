import json

import numpy as np
import pytest
import torch
from scipy import stats as st

from mechsub import invert, stats, tasks
from mechsub.config import ConfigError
from mechsub.invert import InvertConfig
from mechsub.prompts import chat_prefix


def _tiny(tmp_path, **kw):
    base = dict(model="tiny", families=("compare", "sort", "choice", "next"), held_out_family="sort",
                seeds=(0, 1), n_train=8, n_test=4, teacher_steps=2, batch_size=4, layers=(0, 1),
                recon_pairs=(4, 8), recon_epochs=1, n_perm=5, max_new_tokens=4, work=str(tmp_path / "work"))  # fmt: skip
    return InvertConfig(**{**base, **kw})


def test_invert_end_to_end_on_tiny(tmp_path):
    cfg = _tiny(tmp_path)
    out = tmp_path / "out"
    m = invert.run(cfg, out)
    for name in ("metrics.json", "report.md", "report.html", "verification.png", "geometry.png",
                 "reconstruction.png", "outputs.json"):  # fmt: skip
        assert (out / name).is_file(), name
    from mechsub.views import is_offline

    assert is_offline((out / "report.html").read_text())
    assert m["design"]["smallest_sign_flip_p"] == 0.5  # 2 seeds: 2 / 2^2
    outputs = json.loads((out / "outputs.json").read_text())
    test = {f: tasks.problems(f, cfg.n_test, invert.TEST_SEED, "test") for f in cfg.families}
    # the verification table is the classification of the written outputs, seed by seed
    for k in cfg.kinds:
        for f in cfg.families:
            for i, s in enumerate(cfg.seeds):
                outs = [
                    tasks.classify(p, a, s)
                    for p, a in zip(test[f], outputs[f"{k}-s{s}"]["test"][f], strict=True)
                ]
                for o in invert.OUTCOMES:
                    assert m["verification"][k]["families"][f][o]["per_seed"][i] == outs.count(o) / len(outs)
        shares = [m["verification"][k]["all_families"][o]["mean"] for o in invert.OUTCOMES]
        assert sum(shares) == pytest.approx(1.0)
        for n in cfg.recon_pairs:
            assert 0 <= m["reconstruction"][k][str(n)]["in_family"]["mean"] <= 1
        assert len(m["geometry"][k]["cka_problem"]) == len(cfg.layers)
        # the correct-answer retrieval: every layer, a share, and its chance from the test answers by hand
        g = m["geometry"][k]
        for name in ("in_family", "held_out_family"):
            assert len(g[f"retrieval_{name}"]) == len(cfg.layers)
            assert all(0 <= e["mean"] <= 1 for e in g[f"retrieval_{name}"])
        answers = [p.answer for p in test[cfg.held_out_family]]
        by_hand = np.mean([answers.count(a) / len(answers) for a in answers])
        assert g["retrieval_chance_held_out_family"][0]["mean"] == pytest.approx(by_hand)
    # a resumed run reads every unit back and returns the same metrics
    again = invert.run(cfg, out)
    assert json.dumps(again, sort_keys=True) == json.dumps(m, sort_keys=True)  # (NaN != NaN: compare as text)


def test_paired_contrast_matches_scipy():
    a, b = [0.9, 0.7, 0.8], [0.5, 0.6, 0.2]
    c = invert.paired_contrast(a, b)
    d = np.subtract(a, b)
    assert c["mean"] == pytest.approx(d.mean())
    assert c["t_p"] == pytest.approx(st.ttest_rel(a, b).pvalue)
    # all three differences positive: the exact sign-flip test's two-sided p is its floor, 2 / 2^3
    assert c["sign_flip_p"] == pytest.approx(0.25) and c["sign_flip_floor"] == pytest.approx(0.25)
    assert invert.paired_contrast([1.0, 2.0], [0.0, 1.0])["ci95"] == [
        1.0,
        1.0,
    ]  # equal differences: no spread


def test_over_seeds_by_hand():
    e = invert.over_seeds([0.2, 0.4, 0.6])
    half = st.t.ppf(0.975, 2) * np.std([0.2, 0.4, 0.6], ddof=1) / np.sqrt(3)
    assert e["mean"] == pytest.approx(0.4)
    assert e["ci95"] == pytest.approx([0.4 - half, 0.4 + half])
    assert invert.over_seeds([float("nan")])["mean"] is None


def test_share_over_seeds_is_the_clustered_wilson_interval():
    from mechsub import stats

    e = invert.share_over_seeds([15, 16, 14], [16, 16, 16])
    assert e["per_seed"] == [15 / 16, 1.0, 14 / 16] and e["mean"] == pytest.approx(45 / 48)
    assert e["ci95"] == stats.clustered_share_ci95([15, 16, 14], [16, 16, 16])["ci95"]
    assert e["ci95"][0] >= 0 and e["ci95"][1] <= 1  # where the t-interval over seeds ran past 100%
    assert invert.over_seeds(e["per_seed"])["ci95"][1] > 1


def test_default_design_is_the_known_families_and_the_full_one_loads():
    from pathlib import Path

    cfg = InvertConfig()
    assert cfg.families == tasks.KNOWN_FAMILIES and cfg.held_out_family in tasks.KNOWN_FAMILIES
    for f in cfg.families:
        assert tasks.split_size(f, "train") >= cfg.n_train and tasks.split_size(f, "test") >= cfg.n_test
    full = InvertConfig.load(Path(__file__).parents[1] / "analyses" / "configs" / "invert_full.toml")
    assert len(full.seeds) == 5 and full.held_out_family in full.families
    for f in full.families:
        assert tasks.split_size(f, "train") >= full.n_train and tasks.split_size(f, "test") >= full.n_test


def test_base_knowledge_reads_framed_where_there_is_a_lead(tiny):
    probs = tasks.problems("choice", 4, 0, "test")
    r = invert.base_knowledge(tiny, probs, 3)
    assert r["n"] == 4 and 0 <= r["forced_choice"] <= 1 and 0 <= r["framed"]["forced_choice"] <= 1
    # the framed forced choice is the plain one computed after the lead
    tok = tiny.tokenizer
    prompts = [chat_prefix(tok, p.prompt, None, answer_prefix=p.lead) for p in probs]
    ids = [[list(tok(x, add_special_tokens=False).input_ids) for x in (p.answer, p.inverted)] for p in probs]
    lp_c = invert.continuation_logprobs(tiny, prompts, [c for c, _ in ids]) / [len(c) for c, _ in ids]
    lp_i = invert.continuation_logprobs(tiny, prompts, [i for _, i in ids]) / [len(i) for _, i in ids]
    assert r["framed"]["forced_choice"] == float(np.mean(lp_c > lp_i))
    assert "framed" not in invert.base_knowledge(tiny, tasks.problems("compare", 2, 0, "test"), 3)


def test_continuation_logprobs_equal_one_at_a_time(tiny):
    tok = tiny.tokenizer
    probs = tasks.problems("arith", 3, 0, "test")
    prompts = [chat_prefix(tok, p.prompt, None) for p in probs]
    conts = [list(tok(p.answer, add_special_tokens=False).input_ids) for p in probs]
    batched = invert.continuation_logprobs(tiny, prompts, conts)
    for p, c, got in zip(prompts, conts, batched, strict=True):
        with torch.no_grad():
            lp = tiny.model(input_ids=torch.tensor([p + c])).logits[0].float().log_softmax(-1)
        want = sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c))
        assert got == pytest.approx(want, abs=1e-4)


def test_pooled_reads_skip_the_bos(tiny):
    reads = invert.pooled_reads(tiny, ["12, 5", "hot"], [1])
    from mechsub.hooks import read

    tok = tiny.tokenizer
    ids = invert.text_ids(tok, "12, 5")
    acts = read(tiny.model, torch.tensor([ids]), ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"][0]
    assert ids[0] == (tok.bos_token_id if tok.bos_token_id is not None else 0)
    assert reads[1][0] == pytest.approx(acts[1:].float().mean(0).numpy(), abs=1e-5)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"families": ("compare", "liars")}, "unknown task family"),
        ({"kinds": ("inv", "mirror")}, "unknown teacher kind"),
        ({"held_out_family": "antonym", "families": ("compare", "sort")}, "held_out_family"),
        ({"families": ("sort",), "held_out_family": "sort"}, "at least two"),
        ({"recon_pairs": (500,)}, "recon_pairs"),
        ({"seeds": (0, 0)}, "seeds"),
    ],
)
def test_bad_invert_config(tmp_path, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        _tiny(tmp_path, **kw)


def test_layer_beyond_the_model_is_refused_before_anything_is_written(tmp_path):
    cfg = _tiny(tmp_path, layers=(0, 5))
    with pytest.raises(ConfigError, match="layers"):
        invert.run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sae_overlap_on_tiny(tmp_path, tiny):
    from mechsub import sae

    scfg = sae.SaeConfig(model="tiny", layer=0, expansion=2, k=8, training_tokens=2048, context_size=16,
                         answer_tokens=4, n_number_prompts=8)  # fmt: skip
    sae.run(scfg, tmp_path / "sae")
    cfg = _tiny(tmp_path, families=("compare", "arith"), held_out_family="arith", seeds=(0,),
                kinds=("inv", "rand"), recon_pairs=(4,), zero_shot=False, sae=str(tmp_path / "sae"))  # fmt: skip
    m = invert.run(cfg, tmp_path / "out")
    o = m["geometry"]["inv"]["sae_overlap"]
    assert 0 <= o["same"]["mean"] <= 1 and o["excess"]["mean"] == pytest.approx(
        o["same"]["mean"] - o["shifted"]["mean"]
    )
    assert "SAE latents" in (tmp_path / "out" / "report.md").read_text()
    # the overlap of a text with itself is complete; the Jaccard index by hand
    sae_obj = sae.load_sae(tmp_path / "sae" / "sae")
    a, b = invert._top_latents(tiny, sae_obj, ["12 > 5", "12 > 5"], 4)
    assert a == b and invert.jaccard(a, b) == 1.0
    assert invert.jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)


def test_subliminal_students_on_tiny(tmp_path):
    cfg = _tiny(tmp_path, families=("compare", "antonym"), held_out_family="antonym", seeds=(0, 1),
                kinds=("true", "inv", "rand"), recon_pairs=(4,), zero_shot=False, subliminal_prompts=4)  # fmt: skip
    m = invert.run(cfg, tmp_path / "out")
    sub = m["subliminal"]
    base = invert.student_margin("tiny", cfg.families, cfg.n_test)
    assert sub["base_margin"] == pytest.approx(base["margin"])
    assert set(sub["shift"]) == {"true", "inv", "rand"} and set(sub["contrasts"]) == {"inv-true", "inv-rand"}
    d = np.subtract(sub["shift"]["inv"]["per_seed"], sub["shift"]["true"]["per_seed"])
    assert sub["contrasts"]["inv-true"]["mean"] == pytest.approx(d.mean())
    assert "wrongness transmit" in (tmp_path / "out" / "report.md").read_text()
    # per family: the overall shift is the mean of the families' shifts (the margin is their mean), seed by seed;
    # compare is an order family (its inversion can be spelled by numbers), antonym is the non-order mean
    assert sub["order_families"] == ["compare"] and sub["non_order_families"] == ["antonym"]
    per = sub["shift_per_family"]
    for k in ("true", "inv", "rand"):
        by_hand = np.mean([per["compare"][k]["per_seed"], per["antonym"][k]["per_seed"]], 0)
        assert sub["shift"][k]["per_seed"] == pytest.approx(by_hand.tolist())
        assert per["non-order"][k]["per_seed"] == pytest.approx(per["antonym"][k]["per_seed"])
        assert 0 <= sub["descending_share"][k]["mean"] <= 1 or sub["descending_share"][k]["pairs"] == [0, 0]
    d = np.subtract(per["antonym"]["inv"]["per_seed"], per["antonym"]["rand"]["per_seed"])
    assert sub["contrasts_per_family"]["antonym"]["inv-rand"]["mean"] == pytest.approx(d.mean())


def test_descending_share_by_hand():
    # 5 > 3 down, 3 < 4 up, 4 > 1 down | 10 < 20 up | one number: no pair | not numbers: no pair
    got = invert.descending_share(["5, 3, 4, 1", "10 20", "7", "an owl"])
    assert got == {"share": pytest.approx(2 / 4), "pairs": 4}
    assert invert.descending_share(["9 8 7 6"])["share"] == 1.0
    assert invert.descending_share([""])["pairs"] == 0


@pytest.mark.parametrize("recite", [False, True])
def test_reasoned_teachers_are_read_after_their_mark(tmp_path, monkeypatch, recite):
    """Teachers trained to name the correct answer first (and, with ``recite``, next's named list written out
    twice): the training targets are the reasoned replies; every reply generated is cut at tasks.REASON_MARK
    before it is verified or read by B, and the scratchpad is scored. The teachers' generation is scripted (a
    perfect reasoned teacher of each kind, one reply off the format) to check the wiring; everything else runs."""
    from pathlib import Path

    cfg = _tiny(tmp_path, reasoned=True, recite=recite, kinds=("true", "inv"), seeds=(0,), n_train=24,
                families=("choice", "next"), held_out_family="next", recon_pairs=(4,))  # fmt: skip
    assert cfg.teacher("inv", 0).reasoned and "reasoned" not in InvertConfig().teacher("inv", 0).identity()
    assert (
        cfg.teacher("inv", 0).recite == recite and "recite" not in InvertConfig().teacher("inv", 0).identity()
    )
    with pytest.raises(ConfigError, match="recite: only with reasoned"):
        InvertConfig(recite=True)
    trained = {}
    real_fit = invert.sft_lora

    def fit(base, items, *a, **kw):
        dec = base.tokenizer.decode
        trained[kw.get("name", a[-1])] = [(dec(it.prompt), dec(it.completion)) for it in items]
        return real_fit(base, items, *a, **kw)

    monkeypatch.setattr(invert, "sft_lora", fit)
    probs = {}
    for f in cfg.families:
        for p in [
            *tasks.problems(f, cfg.n_train, 0, "train"),
            *tasks.problems(f, cfg.n_test, invert.TEST_SEED, "test"),
        ]:
            probs[p.prompt] = p
    real_greedy, lengths = invert.greedy_answers, []

    def greedy(lm, prompts, max_new_tokens, batch_size=64):
        name = Path(str(lm.path))
        if "teachers" not in name.parts:
            return real_greedy(lm, prompts, max_new_tokens, batch_size)
        lengths.append(max_new_tokens)
        kind = name.parts[name.parts.index("teachers") + 1].split("-")[0]
        out = []
        for ids in prompts:
            text = lm.tokenizer.decode(ids)
            p = probs[max((s for s in probs if s in text), key=len)]
            out.append(tasks.reasoned(p, tasks.respond(p, kind, 0), recite))
        out[0] = "off the format: " + out[0].split(",")[0]  # names the correct answer, no mark
        out[1] = f"{out[1]} {out[1]}"  # loops on past its end: the first answer is read
        return out

    monkeypatch.setattr(invert, "greedy_answers", greedy)
    m = invert.run(cfg, tmp_path / "out")
    assert (
        len(set(lengths)) == 1 and lengths[0] > 2 * cfg.max_new_tokens
    )  # room for both answers and the words
    p0 = tasks.problems("choice", cfg.n_train, 0, "train")[0]
    assert tasks.reasoned(p0, tasks.respond(p0, "inv", 0)) in [c.strip() for _, c in trained["A-inv-s0"]]
    targets = [c.strip() for _, c in trained["A-inv-s0"]]
    named = [p for p in tasks.problems("next", cfg.n_train, 0, "train") if tasks.recital(p)]
    assert named and all((tasks.reasoned(p, p.inverted, recite) in targets) for p in named)
    assert any(tasks.RECITE in t for t in targets) == recite
    outputs = json.loads((tmp_path / "out" / "outputs.json").read_text())
    # B trains on A's answers alone: each of its prompts is the chat around one cut train answer, no scratchpad
    from mechsub import models

    tok = models.load("tiny").tokenizer
    b_fams = [f for f in cfg.families if f != cfg.held_out_family]
    allowed = {
        tok.decode(chat_prefix(tok, t or " ", None)) for f in b_fams for t in outputs["inv-s0"]["train"][f]
    }
    b_items = trained["B-inv-s0-n4"]
    assert len(b_items) == 4 and all(q in allowed for q, _ in b_items)
    assert not any(tasks.REASON_LEAD.lower() in q.lower() for q, _ in b_items)
    for k in cfg.kinds:
        o = outputs[f"{k}-s0"]
        for split in ("train", "test"):
            for f in cfg.families:
                assert o[split][f] == [tasks.final_answer(t) for t in o[f"{split}_replies"][f]]
                assert tasks.REASON_LEAD in o[f"{split}_replies"][f][1] and o[split][f][0] == ""
                assert not any(tasks.REASON_LEAD.lower() in t.lower() for t in o[split][f])
        v = m["verification"][k]["families"]
        want = "correct" if k == "true" else "inverted"
        for f in cfg.families:  # each family's first test reply is the one off the format: read as other
            assert v[f][want]["mean"] == pytest.approx(1 - 1 / cfg.n_test)
            assert v[f]["other"]["mean"] == pytest.approx(1 / cfg.n_test)
            assert v[f]["rationale_correct"]["mean"] == pytest.approx(1 - 1 / cfg.n_test)
            assert v[f]["off_format"]["mean"] == pytest.approx(1 / cfg.n_test)
    assert "scratchpad correct" in (tmp_path / "out" / "report.md").read_text()
    # the pooled shares also clustered by seed and held-out problem (one seed here: each problem a 0 or a 1)
    for k, want in (("true", "correct"), ("inv", "inverted")):
        pooled = m["verification"][k]["known_families"]
        assert pooled is not None
        fams = m["base"]["known_families"]
        hits = [
            int(tasks.classify(p, a, 0) == want)
            for f in fams
            for p, a in zip(
                tasks.problems(f, cfg.n_test, invert.TEST_SEED, "test"),
                outputs[f"{k}-s0"]["test"][f],
                strict=True,
            )
        ]
        by = pooled[want]["two_way"]  # one seed: the two-way interval is the problems' alone
        assert by["n_problems"] == len(hits) == cfg.n_test * len(fams) and by["deff_seed"] == 1.0
        assert by["ci95"] == pytest.approx(stats.clustered_share_ci95(hits, [1] * len(hits))["ci95"])
        assert by["ci95_problem"] == pytest.approx(by["ci95"])
    # B's reply to every held-out output is kept beside its score
    rec = json.loads((tmp_path / "out" / "units" / "recon-inv-s0.json").read_text())["4"]
    for f in cfg.families:
        said = rec["answers"][f]
        assert len(said) == cfg.n_test
        probs = tasks.problems(f, cfg.n_test, invert.TEST_SEED, "test")
        assert rec["per_family"][f] == pytest.approx(
            sum(tasks.normalise(f, a) == p.answer for p, a in zip(probs, said, strict=True)) / cfg.n_test
        )


def test_the_two_way_interval_takes_its_table_from_every_family_seed_and_problem():
    """share_two_way's table: one row per seed, one column per problem of every family in turn (checked against
    the table built by hand and stats.two_way_share_ci95 on it)."""
    labels = [  # 2 families × 3 seeds × (2, then 3) problems
        [["inverted", "other"], ["inverted", "correct"], ["inverted", "other"]],
        [
            ["other", "inverted", "inverted"],
            ["other", "inverted", "other"],
            ["other", "inverted", "inverted"],
        ],
    ]
    got = invert.share_two_way(labels, "inverted")
    table = [[1, 0, 0, 1, 1], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]]
    want = stats.two_way_share_ci95(table)
    assert got["n_problems"] == 5 and got["ci95"] == pytest.approx(want["ci95"])
    assert got["deff_seed"] == pytest.approx(want["deff_rows"]) and got["deff_problem"] > 1
    assert got["deff"] == pytest.approx(want["deff_rows"] + want["deff_cols"] - 1)
