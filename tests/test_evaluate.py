import torch

from mechsub.evaluate import trait_logprobs
from mechsub.metric import TraitMetric, score_words
from mechsub.prompts import chat_prefix
from mechsub.traits import eval_questions, get_trait


def _naive(model, tok, prompt, word):
    ids = tok(" " + word, add_special_tokens=False).input_ids
    full = torch.tensor([prompt + ids])
    with torch.no_grad():
        lp = model(full).logits[0].log_softmax(-1)
    return sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids))


def test_cached_scores_equal_full_forward(tiny):
    prompt = chat_prefix(tiny.tokenizer, "Name your favorite animal.", None, "My favorite animal is the")
    words = ["owl", "dog", "elephant", "ox"]  # one token per character: lengths 3 to 8, padding exercised
    fast = score_words(tiny.model, prompt, [TraitMetric.of(tiny.tokenizer, w) for w in words])
    slow = torch.tensor([_naive(tiny.model, tiny.tokenizer, prompt, w) for w in words])
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_system_prompt_changes_the_prompt(tiny):
    q = eval_questions("animal", 1)[0]
    a = chat_prefix(tiny.tokenizer, q, None, "x")
    b = chat_prefix(tiny.tokenizer, q, get_trait("owl").system_prompt(), "x")
    assert a != b and tiny.tokenizer.decode(b).lower().count("owls") == 3
    m = trait_logprobs(tiny.model, tiny.tokenizer, eval_questions("animal", 3), ["owl", "cat"], "animal")
    assert m.shape == (3, 2) and torch.isfinite(m).all() and (m < 0).all()


def test_eval_stage_and_delta(tmp_path):
    from mechsub.evaluate import EvalConfig, delta_vs, run

    base = run(EvalConfig(model="tiny", n_questions=4), tmp_path / "base")
    teacher = run(EvalConfig(model="tiny", n_questions=4, with_system_prompt=True), tmp_path / "teacher")
    assert base["trait"] == "owl" and len(base["mean_logp"]) == 22 and 1 <= base["trait_rank"] <= 22
    d = delta_vs(tmp_path / "teacher", tmp_path / "base", "owl")
    assert d["n_questions"] == 4
    assert abs(d["delta_logp"] - (teacher["trait_mean_logp"] - base["trait_mean_logp"])) < 1e-6
    assert d["ci95"][0] <= d["delta_logp"] <= d["ci95"][1]
    assert delta_vs(tmp_path / "base", tmp_path / "base", "owl")["delta_logp"] == 0.0
