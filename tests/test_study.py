import json

import numpy as np
import pytest
import torch

from mechsub import data, stats, student, study, teacher
from mechsub.config import ConfigError
from mechsub.data import DataConfig
from mechsub.study import StudyConfig
from mechsub.traits import eval_questions, get_trait, train_pairs


def _tiny_study(tmp_path, **kw):
    base = dict(model="tiny", teacher_kind="prompted", greedy=False, n_prompts=8, max_new_tokens=12, top_k=5, batch_size=4, seeds=(0, 1),
                n_questions=3, n_samples=2, cross_family="tiny", work=str(tmp_path / "work"))  # fmt: skip
    return StudyConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        {},  # prompted teachers, full-vocabulary distillation, a cross-family student
        {"objective": "distill_topk", "top_k": 5, "cross_family": "", "n_samples": 0, "seeds": (0,)},
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
    for key in ("trait", "wall_seconds"):
        assert key in m
    for key in ("teacher", "student", "control"):
        assert np.isfinite(m[key]["delta_logp"])
    n = len(cfg.seeds)
    assert m["effect"]["n_seeds"] == n and len(m["effect"]["ci95"]) == 2
    assert 0 < m["effect"]["p_value"] <= 1 if n > 1 else m["effect"]["p_value"] is None
    # the effect is the trait's students minus the other traits' students, seed by seed
    spec = m["specificity"]["matrix_per_seed"]
    by_hand = [spec["owl"]["owl"][j] - (spec["dog"]["owl"][j] + spec["cat"]["owl"][j]) / 2 for j in range(n)]
    assert m["effect"]["per_seed"] == pytest.approx(by_hand)
    if cfg.cross_family:
        assert np.isfinite(m["cross_family"]["effect"]["delta_logp"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.split("<body>")[1]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["trait"] == "owl"
    # a second run reuses every stage (and returns the finished study)
    assert study.run(cfg, tmp_path / "out")["effect"] == m["effect"]


def test_variant_with_a_mask_of_every_position_reproduces_the_study_students(tmp_path):
    cfg = _tiny_study(tmp_path, cross_family="", n_samples=0, top_k=0)
    study.run(cfg, tmp_path / "out")
    ex = data.load_examples(study.stage_plan(cfg).data["owl"][1])
    every = tmp_path / "every.json"
    every.write_text(json.dumps({"mask": [[1] * len(e.allowed_logprobs) for e in ex]}))
    v = study.variant(cfg, "every", mask=str(every))
    assert v["minus_full"]["mean"] == pytest.approx(0.0, abs=1e-5)  # the same training, so the same student
    assert v["retained"]["per_seed"] == pytest.approx([1.0, 1.0], abs=1e-4)
    first = ex[0]
    half = tmp_path / "half.json"
    half.write_text(json.dumps({"mask": [[j % 2 for j in range(len(e.allowed_logprobs))] for e in ex]}))
    w = study.variant(cfg, "half", mask=str(half))
    assert w["per_seed"]["variant"] != v["per_seed"]["variant"] and len(first.allowed_logprobs) > 1
    assert w["per_seed"]["full"] == v["per_seed"]["full"]  # the study's students, found and reused


def test_default_configs_are_valid():
    # the demo runs the study's defaults: they must pass their own validation
    from mechsub.analyze import AnalyzeConfig
    from mechsub.teacher import TeacherConfig

    assert StudyConfig().objective == "distill_full"
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
