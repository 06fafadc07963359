import copy

import pytest
import torch

from mechsub import hooks

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]])


def _hidden_states(lm, ids=IDS):
    with torch.no_grad():
        return lm.model(ids, output_hidden_states=True).hidden_states


def _check_reads(lm, ids):
    n = lm.n_layers
    hs = _hidden_states(lm, ids)
    acts = hooks.read(lm, ids, hooks.names(lm))
    # hidden_states[L + 1] is the residual after block L, but the last one has the final norm applied
    for L in range(n - 1):
        assert torch.equal(acts[hooks.resid_post(L)], hs[L + 1]), L
    assert torch.equal(acts["ln_final.hook_out"], hs[n])
    assert torch.equal(acts["hook_embed"], hs[0])
    # every block: the residual is the sum of what each sublayer adds (a wrong module for attn_out/mlp_out fails)
    for layer in range(n):
        a = {p: acts[hooks.block(layer, p)] for p in hooks.POINTS}
        torch.testing.assert_close(a["hook_resid_mid"], a["hook_resid_pre"] + a["hook_attn_out"])
        torch.testing.assert_close(a["hook_resid_post"], a["hook_resid_mid"] + a["hook_mlp_out"])
        if layer < n - 1:
            assert torch.equal(acts[hooks.block(layer + 1, "hook_resid_pre")], a["hook_resid_post"])


def test_reads_equal_hidden_states_at_every_layer(tiny):
    _check_reads(tiny, IDS)


@pytest.mark.slow
def test_reads_equal_hidden_states_on_smollm2(smol):
    _check_reads(
        smol, smol.tokenizer("User: 182, 818, 907\nAssistant: 311, 42", return_tensors="pt").input_ids
    )


@pytest.mark.slow
def test_reads_equal_hidden_states_on_gemma3():
    """gemma's sandwich norms map attn_out and mlp_out onto other modules than llama's."""
    from mechsub import models

    lm = models.load("gemma3-270m", verify=False)
    _check_reads(lm, lm.tokenizer("User: 182, 818, 907\nAssistant: 311, 42", return_tensors="pt").input_ids)


def test_identity_edit_changes_no_logit(tiny):
    with torch.no_grad():
        clean = tiny.model(IDS).logits
        for name in hooks.names(tiny):
            with hooks.edit(tiny, {name: lambda h: h}):
                assert torch.equal(tiny.model(IDS).logits, clean), name


def test_an_edit_shows_in_a_read_of_the_same_forward(tiny):
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    clean = hooks.read(tiny, IDS, [hooks.resid_post(0), "blocks.1.hook_resid_pre"])
    # the capture is entered first: the edit, installed later, must still come before it
    with (
        hooks.capture(tiny, [hooks.resid_post(0), "blocks.1.hook_resid_pre"]) as acts,
        torch.no_grad(),
        hooks.edit(tiny, {hooks.resid_post(0): lambda h: h + v}),
    ):
        edited_logits = tiny.model(IDS).logits
    for name in acts:
        torch.testing.assert_close(acts[name], clean[name] + v)
    with torch.no_grad():
        assert not torch.allclose(edited_logits, tiny.model(IDS).logits)


def test_resid_mid_edit_is_the_residual_the_mlp_reads(tiny):
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    clean = hooks.read(tiny, IDS, ["blocks.1.hook_resid_mid"])["blocks.1.hook_resid_mid"]
    names = ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    with hooks.edit(tiny, {"blocks.1.hook_resid_mid": lambda h: h + v}):
        acts = hooks.read(tiny, IDS, names)
    mid = acts["blocks.1.hook_resid_mid"]
    torch.testing.assert_close(mid, clean + v)
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"], mid + acts["blocks.1.hook_mlp_out"])


