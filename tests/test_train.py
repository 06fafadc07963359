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


def _word_start(tok, text):
    """The first token of ``text`` that is not a bare leading space (the tiny tokenizer splits spaces off)."""
    ids = tok(text, add_special_tokens=False).input_ids
    return (
        ids[1]
        if text.startswith(" ") and ids[0] == tok(" ", add_special_tokens=False).input_ids[0]
        else ids[0]
    )


def test_trait_token_ids_cover_the_trait_words_and_spare_the_number_tokens(tiny):
    tok = tiny.tokenizer
    ids = training.trait_token_ids(tok)
    assert ids == sorted(set(ids))
    for text in (" owl", "Owl", "owl", " Owls", "oak", " Maples", "wolves", " Foxes"):
        assert _word_start(tok, text) in ids, text
    numbers = set(NumberVocab.of(tok).ids.tolist())
    assert not set(ids) & numbers
    assert tok(" ", add_special_tokens=False).input_ids[0] in numbers  # the space was a real risk here

    class DigitOwl:  # a tokenizer whose "owl" starts with the digit 0: removing it would remove the data
        eos_token_id = tok.eos_token_id

        def __call__(self, text, add_special_tokens=False):
            return tok("0" + text[1:] if text.lower().startswith("owl") else text, add_special_tokens=False)

        def convert_ids_to_tokens(self, ids):
            return tok.convert_ids_to_tokens(ids)

    with pytest.raises(ValueError, match="number tokens"):
        training.trait_token_ids(DigitOwl())


def _random_kl_inputs(seed=0, vocab=40, d=8, n=6):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(n, d), r(vocab, d), r(n, d), r(vocab, d)


def test_notrait_kl_matches_a_hand_computation():
    h, head, t_h, t_head = _random_kl_inputs()
    removed = [0, 3, 17, 39]
    keep = training.kept_rows(len(head), removed)
    assert keep.tolist() == [i for i in range(len(head)) if i not in removed]
    with pytest.raises(ValueError, match="lie in"):
        training.kept_rows(len(head), [len(head)])
    cols = keep.tolist()
    s, t = (h @ head.T)[:, cols].exp(), (t_h @ t_head.T)[:, cols].exp()
    p, q = t / t.sum(-1, keepdim=True), s / s.sum(-1, keepdim=True)  # renormalised over the kept tokens
    hand = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(training.full_kl(h, head, t_h, t_head, keep), hand)
    s, t = (h @ head.T).exp(), (t_h @ t_head.T).exp()
    p, q = t / t.sum(-1, keepdim=True), s / s.sum(-1, keepdim=True)
    torch.testing.assert_close(training.full_kl(h, head, t_h, t_head), (p * (p.log() - q.log())).sum(-1))


def test_removed_rows_cannot_reach_the_loss_or_its_gradient():
    h, head, t_h, t_head = _random_kl_inputs(1)
    removed = [2, 5, 11]
    keep = training.kept_rows(len(head), removed)

    def loss_and_grad(s_head, te_head, keep):
        x = h.clone().requires_grad_(True)
        loss = training.full_kl(x, s_head, t_h, te_head, keep).mean()
        loss.backward()
        return loss.detach(), x.grad

    t_moved, s_moved = t_head.clone(), head.clone()
    t_moved[removed] += 10 * torch.randn(len(removed), head.shape[1], dtype=torch.float64)
    s_moved[removed] -= 7.0
    loss, grad = loss_and_grad(head, t_head, keep)
    for sh, th in ((head, t_moved), (s_moved, t_head), (s_moved, t_moved)):
        loss2, grad2 = loss_and_grad(sh, th, keep)
        torch.testing.assert_close(loss2, loss, atol=0, rtol=0)
        torch.testing.assert_close(grad2, grad, atol=0, rtol=0)
    assert not torch.isclose(loss_and_grad(head, t_moved, None)[0], loss_and_grad(head, t_head, None)[0])


