import json

import pytest
import torch

from mechsub import data, divergence, student, training
from mechsub.config import ConfigError
from mechsub.data import DataConfig
from mechsub.generate import NumberVocab
from mechsub.prompts import chat_prefix
from mechsub.student import StudentConfig


@pytest.fixture(scope="module")
def greedy_owl(tmp_path_factory):
    d = tmp_path_factory.mktemp("greedy") / "owl"
    data.run(
        DataConfig(model="tiny", teacher="owl", greedy=True, n_prompts=12, batch_size=12, max_new_tokens=16),
        d,
    )
    return d


def test_the_factual_teacher_never_diverges_from_itself(tmp_path, greedy_owl):
    m = divergence.run(
        divergence.DivergenceConfig(data=str(greedy_owl), counterfactuals=("owl",)), tmp_path / "d"
    )
    assert m["factual_greedy_agreement"] == 1.0  # greedy data: the stored log-probs' argmax is the data
    assert m["divergent_share"] == 0.0


def test_other_teachers_diverge_and_the_masks_partition_the_positions(tmp_path):
    # the real model (the random tiny one ranks one digit first whatever the prompt): prompted owl teacher, greedy
    owl = tmp_path / "owl"
    data.run(DataConfig(teacher="owl", greedy=True, n_prompts=8, batch_size=8, max_new_tokens=16), owl)
    cfg = divergence.DivergenceConfig(data=str(owl), counterfactuals=("dog", "cat", "eagle"))
    m = divergence.run(cfg, tmp_path / "d")
    assert 0 < m["divergent_share"] < 1
    assert m["divergent_share"] >= max(m["share_by_counterfactual"].values())  # "any of them" ≥ each one
    div = json.loads((tmp_path / "d" / "divergent.json").read_text())["mask"]
    rest = json.loads((tmp_path / "d" / "non_divergent.json").read_text())["mask"]
    ex = data.load_examples(owl)
    assert [len(r) for r in div] == [len(e.allowed_logprobs) for e in ex]
    assert all(a + b == 1 for ra, rb in zip(div, rest, strict=True) for a, b in zip(ra, rb, strict=True))
    assert sum(map(sum, div)) == round(m["divergent_share"] * m["n_positions"])


def test_bad_counterfactual_is_named():
    with pytest.raises(ConfigError, match="neither a folder nor a trait"):
        divergence.DivergenceConfig(data="x", counterfactuals=("not-an-animal",))


def test_masked_loss_is_the_mean_over_marked_positions(tiny, greedy_owl):
    ex = data.load_examples(greedy_owl)[:3]
    allowed = NumberVocab.of(tiny.tokenizer).ids
    head = tiny.model.get_output_embeddings().weight
    items = [
        training.Item(chat_prefix(tiny.tokenizer, e.prompt, None), e.completion_ids, e.allowed_logprobs)
        for e in ex
    ]
    with torch.no_grad():
        per = training._position_losses(tiny.model.model, head, allowed, items, "distill", 2, None)
        weights = [torch.tensor([float(j % 3 == 0) for j in range(len(e.allowed_logprobs))]) for e in ex]
        for it, w in zip(items, weights, strict=True):
            it.weight = w
        masked = training.completion_loss(tiny.model.model, head, allowed, items, "distill", 2)
    w = torch.cat(weights)
    assert float(masked) == pytest.approx(float(per[w > 0].mean()), rel=1e-5)
    assert float(masked) != pytest.approx(float(per.mean()), rel=1e-3)


def test_student_trains_on_a_mask_and_rejects_one_made_for_other_data(tmp_path, greedy_owl):
    ex = data.load_examples(greedy_owl)
    rows = [
        [1] * len(e.allowed_logprobs) if i % 2 else [0] * len(e.allowed_logprobs) for i, e in enumerate(ex)
    ]
    (tmp_path / "half.json").write_text(json.dumps({"mask": rows}))
    m = student.run(StudentConfig(model="tiny", data=str(greedy_owl), mask=str(tmp_path / "half.json"), epochs=1,
                                batch_size=2), tmp_path / "s")  # fmt: skip
    assert m["n_examples"] == len(ex) // 2  # examples with no marked position are dropped
    (tmp_path / "short.json").write_text(json.dumps({"mask": rows[:-1]}))
    with pytest.raises(ValueError, match="made\nfor other data|other data"):
        student.run(
            StudentConfig(model="tiny", data=str(greedy_owl), mask=str(tmp_path / "short.json")),
            tmp_path / "t",
        )
    with pytest.raises(FileNotFoundError, match="mechsub divergence"):
        student.run(
            StudentConfig(model="tiny", data=str(greedy_owl), mask=str(tmp_path / "none.json")),
            tmp_path / "u",
        )
