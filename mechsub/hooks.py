"""One address for every activation: TransformerLens hook names on the modules of an unmodified Hugging Face model.

``blocks.3.hook_resid_post`` names the same tensor here as in TransformerLens' TransformerBridge (checked equal on
SmolLM2 and gemma3-270m). Reads (`capture`, `read`) and edits (`edit`) are plain torch forward hooks on the
module a name maps to, in context managers that remove them in ``finally``: one engine, so an edit shows in
every read of the same forward, and no copy of the model is made to read it.

Why torch hooks and not nnsight as that engine. Measured on the shared 2-core CPU, fp32, interleaved rounds
(`mechsub bench` repeats the comparison: ``capture.nnsight_overhead``), an nnsight trace that reads every layer's
residual costs, over a plain forward: on the tiny model +9–12 % at batch 16 × 64 (~0.45 ms on 4–5 ms) and +26 %
at 1 × 60; on SmolLM2 +1.4 % at 16 × 64 (best of 8: 1.79 vs 1.77 s) and +9 % at 1 × 60 (best of 40: 172 vs
157 ms, the size of one patching forward), +3 % to edit one layer. Torch hooks cost nothing measurable (1.73 s,
157 ms). The cost would pass; the shape does not: nnsight's edits act only on a forward that a
``with model.trace(...)`` block runs itself, so an edit around arbitrary code (the training loop's concept
ablation, the two forwards of cached scoring) cannot be written with its public API; wrapping a model replaces
every submodule's ``forward`` for good, and importing nnsight patches ``torch.Tensor.backward`` and mounts
``.save`` on every Python object. So nnsight does what it is best at, on the same names: `nnsight_view` + `at` /
`set_at` address its envoys by hook name (values, writes and gradients), for interventions written in nnsight's
style and for remote execution (NDIF) of models too big for this machine. It is imported lazily, for those side
effects.

``ln_final.hook_out`` is the final norm's output (TransformerLens' ``ln_final.hook_normalized`` is the value
before the norm's weight, which no Hugging Face module returns). ``blocks.{L}.hook_resid_mid`` is read exactly
(the input of the norm before the MLP); an edit of it is made on the attention output as ``fn(pre + attn) - pre``,
equal up to one float rounding.

One position policy for every intervention (patching, feature patching, concept ablation): positions before
`FIRST_POSITION` are left alone. Position 0 (BOS) is the attention sink; its residual is far outside the rest
(an SAE is not trained on it) and every later position reads it, so an edit that includes it mixes "what was
edited" with "whether the sink was edited". Scans report position 0 on a row of its own; `after_sink` wraps any
edit with the policy.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mechsub.models import LoadedModel

#: an edit: the activation at a hook, (batch, pos, d_model), to its replacement of the same shape. It sees every
#: position of the forward it runs in (a forward that continues a KV cache sees only its new positions).
Edit = Callable[[Tensor], Tensor]

EMBED = "hook_embed"
FINAL = "ln_final.hook_out"
POINTS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
_BLOCK = re.compile(r"blocks\.(\d+)\.(\w+)")


class HookNameError(KeyError):
    """An unknown hook name; the message lists the closest known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def block(layer: int, point: str = "hook_resid_post") -> str:
    """The name of ``point`` in block ``layer``: ``block(3)`` is ``blocks.3.hook_resid_post``."""
    if point not in POINTS:
        raise HookNameError(f"unknown point {point!r}: use one of {', '.join(POINTS)}")
    return f"blocks.{layer}.{point}"


def resid_post(layer: int) -> str:
    """The residual stream after block ``layer``: ``blocks.{layer}.hook_resid_post``."""
    return block(layer, "hook_resid_post")


def resid_post_layer(name: str) -> int:
    """The layer of a ``blocks.{L}.hook_resid_post`` name: ``resid_post_layer(resid_post(3)) == 3``."""
    m = _BLOCK.fullmatch(name)
    if m is None or m.group(2) != "hook_resid_post":
        raise HookNameError(f"{name!r} is not a residual-stream hook name (e.g. {resid_post(3)})")
    return int(m.group(1))