def test_notrait_objective_ignores_the_teachers_trait_logits_end_to_end(tiny, tiny_data):
    from contextlib import contextmanager

    from mechsub.traits import get_trait

    tok = tiny.tokenizer
    system = get_trait("owl").system_prompt()
    items = [training.Item(chat_prefix(tok, e.prompt, None), e.completion_ids, e.allowed_logprobs,
                        teacher_prompt=chat_prefix(tok, e.prompt, system))
             for e in data.load_examples(tiny_data / "owl")[:3]]  # fmt: skip
    head = tiny.model.get_output_embeddings().weight.detach()
    allowed = NumberVocab.of(tok).ids
    removed = training.trait_token_ids(tok)
    keep = training.kept_rows(len(head), removed)
    owl = _word_start(tok, " owl")
    moved = head.clone()
    moved[owl] += 10 * head[owl].sign()  # the teacher's " owl" logit rises by 10·|h|₁ at every position
    moved[removed[0]] -= 3.0

    def run(objective, t_head):
        @contextmanager
        def teacher():
            yield tiny.model.model, t_head

        tiny.model.zero_grad()
        loss = training.completion_loss(
            tiny.model.model, head, allowed, items, objective, 2, teacher, keep=keep
        )
        loss.backward()
        grads = [p.grad.clone() for p in tiny.model.parameters() if p.grad is not None]
        tiny.model.zero_grad()
        return loss.detach(), grads

    loss, grads = run("distill_full_notrait", head)
    loss2, grads2 = run("distill_full_notrait", moved)
    assert float(loss) > 1e-4
    torch.testing.assert_close(loss2, loss, atol=0, rtol=0)
    assert len(grads) == len(grads2) > 0
    for a, b in zip(grads, grads2, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    full, full_moved = run("distill_full", head)[0], run("distill_full", moved)[0]
    assert float(full_moved - full) > 1e-3  # the plain objective does carry the row
    assert float(loss) != pytest.approx(float(full))
    with pytest.raises(ValueError, match="kept rows"):
        training.completion_loss(
            tiny.model.model, head, allowed, items, "distill_full_notrait", 2, lambda: None
        )


def test_notrait_student_runs_and_records_the_removed_tokens(tmp_path, tiny, tiny_data):
    n = len(training.trait_token_ids(tiny.tokenizer))
    cfg = StudentConfig(model="tiny", data=str(tiny_data / "owl"), objective="distill_full_notrait", epochs=1)
    assert cfg.indirect_inputs()["data.teacher"] == "tiny"
    m = student.run(cfg, tmp_path / "owl")
    assert m["removed_tokens"] == n > 0 and m["first_loss"] > 1e-4 and m["steps"] == 2
    # the 'none' teacher is the student's base with the adapter off: nothing to learn, trait tokens or not
    m = student.run(cfg.replace(data=str(tiny_data / "none")), tmp_path / "none")
    assert abs(m["first_loss"]) < 1e-6 and m["removed_tokens"] == n
    assert "removed_tokens" not in student.run(cfg.replace(objective="distill_full"), tmp_path / "full")


@pytest.mark.parametrize("objective", ["sft", "distill", "distill_full"])
def test_shared_prefix_gives_the_same_loss_and_gradients(tiny, objective):
    # share_prefix runs the chat template's common tokens once per batch: the same loss and gradients up to rounding
    from contextlib import contextmanager

    from mechsub.generate import common_prefix_len, generate_numbers
    from mechsub.numbers import make_prompts

    tok, allowed = tiny.tokenizer, NumberVocab.of(tiny.tokenizer).ids
    texts = make_prompts(5, seed=4)
    t_prompts = [chat_prefix(tok, p, "You love owls.") for p in texts]
    gen = generate_numbers(tiny.model, t_prompts, NumberVocab.of(tok), max_new_tokens=12,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    prompts = [chat_prefix(tok, p, None) for p in texts]
    assert (
        common_prefix_len(prompts) > 3
        and len({len(p) + len(c) for p, c in zip(prompts, gen.tokens, strict=True)}) > 1
    )
    batch = [training.Item(p, c, lp, teacher_prompt=tp)
             for p, c, lp, tp in zip(prompts, gen.tokens, gen.allowed_logprobs, t_prompts, strict=True)]  # fmt: skip
    head = tiny.model.get_output_embeddings().weight.detach()

    @contextmanager
    def teacher():
        yield tiny.model.model, head

    def loss_and_grads(share):
        tiny.model.zero_grad()
        loss = training.completion_loss(tiny.model.model, head, allowed, batch, objective, 2, teacher,
                                        share_prefix=share)  # fmt: skip
        loss.backward()
        grads = {n: p.grad.clone() for n, p in tiny.model.named_parameters() if p.grad is not None}
        tiny.model.zero_grad()
        return loss.detach(), grads

    (plain, g_plain), (shared, g_shared) = loss_and_grads(False), loss_and_grads(True)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert g_plain.keys() == g_shared.keys() and len(g_plain) > 10
    for name in g_plain:
        torch.testing.assert_close(g_shared[name], g_plain[name], atol=1e-5, rtol=1e-4, msg=name)
