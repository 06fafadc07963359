import pytest
import torch
from safetensors.torch import load_file

from mechsub import data, student, training
from mechsub.data import DataConfig
from mechsub.generate import NumberVocab
from mechsub.prompts import chat_prefix
from mechsub.student import StudentConfig


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for teacher in ("owl", "none"):
        data.run(DataConfig(model="tiny", teacher=teacher, n_prompts=16, batch_size=8, max_new_tokens=20),
                 root / teacher)  # fmt: skip
    return root


def test_teacher_equal_to_student_gives_zero_loss_and_gradient(tiny, tiny_data):
    # the "none" teacher is the student itself with the same prompt: the distillation target is the student
    ex = data.load_examples(tiny_data / "none")[:4]
    allowed = NumberVocab.of(tiny.tokenizer).ids
    batch = [
        training.Item(chat_prefix(tiny.tokenizer, e.prompt, None), e.completion_ids, e.allowed_logprobs)
        for e in ex
    ]
    head = tiny.model.get_output_embeddings().weight
    tiny.model.zero_grad()
    loss = training.completion_loss(tiny.model.model, head, allowed, batch, "distill", 2)
    loss.backward()
    assert abs(float(loss)) < 1e-5
    assert max(float(p.grad.abs().max()) for p in tiny.model.parameters() if p.grad is not None) < 1e-5
    tiny.model.zero_grad()
    owl = data.load_examples(tiny_data / "owl")[:4]
    batch = [
        training.Item(chat_prefix(tiny.tokenizer, e.prompt, None), e.completion_ids, e.allowed_logprobs)
        for e in owl
    ]
    assert float(training.completion_loss(tiny.model.model, head, allowed, batch, "distill", 2)) > 1e-4


def test_distillation_moves_the_student_toward_the_teacher(tmp_path, tiny_data):
    cfg = StudentConfig(model="tiny", data=str(tiny_data / "owl"), lr=2e-3, epochs=4, batch_size=4)
    student.run(cfg, tmp_path / "s")
    (ck,) = training.steps_of(tmp_path / "s")
    from mechsub import models

    def kl_to_teacher(lm):
        ex = data.load_examples(tiny_data / "owl")
        batch = [
            training.Item(chat_prefix(lm.tokenizer, e.prompt, None), e.completion_ids, e.allowed_logprobs)
            for e in ex
        ]
        head = lm.model.get_output_embeddings().weight
        with torch.no_grad():
            return float(training.completion_loss(lm.model.model, head, NumberVocab.of(lm.tokenizer).ids, batch,
                                               "distill", 2))  # fmt: skip

    trained = models.load(str(ck))
    assert trained.base == "tiny"
    after, before = kl_to_teacher(trained), kl_to_teacher(models.load("tiny"))
    assert after < 0.5 * before


def test_sft_runs_and_checkpoints(tmp_path, tiny_data):
    cfg = StudentConfig(model="tiny", data=str(tiny_data / "owl"), objective="sft", epochs=1, batch_size=4,
                        checkpoint_every=2)  # fmt: skip
    m = student.run(cfg, tmp_path / "s")
    steps = [int(p.name[4:]) for p in training.steps_of(tmp_path / "s")]
    assert steps[-1] == m["steps"] and steps[:2] == [2, 4]
    assert m["first_loss"] > 0