# ---- names → modules ------------------------------------------------------------------------------------
def module_of(model: Any) -> nn.Module:
    """The Hugging Face causal LM behind a LoadedModel, a peft model or the module itself."""
    if isinstance(model, LoadedModel):
        model = model.model
    if hasattr(model, "get_base_model"):  # peft: the hooks go on the wrapped model's own modules
        model = model.get_base_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a Hugging Face model or a LoadedModel, not {type(model).__name__}")
    return model


@dataclass(frozen=True)
class _Site:
    module: nn.Module
    where: Literal["input", "output"]


@dataclass(frozen=True)
class _Parts:
    """The modules hook names map to, for the two layouts mechsub loads (llama; gemma2/3's sandwich norms)."""

    embed: nn.Module
    layers: Sequence[nn.Module]
    norm: nn.Module
    sandwich: bool

    def attn_out(self, layer: nn.Module) -> nn.Module:
        # gemma normalises the attention output before adding it to the residual: that norm's output is it
        return layer.post_attention_layernorm if self.sandwich else layer.self_attn  # type: ignore[return-value]

    def pre_mlp_norm(self, layer: nn.Module) -> nn.Module:
        return layer.pre_feedforward_layernorm if self.sandwich else layer.post_attention_layernorm  # type: ignore[return-value]

    def mlp_out(self, layer: nn.Module) -> nn.Module:
        return layer.post_feedforward_layernorm if self.sandwich else layer.mlp  # type: ignore[return-value]


def decoder_of(model: Any) -> Any:
    """The decoder (embed_tokens, layers, norm) of a LoadedModel, a peft model or a Hugging Face causal LM: the
    module every hook name is on, and the one each forward passes its position ids to."""
    m = module_of(model)
    dec: Any = m.get_decoder() if hasattr(m, "get_decoder") else m  # type: ignore[operator]
    if not all(hasattr(dec, a) for a in ("embed_tokens", "layers", "norm")):
        raise TypeError(f"{type(m).__name__}: no embed_tokens/layers/norm decoder to map hook names onto")
    return dec


def _parts(model: nn.Module) -> _Parts:
    dec = decoder_of(model)
    first = dec.layers[0]
    sandwich = hasattr(first, "pre_feedforward_layernorm") and hasattr(first, "post_feedforward_layernorm")
    if not sandwich and not all(hasattr(first, a) for a in ("self_attn", "mlp", "post_attention_layernorm")):
        raise TypeError(
            f"{type(first).__name__}: a decoder layer of a layout mechsub cannot map hook names onto"
        )
    return _Parts(dec.embed_tokens, list(dec.layers), dec.norm, sandwich)


def names(model: Any) -> list[str]:
    """Every hook name ``model`` has, in forward order."""
    n = len(_parts(module_of(model)).layers)
    return [EMBED, *(block(L, p) for L in range(n) for p in POINTS), FINAL]


def check(model: Any, hook_names: Iterable[str]) -> None:
    """Raise HookNameError for any name the model does not have, with the nearest real names."""
    known = names(model)
    for n in hook_names:
        if n not in known:
            near = difflib.get_close_matches(n, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise HookNameError(f"unknown hook name {n!r}{hint} (e.g. {resid_post(0)})")


def _layer_point(parts: _Parts, name: str) -> tuple[nn.Module, str]:
    m = _BLOCK.fullmatch(name)
    assert m is not None  # names were checked
    return parts.layers[int(m.group(1))], m.group(2)


def _read_site(parts: _Parts, name: str) -> _Site:
    if name == EMBED:
        return _Site(parts.embed, "output")
    if name == FINAL:
        return _Site(parts.norm, "output")
    layer, point = _layer_point(parts, name)
    return {
        "hook_resid_pre": _Site(layer, "input"),
        "hook_attn_out": _Site(parts.attn_out(layer), "output"),
        "hook_resid_mid": _Site(parts.pre_mlp_norm(layer), "input"),
        "hook_mlp_out": _Site(parts.mlp_out(layer), "output"),
        "hook_resid_post": _Site(layer, "output"),
    }[point]


# ---- one engine: torch forward hooks --------------------------------------------------------------------
def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, tuple) else value  # type: ignore[no-any-return]


def _input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]  # type: ignore[no-any-return]


def _observe(site: _Site, fn: Callable[[Tensor], None]) -> RemovableHandle:
    """Call ``fn`` with the site's activation; appended, so it runs after every edit of the same module."""
    if site.where == "output":
        return site.module.register_forward_hook(lambda _m, _a, out: fn(_first(out)))
    return site.module.register_forward_pre_hook(lambda _m, a, kw: fn(_input(a, kw)), with_kwargs=True)


