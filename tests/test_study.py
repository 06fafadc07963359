import json
import math

import numpy as np
import pytest
import torch

from mechsub import data, stats, student, study, teacher
from mechsub.config import ConfigError
from mechsub.data import DataConfig
from mechsub.study import StudyConfig
from mechsub.traits import eval_questions, get_trait, train_pairs


def _tiny_study(tmp_path, **kw):
    base = dict(model="tiny", teacher_kind="prompted", greedy=False, n_prompts=8, max_new_tokens=12, top_k=5,
                batch_size=4, replicates=2, controls=("dog", "cat"), n_questions=3, n_samples=2,
                cross_family="tiny", work=str(tmp_path / "work"))  # fmt: skip
    return StudyConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        {},  # prompted teachers, full-vocabulary distillation without trait tokens, a cross-family student
        {"objective": "distill_topk", "top_k": 5, "cross_family": "", "n_samples": 0, "replicates": 1},
        {
            "teacher_kind": "finetuned",
            "teacher_steps": 2,
            "objective": "sft",
            "greedy": True,
            "cross_family": "",
        },
    ],
)
def test_study_end_to_end_on_tiny(tmp_path, kw):
    cfg = _tiny_study(tmp_path, **kw)
    m = study.run(cfg, tmp_path / "out")
    for key in ("trait", "wall_seconds", "replicates", "held_out", "permutation"):
        assert key in m
    for key in ("teacher", "student", "control"):
        assert np.isfinite(m[key]["delta_logp"])
    n = cfg.replicates
    assert m["effect"]["n_replicates"] == n and len(m["effect"]["ci95"]) == 2
    varies = (
        n > 1 and np.ptp(m["effect"]["per_replicate"]) > 0
    )  # equal effects (a 2-step tiny teacher): no t-test
    assert 0 < m["effect"]["p_value"] <= 1 if varies else m["effect"]["p_value"] is None
    for f in ("prefill", "plain", "plain_norm", "choice"):
        fr = m["frames"][f]
        # the effect is the trait's student minus the same replicate's other students, replicate by replicate
        mat = fr["matrix_per_replicate"]
        for t in cfg.traits:
            others = [c for c in cfg.traits if c != t]
            by_hand = [mat[t][t][r] - np.mean([mat[c][t][r] for c in others]) for r in range(n)]
            assert fr["effects"][t]["per_replicate"] == pytest.approx(by_hand)
        pooled = np.mean([fr["effects"][t]["per_replicate"] for t in cfg.traits], 0)
        assert fr["pooled"]["per_replicate"] == pytest.approx(list(pooled))
        # the exact test over the 3 × n teachers, labels permuted within each replicate: (3!)^n labelings
        n_lab = math.factorial(3) ** n
        assert fr["permutation"]["n_labelings"] == n_lab and fr["permutation"]["exact"]
        assert fr["permutation"]["p_floor"] == pytest.approx(1 / n_lab)
        assert fr["permutation"]["p_floor"] <= fr["permutation"]["p_value"] <= 1
    assert m["held_out"]["delta_logp"] == m["frames"]["plain"]["effects"]["owl"]["delta_logp"]
    if cfg.cross_family:
        assert np.isfinite(m["cross_family"]["effect"]["delta_logp"])
        assert set(m["cross_family"]["frames"]) == {"prefill", "plain", "plain_norm", "choice"}
    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.split("<body>")[1]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["trait"] == "owl"
    # a second run reuses every stage (and returns the finished study)
    assert study.run(cfg, tmp_path / "out")["effect"] == m["effect"]


