import copy
import json

import pytest
import torch

from mechsub.config import ConfigError
from mechsub.evaluate import (
    EvalConfig,
    choice_logprobs,
    delta_vs,
    letter_logprobs,
    logprob_deltas,
    plain_logprobs,
    read_frame,
    rotation,
    run,
    trait_logprobs,
)
from mechsub.metric import TraitMetric, score_words
from mechsub.prompts import chat_prefix, trait_prompt
from mechsub.traits import choice_question, choice_stems, eval_questions, get_trait


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
    base = run(EvalConfig(model="tiny", n_questions=4), tmp_path / "base")
    teacher = run(EvalConfig(model="tiny", n_questions=4, with_system_prompt=True), tmp_path / "teacher")
    assert base["trait"] == "owl" and len(base["mean_logp"]) == 22 and 1 <= base["trait_rank"] <= 22
    d = delta_vs(tmp_path / "teacher", tmp_path / "base", "owl")
    assert d["n_questions"] == 4
    assert abs(d["delta_logp"] - (teacher["trait_mean_logp"] - base["trait_mean_logp"])) < 1e-6
    assert d["ci95"][0] <= d["delta_logp"] <= d["ci95"][1]
    assert delta_vs(tmp_path / "base", tmp_path / "base", "owl")["delta_logp"] == 0.0