def _checked(name: str, fn: Edit, h: Tensor) -> Tensor:
    new = fn(h)
    if not isinstance(new, Tensor) or new.shape != h.shape:
        got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise ValueError(
            f"the edit at {name} returned {got}, not a tensor of the activation's {tuple(h.shape)}"
        )
    return new


def _replace(site: _Site, name: str, fn: Edit) -> RemovableHandle:
    """Replace the site's activation by ``fn(activation)``; prepended, so reads of the same module see the edit."""
    if site.where == "output":

        def out_hook(_m: nn.Module, _a: Any, out: Any) -> Any:
            new = _checked(name, fn, _first(out))
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return site.module.register_forward_hook(out_hook, prepend=True)

    def in_hook(_m: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        new = _checked(name, fn, _input(args, kwargs))
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    return site.module.register_forward_pre_hook(in_hook, prepend=True, with_kwargs=True)


def _install_edit(parts: _Parts, name: str, fn: Edit) -> list[RemovableHandle]:
    if not name.endswith("hook_resid_mid"):
        return [_replace(_read_site(parts, name), name, fn)]
    # the residual after attention is a sum inside the layer's forward, not a module's output: edit the attention
    # output so that the sum comes out as fn(sum). The block's input is taken after any edit of it (appended).
    layer, _ = _layer_point(parts, name)
    pre: dict[str, Tensor] = {}
    keep = _observe(_Site(layer, "input"), lambda h: pre.__setitem__("h", h))
    edit = _replace(_Site(parts.attn_out(layer), "output"), name, lambda a: fn(pre["h"] + a) - pre["h"])
    return [keep, edit]


@contextmanager
def edit(model: Any, edits: Mapping[str, Edit]) -> Iterator[None]:
    """Within the block, every forward of ``model`` has the activation at each hook name replaced by
    ``fn(activation)``. Several edits of one module apply innermost context first; hooks are removed on exit
    whatever happens."""
    m = module_of(model)
    check(m, edits)
    parts = _parts(m)
    handles: list[RemovableHandle] = []
    try:
        for name, fn in edits.items():
            handles += _install_edit(parts, name, fn)
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(model: Any, hook_names: Sequence[str], *, detach: bool = True) -> Iterator[dict[str, Tensor]]:
    """Within the block, ``acts[name]`` holds the activation of the latest forward at each hook name,
    (batch, pos, d_model), edits included. ``detach=False`` keeps the autograd graph, for gradients with
    respect to the activations (``torch.autograd.grad(metric, [acts[n] ...])``)."""
    m = module_of(model)
    check(m, hook_names)
    parts = _parts(m)
    acts: dict[str, Tensor] = {}
    handles: list[RemovableHandle] = []

    def keeper(name: str) -> Callable[[Tensor], None]:
        def keep(h: Tensor) -> None:
            acts[name] = h.detach() if detach else h

        return keep

    try:
        for name in dict.fromkeys(hook_names):
            handles.append(_observe(_read_site(parts, name), keeper(name)))
        yield acts
    finally:
        for h in handles:
            h.remove()


class _Enough(Exception):
    """Raised from a hook once every wanted activation is in: the rest of the forward is not needed."""


@torch.no_grad()
def read(
    model: Any,
    ids: Int[Tensor, "batch pos"],
    hook_names: Sequence[str],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> dict[str, Float[Tensor, "batch pos d_model"]]:
    """Activations of one forward at ``hook_names``. The forward stops after the last of them (a read at an early
    layer skips the rest of the model); edits active around the call apply."""
    m = module_of(model)
    wanted = list(dict.fromkeys(hook_names))
    with capture(m, wanted) as acts:
        parts = _parts(m)
        stop = [_observe(_read_site(parts, n), _stop_when(acts, len(wanted))) for n in wanted]
        dev = next(m.parameters()).device
        mask = attention_mask.to(dev) if attention_mask is not None else None
        try:
            m(input_ids=ids.to(dev), attention_mask=mask, use_cache=False)
        except _Enough:
            pass
        finally:
            for h in stop:
                h.remove()
        return dict(acts)


def _stop_when(acts: dict[str, Tensor], n: int) -> Callable[[Tensor], None]:
    def stop(_h: Tensor) -> None:
        if len(acts) == n:
            raise _Enough

    return stop


#: the first sequence position an intervention touches: position 0, the attention sink, is reported on its own
FIRST_POSITION = 1


def after_sink(edit: Edit, first: int = FIRST_POSITION) -> Edit:
    """``edit`` at positions ≥ ``first`` only; the positions before it keep their activation. Positions count
    from the start of the forward it runs in (no KV cache: a continuation forward would start past position 0)."""

    def at(h: Tensor) -> Tensor:
        return torch.cat([h[:, :first], edit(h)[:, first:]], dim=1)

    return at


def patch(source: Tensor, positions: Sequence[int] | None = None) -> Edit:
    """An edit that writes ``source`` (an activation of the same shape) in: at every position, or only at
    ``positions`` (indices into the sequence; negative from its end)."""
    if positions is None:
        return lambda h: source.expand_as(h)

    def at(h: Tensor) -> Tensor:
        h = h.clone()
        h[:, list(positions)] = source[:, list(positions)]
        return h

    return at


# ---- nnsight on the same names --------------------------------------------------------------------------
def nnsight_view(model: Any) -> Any:
    """An nnsight envoy (``NNsight``) over the very module ``model`` runs, no copy, for `at` / `set_at`.

    nnsight instruments the module for good (inert outside a trace): build the view once and keep it. For remote
    execution pass `at` an nnsight model of the same architecture instead (e.g. ``TransformersModel(hf_id)``
    traced with ``remote=True``): names resolve against its module tree the same way.
    """
    from nnsight import NNsight

    return NNsight(module_of(model))


def _envoy(envoy: Any, name: str) -> tuple[Any, _Site]:
    root = envoy._module
    check(root, [name])
    parts = _parts(root)
    site = _read_site(parts, name)
    path = next(p for p, mod in root.named_modules() if mod is site.module)
    return envoy.get(path) if path else envoy, site


def at(envoy: Any, name: str) -> Any:
    """Inside an nnsight trace of ``envoy``: the activation at hook ``name`` (read names in forward order)."""
    e, site = _envoy(envoy, name)
    return e.input if site.where == "input" else _first(e.output)


def read_nnsight(
    model: Any,
    ids: Int[Tensor, "batch pos"],
    hook_names: Sequence[str],
    *,
    remote: bool = False,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> dict[str, Float[Tensor, "batch pos d_model"]]:
    """:func:`read` through nnsight: the activations at ``hook_names`` of one forward, by the same names.

    ``model``: a LoadedModel or Hugging Face model (traced here), or a Hugging Face model id, for a model too big
    for this machine: nnsight's ``LanguageModel`` then builds it without weights and, with ``remote=True`` (the
    explicit flag), the trace runs on NDIF's servers and only the saved activations come back (an NDIF API key:
    ``nnsight.CONFIG.set_default_api_key(...)``; the model must be one NDIF hosts). Without ``remote`` an id is
    loaded locally.
    """
    if isinstance(model, str):
        from nnsight import LanguageModel

        envoy = LanguageModel(model, dispatch=not remote)
    else:
        envoy = nnsight_view(model)
    order = {n: i for i, n in enumerate(names(envoy._module))}
    check(envoy._module, hook_names)
    wanted = sorted(
        dict.fromkeys(hook_names), key=order.__getitem__
    )  # nnsight reads modules in forward order
    kwargs: dict[str, Any] = {"input_ids": ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    import nnsight

    trace_kw = {"remote": True} if remote else {}
    with torch.no_grad(), envoy.trace(**kwargs, **trace_kw):
        got = nnsight.save({n: at(envoy, n) for n in wanted})
    return {n: got[n] for n in dict.fromkeys(hook_names)}


def set_at(envoy: Any, name: str, value: Tensor) -> None:
    """Inside an nnsight trace of ``envoy``: replace the activation at hook ``name`` by ``value``."""
    if name.endswith("hook_resid_mid"):
        # its value exists only after the attention output, which is where it would have to be written
        raise HookNameError(f"{name} can be read but not set in an nnsight trace; edit it with hooks.edit")
    e, site = _envoy(envoy, name)
    if site.where == "input":
        e.input = value
        return
    out = e.output
    e.output = (value, *out[1:]) if isinstance(out, tuple) else value