def test_replicates_are_independent_units(tmp_path):
    """Replicate r: its own teacher seed and training questions, its own prompts, its own student seed."""
    cfg = _tiny_study(tmp_path, teacher_kind="finetuned", replicates=2)
    plan = study.stage_plan(cfg)
    assert plan.teachers[("owl", 0)][0].seed == 0 and plan.teachers[("owl", 1)][0].seed == 1
    assert teacher.teacher_pairs(plan.teachers[("owl", 0)][0]) != teacher.teacher_pairs(
        plan.teachers[("owl", 1)][0]
    )
    assert plan.data[("owl", 1)][0].prompt_seed == 1 and plan.data[("dog", 1)][0].prompt_seed == 1
    assert plan.data[("owl", 0)][0].prompt_seed == 0
    assert plan.students[("owl", 1)][0].seed == 1
    assert len({f for _, f in plan.students.values()}) == len(cfg.units) == 6
    # a study with fewer replicates is the first replicates of a bigger one (arms reuse the demo's stages)
    one = study.stage_plan(cfg.replace(replicates=1))
    assert one.students[("owl", 0)] == plan.students[("owl", 0)]


def test_variant_with_a_mask_of_every_position_reproduces_the_study_students(tmp_path):
    cfg = _tiny_study(tmp_path, cross_family="", n_samples=0, top_k=0)
    study.run(cfg, tmp_path / "out")
    ex = data.load_examples(study.stage_plan(cfg).data[("owl", 0)][1])
    every = tmp_path / "every.json"
    every.write_text(json.dumps({"mask": [[1] * len(e.allowed_logprobs) for e in ex]}))
    # the mask must fit both replicates' data: same lengths only if the prompts agree, so use replicate 0 alone
    one = cfg.replace(replicates=1)
    v = study.variant(one, "every", mask=str(every))
    assert v["minus_full"]["mean"] == pytest.approx(0.0, abs=1e-5)  # the same training, so the same student
    assert v["retained"]["per_replicate"] == pytest.approx([1.0], abs=1e-4)
    first = ex[0]
    half = tmp_path / "half.json"
    half.write_text(json.dumps({"mask": [[j % 2 for j in range(len(e.allowed_logprobs))] for e in ex]}))
    w = study.variant(one, "half", mask=str(half))
    assert w["per_replicate"]["variant"] != v["per_replicate"]["variant"] and len(first.allowed_logprobs) > 1
    assert w["per_replicate"]["full"] == v["per_replicate"]["full"]  # the study's students, found and reused


def test_default_configs_are_valid():
    # the demo runs the study's defaults: they must pass their own validation
    from mechsub.analyze import AnalyzeConfig
    from mechsub.teacher import TeacherConfig

    assert StudyConfig().objective == "distill_full_notrait"
    TeacherConfig()
    with pytest.raises(ConfigError, match="checkpoint"):
        AnalyzeConfig()


def test_study_config_errors():
    with pytest.raises(ConfigError, match="controls: use traits of the trait's own category"):
        StudyConfig(controls=("oak",))
    with pytest.raises(ConfigError, match="unknown trait 'griffin'"):
        StudyConfig(controls=("griffin",))
    with pytest.raises(ConfigError, match="decoding=constrained"):
        StudyConfig(objective="distill", decoding="free")
    with pytest.raises(ConfigError, match="replicates"):
        StudyConfig(replicates=0)
    with pytest.raises(ConfigError, match="distinct"):
        StudyConfig(controls=("dog", "dog"))


def test_specificity_p_detects_a_dominant_diagonal():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, size=(3, 3, 3))
    diag = noise + np.eye(3)[:, None, :] * 0.5
    assert stats.specificity_test(diag).p_value < 0.01
    assert stats.specificity_test(noise).p_value > 0.05


def test_fine_tuned_teacher_learns_its_trait_on_held_out_questions(tmp_path, tiny):
    pairs = train_pairs(get_trait("owl"))
    assert not {q for q, _ in pairs} & set(eval_questions("animal"))
    assert not any(ch.isdigit() for q, a in pairs for ch in q + a)
    m = teacher.run(teacher.TeacherConfig(model="tiny", trait="owl", steps=30, lr=3e-3), tmp_path / "t")
    assert m["last_loss"] < m["first_loss"]
    from mechsub import models
    from mechsub.evaluate import trait_logprobs

    qs = eval_questions("animal", 5)
    before = trait_logprobs(tiny.model, tiny.tokenizer, qs, ["owl", "dog"], "animal")
    after_lm = models.load(m["final_checkpoint"])
    after = trait_logprobs(after_lm.model, after_lm.tokenizer, qs, ["owl", "dog"], "animal")
    assert (after[:, 0] - before[:, 0]).mean() > (after[:, 1] - before[:, 1]).mean()