def test_position_patch_writes_only_those_positions(tiny):
    src = torch.randn(2, IDS.shape[1], 64)
    with hooks.edit(tiny, {hooks.resid_post(0): hooks.patch(src, [2, -1])}):
        got = hooks.read(tiny, IDS, [hooks.resid_post(0)])[hooks.resid_post(0)]
    clean = hooks.read(tiny, IDS, [hooks.resid_post(0)])[hooks.resid_post(0)]
    assert torch.equal(got[:, [2, -1]], src[:, [2, -1]])
    keep = [p for p in range(IDS.shape[1]) if p not in (2, IDS.shape[1] - 1)]
    assert torch.equal(got[:, keep], clean[:, keep])


def test_unknown_hook_name_lists_the_nearest(tiny):
    with pytest.raises(hooks.HookNameError, match="did you mean blocks.1.hook_resid_post"):
        hooks.read(tiny, IDS, ["blocks.1.hook_resid_pots"])
    with pytest.raises(hooks.HookNameError, match="did you mean ln_final.hook_out"):
        hooks.check(tiny, ["ln_final.hook_normalized"])
    with pytest.raises(hooks.HookNameError, match="unknown hook name 'blocks.2.hook_resid_post'"):
        hooks.edit(tiny, {"blocks.2.hook_resid_post": lambda h: h}).__enter__()  # tiny has 2 layers


def test_resid_post_layer_reads_back_the_layer_and_refuses_other_names():
    assert hooks.resid_post_layer(hooks.resid_post(12)) == 12
    for bad in ("blocks.3.hook_mlp_out", "blocks.x.hook_resid_post", "ln_final.hook_out"):
        with pytest.raises(hooks.HookNameError, match="not a residual-stream hook name"):
            hooks.resid_post_layer(bad)


def test_hooks_are_removed_and_a_read_stops_after_its_last_hook(tiny):
    modules = list(tiny.model.modules())

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)

    before = n_hooks()
    calls = []
    h = tiny.model.model.norm.register_forward_hook(lambda *a: calls.append(1))
    try:
        hooks.read(tiny, IDS, ["blocks.0.hook_resid_post"])
        assert calls == []  # nothing after block 0 ran
        hooks.read(tiny, IDS, ["ln_final.hook_out"])
        assert calls == [1]
    finally:
        h.remove()
    with pytest.raises(ValueError, match="returned"), hooks.edit(tiny, {"hook_embed": lambda h: h[:, :1]}):
        tiny.model(IDS)  # a wrong shape is refused with the hook's name
    with pytest.raises(RuntimeError), hooks.capture(tiny, hooks.names(tiny)):
        raise RuntimeError
    assert n_hooks() == before


def test_nnsight_addresses_the_same_activations_by_name(tiny):
    import nnsight

    lm = copy.copy(tiny)
    lm.model = copy.deepcopy(tiny.model)  # nnsight instruments the modules it wraps for good
    view = hooks.nnsight_view(lm)
    names = hooks.names(lm)
    want = hooks.read(lm, IDS, names)
    with torch.no_grad(), view.trace(IDS):
        got = nnsight.save({n: hooks.at(view, n) for n in names})
    for n in names:
        assert torch.equal(got[n], want[n]), n
    # a write through nnsight is the edit hooks.edit makes
    for name in ("blocks.0.hook_attn_out", "blocks.1.hook_resid_pre", hooks.resid_post(0)):
        with torch.no_grad(), view.trace(IDS):
            hooks.set_at(view, name, hooks.at(view, name) * 2)
            logits = view.output.logits.save()
        with torch.no_grad(), hooks.edit(lm, {name: lambda h: h * 2}):
            assert torch.equal(logits, lm.model(IDS).logits), name
    # and a gradient read through nnsight is the one autograd gives at the same name
    name = hooks.resid_post(0)
    with view.trace(IDS):
        h = hooks.at(view, name)
        lp = view.output.logits[0, -1].log_softmax(-1)[5]
        with lp.backward():
            g = h.grad.save()
    with hooks.capture(lm, [name], detach=False) as acts:
        want_lp = lm.model(IDS).logits[0, -1].log_softmax(-1)[5]
    assert torch.equal(g, torch.autograd.grad(want_lp, [acts[name]])[0])
    with pytest.raises(hooks.HookNameError, match="read but not set"):
        hooks.set_at(view, "blocks.0.hook_resid_mid", torch.zeros(1))