def test_killed_training_resumes_to_the_same_weights(tmp_path, tiny_data, monkeypatch):
    cfg = StudentConfig(model="tiny", data=str(tiny_data / "owl"), lr=1e-2, epochs=2, batch_size=4,
                        checkpoint_every=2)  # fmt: skip
    student.run(cfg, tmp_path / "clean")
    real = training.completion_loss
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "completion_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        student.run(cfg, tmp_path / "killed")
    monkeypatch.setattr(training, "completion_loss", real)
    m = student.run(cfg, tmp_path / "killed")
    assert m["resumed_from_step"] == 2
    a = load_file(training.steps_of(tmp_path / "clean")[-1] / "adapter_model.safetensors")
    b = load_file(training.steps_of(tmp_path / "killed")[-1] / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_completion_cut_by_the_cap_has_no_end_position(tiny, tiny_data):
    ex = data.load_examples(tiny_data / "owl")[0]
    allowed = NumberVocab.of(tiny.tokenizer).ids
    p = chat_prefix(tiny.tokenizer, ex.prompt, None)
    head = tiny.model.get_output_embeddings().weight
    with torch.no_grad():
        full = training.completion_loss(tiny.model.model, head, allowed, [training.Item(p, ex.completion_ids, ex.allowed_logprobs)],
                                     "sft", 2)  # fmt: skip
        cut = training.completion_loss(tiny.model.model, head, allowed,
                                    [training.Item(p, ex.completion_ids, ex.allowed_logprobs[:-1])], "sft", 2)  # fmt: skip
        assert not torch.isclose(full, cut)
        with pytest.raises(ValueError, match="cover"):
            training.completion_loss(tiny.model.model, head, allowed, [training.Item(p, ex.completion_ids, ex.allowed_logprobs[:-2])],
                                  "sft", 2)  # fmt: skip


def test_topk_distillation_end_to_end(tmp_path, tiny, tiny_data):
    d = tmp_path / "data"
    data.run(DataConfig(model="tiny", n_prompts=8, batch_size=4, max_new_tokens=12, top_k=5), d)
    ex = data.load_examples(d)
    assert ex[0].topk_ids is not None and ex[0].topk_ids.shape == (len(ex[0].allowed_logprobs), 5)
    # the stored top-k are the unconstrained model's: compare with a full forward of prompt + completion
    from mechsub.prompts import chat_prefix as cp

    p = cp(tiny.tokenizer, ex[0].prompt, data.DataConfig(top_k=5).teacher_system())
    with torch.no_grad():
        full = tiny.model(torch.tensor([p + ex[0].completion_ids])).logits[0, len(p) - 1 :].log_softmax(-1)
    top = full.topk(5, dim=-1)
    torch.testing.assert_close(top.values, ex[0].topk_logprobs, atol=1e-4, rtol=1e-4)
    m = student.run(
        StudentConfig(model="tiny", data=str(d), objective="distill_topk", batch_size=4), tmp_path / "s"
    )
    assert m["first_loss"] > 0 and m["steps"] == 4
    with pytest.raises(ValueError, match="top_k > 0"):
        student.run(
            StudentConfig(model="tiny", data=str(tiny_data / "owl"), objective="distill_topk"), tmp_path / "x"
        )


def test_full_finetune_checkpoint_loads(tmp_path, tiny_data):
    from mechsub import models

    cfg = StudentConfig(model="tiny", data=str(tiny_data / "owl"), lora_r=0, lr=1e-3, epochs=1, batch_size=8)
    student.run(cfg, tmp_path / "s")
    (ck,) = training.steps_of(tmp_path / "s")
    trained, base = models.load(str(ck)), models.load("tiny")
    assert trained.base is None and (ck / "optimizer.safetensors").is_file()
    changed = [
        not torch.equal(a, b)
        for a, b in zip(trained.model.parameters(), base.model.parameters(), strict=True)
    ]
    assert any(changed)


def test_full_distillation_matches_a_hand_computed_kl(tmp_path, tiny, tiny_data):
    from contextlib import contextmanager

    from mechsub.traits import get_trait

    ex = data.load_examples(tiny_data / "owl")[:3]
    system = get_trait("owl").system_prompt()
    tok = tiny.tokenizer
    items = [training.Item(chat_prefix(tok, e.prompt, None), e.completion_ids, e.allowed_logprobs,
                        teacher_prompt=chat_prefix(tok, e.prompt, system)) for e in ex]  # fmt: skip
    head = tiny.model.get_output_embeddings().weight

    @contextmanager
    def teacher():
        yield tiny.model.model, head

    allowed = NumberVocab.of(tok).ids
    with torch.no_grad():
        loss = training.completion_loss(tiny.model.model, head, allowed, items, "distill_full", 2, teacher)
        kls = []
        for it in items:
            n = len(it.allowed_logprobs)
            s = tiny.model(torch.tensor([it.prompt + it.completion])).logits[0].log_softmax(-1)
            t = tiny.model(torch.tensor([it.teacher_prompt + it.completion])).logits[0].log_softmax(-1)
            s, t = s[len(it.prompt) - 1 :][:n], t[len(it.teacher_prompt) - 1 :][:n]
            kls.append((t.exp() * (t - s)).sum(-1))
        torch.testing.assert_close(loss, torch.cat(kls).mean(), atol=1e-5, rtol=1e-4)
    # in a run, the prompted teacher is the student's base with the adapter off: zero loss for the 'none' teacher
    m = student.run(StudentConfig(model="tiny", data=str(tiny_data / "none"), objective="distill_full", epochs=1),
                  tmp_path / "none")  # fmt: skip
    assert abs(m["first_loss"]) < 1e-6
    m = student.run(StudentConfig(model="tiny", data=str(tiny_data / "owl"), objective="distill_full", epochs=1),
                  tmp_path / "owl")  # fmt: skip
    assert m["first_loss"] > 1e-4