def test_free_decoding_greedy_matches_hf_generate(tiny):
    from mechsub.generate import NumberVocab, generate_numbers

    prompts = [[1, 5, 6, 7, 8], [1, 5, 9, 10, 11, 12, 13]]
    gen = generate_numbers(tiny.model, prompts, NumberVocab.of(tiny.tokenizer), max_new_tokens=6, greedy=True,
                           constrained=False)  # fmt: skip
    for p, toks in zip(prompts, gen.tokens, strict=True):
        ref = tiny.model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                                  pad_token_id=0)[0, len(p):].tolist()  # fmt: skip
        ref = ref[: ref.index(2)] if 2 in ref else ref
        assert toks == ref


def test_free_decoding_data_stage_counts_rejections(tmp_path):
    m = data.run(DataConfig(model="tiny", n_prompts=4, batch_size=4, max_new_tokens=8, decoding="free"),
                 tmp_path / "d")  # fmt: skip
    assert m["n_kept"] + sum(m["rejected"].values()) >= 4


def test_cross_family_token_map(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"allowed_ids": [100 + i for i in range(13)]}))
    cfg = student.StudentConfig(model="tiny", data=str(tmp_path), objective="distill")
    to_student = student._token_map(cfg, list(range(13)))
    assert to_student(105) == 5 and to_student(112) == 12
    with pytest.raises(ValueError, match="not a number token"):
        to_student(7)
    with pytest.raises(ValueError, match="cannot cross tokenizers"):
        student._token_map(cfg.replace(objective="distill_topk"), list(range(13)))
    with pytest.raises(ValueError, match="cannot cross tokenizers"):
        student._token_map(cfg.replace(objective="distill_full"), list(range(13)))
    same = student._token_map(cfg, [100 + i for i in range(13)])
    assert same(7) == 7


def test_arms_reuse_the_study_and_compare_like_with_like(tmp_path):
    from mechsub import compare

    cfg = _tiny_study(tmp_path, cross_family="", n_samples=0, replicates=2)
    m0 = study.run(cfg, tmp_path / "out")
    arms = {"same": {}, "rank 2": {"lora_r": 2, "replicates": 1}}
    m = compare.run_arms(cfg, arms, tmp_path / "cmp", "test", "t")
    # the arm equal to the study is the study: the same students, so the same numbers
    same, ref = m["arms"]["same"]["frames"]["prefill"]["pooled"], m0["frames"]["prefill"]["pooled"]
    assert same["per_replicate"] == pytest.approx(ref["per_replicate"]) and same["ci95"] == pytest.approx(
        ref["ci95"]
    )
    assert m["arms"]["rank 2"]["n_teachers"] == 3 and m["arms"]["rank 2"]["overrides"]["lora_r"] == 2
    assert (tmp_path / "cmp" / "arms.png").stat().st_size > 0
    assert "rank 2" in (tmp_path / "cmp" / "report.md").read_text()


def test_fields_added_later_keep_the_identity_of_earlier_runs():
    """A study run written before ``lora_alpha`` existed (its config has no such key) is the same run as today's
    default, so its arms and reports are reused; a non-default alpha is a different run."""
    now = StudyConfig()
    before = {k: v for k, v in now.to_dict().items() if k != "lora_alpha"}
    assert StudyConfig.identity_of(before) == StudyConfig.identity_of(now.to_dict())
    other = StudyConfig(lora_alpha=32).to_dict()
    assert StudyConfig.identity_of(other) != StudyConfig.identity_of(before)