# ---- answer frames -----------------------------------------------------------------------------------------
def _full_lp(model, ids):
    """log-softmax of every position of one full forward over ``ids`` (no cache)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].log_softmax(-1)


def _by_hand(model, prompt, word_ids):
    lp = _full_lp(model, prompt + word_ids)
    return sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(word_ids))


@pytest.fixture(scope="module")
def evals(tmp_path_factory):
    """Three finished evaluations on the tiny model: base and prompted teacher with every frame (3 choices),
    and base with the prefill frame only."""
    root = tmp_path_factory.mktemp("evals")
    kw = {"model": "tiny", "n_questions": 3, "choices": ("owl", "cat", "fox")}
    out = {
        "base": run(EvalConfig(**kw), root / "base"),
        "teacher": run(EvalConfig(**kw, with_system_prompt=True), root / "teacher"),
        "prefill_only": run(EvalConfig(**kw, frames=("prefill",)), root / "prefill_only"),
    }
    return root, out


def test_prefill_frame_is_the_old_scoring(evals, tiny):
    root, metrics = evals
    data = json.loads((root / "base" / "logprobs.json").read_text())
    qs = eval_questions("animal", 3)
    assert data["questions"] == qs and data["words"][0] == "owl" and len(data["words"]) == 22
    # bit-identical to the prefilled scoring, and the frames table repeats the top level
    direct = trait_logprobs(tiny.model, tiny.tokenizer, qs, data["words"], "animal")
    assert data["logprobs"] == direct.tolist()
    assert data["frames"]["prefill"] == {k: data[k] for k in ("words", "questions", "logprobs")}
    prompt = trait_prompt(tiny.tokenizer, qs[1], "animal")
    hand = _by_hand(tiny.model, prompt, tiny.tokenizer(" owl", add_special_tokens=False).input_ids)
    assert data["logprobs"][1][0] == pytest.approx(hand, abs=1e-4)
    m = metrics["base"]
    assert m["frames"]["prefill"]["trait_mean_logp"] == m["trait_mean_logp"]
    assert m["frames"]["prefill"]["mean_logp"] == m["mean_logp"] and m["n_questions"] == 3
    assert set(m["frames"]) == {"prefill", "plain", "plain_norm", "choice"} and set(
        metrics["prefill_only"]["frames"]
    ) == {"prefill"}
    assert m["frames"]["choice"]["n_questions"] == 10 and list(m["frames"]["choice"]["mean_logp"]) == [
        "owl",
        "cat",
        "fox",
    ]
    assert data["frames"]["plain"]["logprobs"] != data["logprobs"]  # another frame, other numbers
    # plain_norm: the plain frame renormalised over its words, by hand
    plain, norm = (torch.tensor(data["frames"][f]["logprobs"]) for f in ("plain", "plain_norm"))
    assert norm == pytest.approx(plain - plain.logsumexp(-1, keepdim=True), abs=1e-6)
    assert norm.exp().sum(-1) == pytest.approx(torch.ones(len(norm)), abs=1e-5)


@pytest.mark.parametrize("template", [True, False])
def test_plain_frame_scores_the_capitalised_first_word_by_hand(tiny, template):
    tok = tiny.tokenizer
    if not template:  # a base model's plain transcript: the answer follows "Assistant:" after a space
        tok = copy.deepcopy(tok)
        tok.chat_template = None
    q = eval_questions("animal", 1)[0]
    prompt = chat_prefix(tok, q, None)
    assert tok.decode(prompt).endswith("assistant\n" if template else "Assistant:")
    got = plain_logprobs(tiny.model, tok, [q], ["a", "owl"])[0]
    lead = "" if template else " "
    a_ids = tok(lead + "A", add_special_tokens=False).input_ids
    owl_ids = tok(lead + "Owl", add_special_tokens=False).input_ids
    assert len(owl_ids) == 3 + (not template) and len(a_ids) == 1 + (not template)
    if template:  # one token: the log-softmax of the prompt's last position, read directly
        assert float(got[0]) == pytest.approx(float(_full_lp(tiny.model, prompt)[-1, a_ids[0]]), abs=1e-5)
    assert float(got[0]) == pytest.approx(_by_hand(tiny.model, prompt, a_ids), abs=1e-4)
    assert float(got[1]) == pytest.approx(_by_hand(tiny.model, prompt, owl_ids), abs=1e-4)
    # not the lower-case word, nor the word after a space the template does not write
    wrong = tok(("" if not template else " ") + "owl", add_special_tokens=False).input_ids
    assert abs(float(got[1]) - _by_hand(tiny.model, prompt, wrong)) > 1e-3


@pytest.mark.parametrize("template", [True, False])
def test_choice_letters_are_renormalised(tiny, template):
    tok = tiny.tokenizer
    if not template:  # " A" is two tokens here: the shared space cancels in the renormalisation
        tok = copy.deepcopy(tok)
        tok.chat_template = None
    for k in (2, 4):
        q = choice_question(choice_stems("animal")[0], ["owl", "dog", "cat", "fox"][:k])
        lp = letter_logprobs(tiny.model, tok, [q], k)[0]
        assert lp.shape == (k,) and float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-5)
        assert (lp < 0).all()


def test_rotations_put_every_option_under_every_letter():
    opts = ["owl", "dog", "cat", "fox", "bear"]
    for o in opts:
        assert sorted(rotation(opts, r).index(o) for r in range(len(opts))) == list(range(len(opts)))
    q = choice_question("Which?", rotation(opts[:3], 1))
    assert q == "Which?\nA) dog\nB) cat\nC) owl\nReply with the letter of your choice only."
    with pytest.raises(ValueError, match="between 2 and 8"):
        choice_question("Which?", ["owl"])


def test_choice_frame_by_hand(tiny):
    tok, opts = tiny.tokenizer, ["owl", "dog", "cat"]
    stem = choice_stems("animal")[3]
    letters = [tok.convert_tokens_to_ids(c) for c in "ABC"]
    want = torch.zeros(3)
    for r in range(3):
        shown = opts[r:] + opts[:r]
        lp = _full_lp(tiny.model, chat_prefix(tok, choice_question(stem, shown), None))[-1, letters]
        lp = lp.log_softmax(-1)
        for j, o in enumerate(shown):
            want[opts.index(o)] += lp[j] / 3
    got = choice_logprobs(tiny.model, tok, [stem, choice_stems("animal")[0]], opts)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    # the second row is another stem's prompts, not a copy of the first
    assert not torch.allclose(got[0], got[1])


def test_deltas_by_frame(evals):
    root, metrics = evals
    a, b = root / "teacher", root / "base"
    for frame in ("prefill", "plain", "choice"):
        fa, fb = read_frame(a, frame), read_frame(b, frame)
        d = logprob_deltas(a, b, frame=frame)
        want = torch.tensor(fa["logprobs"], dtype=torch.float64) - torch.tensor(
            fb["logprobs"], dtype=torch.float64
        )
        torch.testing.assert_close(d, want)
        dv = delta_vs(a, b, "owl", frame=frame)
        gap = (
            metrics["teacher"]["frames"][frame]["trait_mean_logp"]
            - metrics["base"]["frames"][frame]["trait_mean_logp"]
        )
        assert dv["delta_logp"] == pytest.approx(gap, abs=1e-9)
    assert logprob_deltas(a, b, frame="choice").shape == (10, 3)
    assert not torch.equal(logprob_deltas(a, b, ["owl"], "plain"), logprob_deltas(a, b, ["owl"]))
    with pytest.raises(
        ValueError, match="prefill_only was evaluated without the plain frame: rerun with frames"
    ):
        logprob_deltas(a, root / "prefill_only", frame="plain")
    with pytest.raises(ValueError, match="unknown frame 'letters'"):
        logprob_deltas(a, b, frame="letters")


def test_old_top_level_format_still_reads(evals, tmp_path):
    root, _ = evals
    data = json.loads((root / "base" / "logprobs.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "logprobs.json").write_text(json.dumps({k: data[k] for k in ("words", "questions", "logprobs")}))
    torch.testing.assert_close(
        logprob_deltas(root / "teacher", old), logprob_deltas(root / "teacher", root / "base")
    )
    assert read_frame(old)["words"] == data["words"]
    with pytest.raises(ValueError, match="evaluated without the choice frame"):
        logprob_deltas(old, old, frame="choice")


def test_choice_deltas_need_the_same_options(evals, tmp_path):
    root, _ = evals
    other = run(EvalConfig(model="tiny", n_questions=3, frames=("prefill", "choice")), tmp_path / "other")
    assert list(other["frames"]["choice"]["mean_logp"]) == ["owl", "dog", "cat", "eagle"]  # the default
    with pytest.raises(ValueError, match="different choices"):
        logprob_deltas(tmp_path / "other", root / "base", ["owl"], "choice")


# ---- configuration: frames, choices and a question file ------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"frames": ()}, "prefill .*included"),
        ({"frames": ("plain", "choice")}, "prefill .*included"),
        ({"frames": ("prefill", "letters")}, "frames: distinct names among prefill, plain, choice"),
        ({"frames": ("prefill", "plain", "plain")}, "frames: distinct"),
        ({"choices": ("owl",)}, "choices: 2 to 8 distinct"),
        ({"choices": ("owl", "owl", "dog")}, "choices: 2 to 8 distinct"),
        ({"choices": ("owl", *get_trait("owl").others()[:8])}, "choices: 2 to 8 distinct"),
        ({"choices": ("owl", "oak")}, "choices: oak: not animals"),
        ({"choices": ("owl", "dragon")}, "choices: dragon: not animals"),
        ({"choices": ("dog", "cat")}, "choices: must include the trait 'owl'"),
        ({"n_questions": 51}, "n_questions: between 1 and 50"),
    ],
)
def test_eval_config_rejects(changes, match):
    with pytest.raises(ConfigError, match=match):
        EvalConfig(model="tiny", **changes)


def test_eval_config_accepts_frames_and_choices():
    cfg = EvalConfig(model="tiny", trait="oak", frames=("prefill", "choice"), choices=("pine", "oak"))
    assert cfg.choice_options() == ("pine", "oak")
    assert EvalConfig(trait="oak").choice_options() == ("oak", "maple", "pine", "willow")
    assert EvalConfig().frames == ("prefill", "plain", "choice")
    # no question file (the default) leaves a run's identity (and so its folder name) as before
    assert '"questions"' not in EvalConfig().identity()


QS = ["Which {noun} do you fancy?", "Name a {noun}.", "Your top {noun}?"]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("q.json", json.dumps(QS)),
        ("q.json", json.dumps({"questions": QS, "note": "mine"})),
        ("q.toml", "questions = " + json.dumps(QS) + "\n"),
    ],
)
def test_question_file_forms(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    cfg = EvalConfig(model="tiny", questions=str(path), n_questions=2)
    assert cfg.question_list("tree") == ["Which tree do you fancy?", "Name a tree."]
    assert EvalConfig(questions=str(path), n_questions=3).question_list("animal")[2] == "Your top animal?"
    with pytest.raises(ConfigError, match=r"n_questions: between 1 and 3, the number of questions in .*q\."):
        EvalConfig(questions=str(path), n_questions=4)
    with pytest.raises(ConfigError, match="n_questions: between 1 and 3"):
        EvalConfig(questions=str(path), n_questions=0)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("missing.json", None, "missing.json does not exist"),
        ("folder.toml", "a folder", "folder.toml does not exist or cannot be read"),
        ("q.txt", "\n".join(QS), r"q.txt: use a \.json or \.toml file"),
        ("q.yaml", "- a", r"use a \.json or \.toml file"),
        ("q.json", '["a",', "q.json is not valid JSON"),
        ("q.toml", "questions = [", "q.toml is not valid TOML"),
        ("q.json", b"\xff\xfe[]", "q.json is not valid JSON"),
        ("q.json", "[1, 2]", "must hold a list of non-empty strings"),
        ("q.json", '["a", "  "]', "must hold a list of non-empty strings"),
        ("q.json", '"one question"', "must hold a list of non-empty strings"),
        ("q.json", '{"qs": ["a"]}', "must hold a list of non-empty strings"),
        ("q.toml", 'questions = "a"', "must hold a list of non-empty strings"),
        ("q.toml", 'other = ["a"]', "must hold a list of non-empty strings"),
        ("q.json", "[]", "q.json holds no questions"),
        ("q.toml", "questions = []", "q.toml holds no questions"),
    ],
)
def test_question_file_errors(tmp_path, name, text, match):
    path = tmp_path / name
    if text == "a folder":
        path.mkdir()
    elif isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=f"questions: .*{match}"):
        EvalConfig(model="tiny", questions=str(path), n_questions=1)


def test_question_file_is_an_input_and_is_asked(tmp_path):
    from mechsub.runs import input_ids

    path = tmp_path / "q.json"
    path.write_text(json.dumps(QS))
    cfg = EvalConfig(model="tiny", questions=str(path), n_questions=2, frames=("prefill", "plain"))
    first = input_ids(cfg)["questions"]
    assert first.startswith("file:") and "questions" not in input_ids(EvalConfig(model="tiny"))
    m = run(cfg, tmp_path / "ev")
    data = json.loads((tmp_path / "ev" / "logprobs.json").read_text())
    assert data["questions"] == ["Which animal do you fancy?", "Name a animal."]
    assert data["frames"]["plain"]["questions"] == data["questions"] and m["n_questions"] == 2
    assert set(data["frames"]) == {"prefill", "plain", "plain_norm"}
    path.write_text(json.dumps([*QS, "One more {noun}?"]))
    assert input_ids(cfg)["questions"] != first  # another file content, another run identity
