import pytest

from mechsub import bench


def test_bench_reports_like_for_like_ratios_on_tiny(tmp_path):
    cfg = bench.BenchConfig(model="tiny", n_prompts=6, batch_size=3, max_new_tokens=8, train_batch_size=3,
                            train_steps=1, repeats=2, capture_sequences=4)  # fmt: skip
    m = bench.run(cfg, tmp_path / "b")
    assert m["machine"]["torch_threads"] >= 1 and m["machine"]["repeats"] == 2
    rates = m["machine"]["matmul_gflops"]
    assert set(rates) == {f"{d}_rows{r}" for d in ("float32", "bfloat16") for r in (64, 4096)}
    assert all(len(v["values"]) == 2 and v["min"] > 0 for v in rates.values())
    g = m["generation"]
    assert g["batch_size"] == 3 and g["n_prompts"] == 6  # both sides: the same prompts at the same batch
    for side in ("hf_generate", "mechsub"):
        for key in ("new_tok_per_s", "processed_tok_per_s", "fraction_of_ceiling", "seconds"):
            s = g[side][key]
            assert len(s["values"]) == 2 and s["min"] <= s["mean"] <= s["max"] and s["sd"] >= 0
        # the fraction of the ceiling is this side's rate over the ceiling's rate of the same round
        for f, r, c in zip(g[side]["fraction_of_ceiling"]["values"], g[side]["processed_tok_per_s"]["values"],
                           g["ceiling"]["tok_per_s"]["values"], strict=True):  # fmt: skip
            assert f == pytest.approx(r / c)
    # the ratio is taken per round from the two sides' measurements in that round
    for r, a, b in zip(g["ratio"]["values"], g["mechsub"]["new_tok_per_s"]["values"],
                       g["hf_generate"]["new_tok_per_s"]["values"], strict=True):  # fmt: skip
        assert r == pytest.approx(a / b)
    # the reference pass: its rate in mechsub's new tokens over HF generate's, per round; mechsub's share of its speed
    mech, least = (g[k]["seconds"]["values"] for k in ("mechsub", "least_pass"))
    n_new = g["mechsub"]["mean_new_tokens"] * g["n_prompts"]
    assert g["reference_ratio"]["values"] == pytest.approx(
        [n_new / b / h for b, h in zip(least, g["hf_generate"]["new_tok_per_s"]["values"], strict=True)]
    )
    assert g["fraction_of_reference"]["values"] == pytest.approx(
        [b / x for b, x in zip(least, mech, strict=True)]
    )
    assert m["goals"]["generation_fraction_of_ceiling"]["measured"] == g["fraction_of_reference"]["mean"]
    t = m["training"]
    assert set(t) == {"student", "teacher"}
    for setting, objectives in (("student", ("sft", "distill")), ("teacher", ("sft",))):
        s = t[setting]
        assert s["shared_prefix_tokens"] > 0 and s["ceiling"]["tok_per_s"]["mean"] > 0
        for obj in objectives:
            for suffix in ("", "_shared_prefix"):
                ratio = s[f"ratio_{obj}{suffix}"]["values"]
                mech = s[f"mechsub_{obj}{suffix}"]["tok_per_s"]["values"]
                plain = s[f"plain_peft_{obj}"]["tok_per_s"]["values"]
                assert ratio == pytest.approx([a / b for a, b in zip(mech, plain, strict=True)])
                assert s[f"mechsub_{obj}{suffix}"]["peak_rss_increase_mb"] is not None
                frac = s[f"mechsub_{obj}{suffix}"]["fraction_of_backward_floor"]["values"]
                assert frac == pytest.approx(
                    [a / f for a, f in zip(mech, s["backward_floor"]["tok_per_s"]["values"], strict=True)]
                )
            # the room left: the floor's rate over plain peft's, round by round
            floor = s["backward_floor"]["tok_per_s"]["values"]
            assert s[f"max_ratio_{obj}"]["values"] == pytest.approx(
                [f / b for f, b in zip(floor, s[f"plain_peft_{obj}"]["tok_per_s"]["values"], strict=True)]
            )
    c = m["capture"]
    assert c["hooks"] == 2 and c["sequences"] == 4
    assert c["overhead"]["values"] == pytest.approx(
        [a / b - 1 for a, b in zip(c["capture"]["seconds"]["values"], c["plain_forward"]["seconds"]["values"],
                                   strict=True)])  # fmt: skip
    assert set(m["goals"]) == set(bench.GOALS) and all(
        isinstance(v["met"], bool) for v in m["goals"].values()
    )
    from mechsub.cli import _report_bench

    _report_bench(m, tmp_path / "b")  # the CLI's summary reads the same keys
    assert "backward floor" in (tmp_path / "b" / "report.md").read_text()


def test_least_pass_counts_by_hand(tiny):
    # batch [1,2,3,4] + [1,2,5]: the prefix [1,2] once, then 2 and 1 own tokens; batch [1,2,9,9] alone: 4 tokens;
    # completions (end of turn included) are read but for their last token: 2 + 0 + 1
    prompts = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 9, 9]]
    _, least = bench._least_pass(tiny, prompts, [[7, 8, 0], [0], [5, 0]], batch_size=2)
    assert least == 5 + 4 + 3


def test_backward_floor_computes_no_weight_gradient():
    """The floor is the activation backward only: the model's weights get no .grad (a LoRA step's least cost)."""
    from mechsub import models

    lm = models.load("tiny")
    run = bench._backward_floor(lm, [[1, 2, 3, 4], [5, 6, 7]], batch_size=2)
    assert run() == 7  # the real tokens of both rows
    assert all(p.grad is None for p in lm.model.parameters())
