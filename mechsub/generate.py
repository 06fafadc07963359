"""Fast batched generation of number completions, with the teacher's log-probabilities stored per position.

A hand-written decoding loop over a KV cache, in place of ``model.generate``: left-padded batches, and under
constrained decoding the LM head is computed only for the allowed rows (digits, ",", " ", end of turn: 13 of
SmolLM2's 49,152 tokens), which removes about a fifth of each step's compute. A small grammar (at most 3 digits
a number, at most 10 numbers, separators only after a digit) keeps every constrained completion filter-valid.
The shared chat prefix is run once per batch; each row's own prompt tokens run in groups of similar length (a
group pads only to its own longest prompt); finished rows leave the batch once they are an eighth of it; the
cache and the attention mask are preallocated, so a step appends in place instead of copying the whole cache
(``mechsub bench`` measures it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)

NUMBER_CHARS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ",", " ")


@dataclass
class NumberVocab:
    """Token ids of the constrained vocabulary: digits, comma, space and end of turn, in that order."""

    ids: Tensor  # (13,)
    n_digits: int = 10

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase) -> NumberVocab:
        ids = []
        for ch in NUMBER_CHARS:
            enc = tok(ch, add_special_tokens=False).input_ids
            if len(enc) != 1:
                raise ValueError(
                    f"the tokenizer splits {ch!r} into {len(enc)} tokens; constrained decoding needs one"
                )
            ids.append(enc[0])
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-turn (eos) token")
        return cls(torch.tensor([*ids, tok.eos_token_id]))

    @property
    def comma(self) -> int:
        return 10

    @property
    def space(self) -> int:
        return 11

    @property
    def end(self) -> int:
        return 12


@dataclass
class Generation:
    """Completions of one batch: token ids (eos excluded) and, per position, log-probs over the allowed set."""

    tokens: list[list[int]]
    #: each (len(tokens[i]) + 1, 13): the last row is the step that chose the end
    allowed_logprobs: list[Tensor]
    #: with ``top_k``: the teacher's unconstrained full-vocabulary top-k per position, (positions, k) each
    topk_logprobs: list[Tensor] | None = None
    topk_ids: list[Tensor] | None = None


# separator kinds, fixed by the first separator a completion writes: one list, one separator
SEP_UNKNOWN, SEP_COMMA, SEP_COMMA_SPACE, SEP_SPACE = -1, 0, 1, 2


def grammar_mask(
    digits: Tensor,
    count: Tensor,
    last: Tensor,
    sep: Tensor | None = None,
    max_numbers: int = 10,
    remaining: int = 1_000,
) -> Tensor:
    """(batch, 13) bool mask of the allowed next tokens given each row's state.

    digits: digits in the current number; count: numbers begun; last: the previous token's class (-1 start,
    0 digit, 1 comma, 2 space); sep: the separator kind fixed so far (SEP_*; unknown until the first one);
    remaining: tokens left including this one. A separator needs room for up to four more (", 1" and the end)
    and the last token must end the turn, so a completion cut by the token cap is still a valid list.
    """
    if sep is None:
        sep = torch.full_like(digits, SEP_UNKNOWN)
    b = digits.shape[0]
    mask = torch.zeros(b, 13, dtype=torch.bool, device=digits.device)
    in_number = last == 0
    room = count < max_numbers
    after_comma = last == 1
    # a digit continues a number (≤ 3 digits) or starts one where a number may start
    start_ok = (last == -1) | (last == 2) | (after_comma & ((sep == SEP_UNKNOWN) | (sep == SEP_COMMA)))
    mask[:, :10] = ((in_number & (digits < 3)) | (start_ok & room))[:, None]
    room_sep = room & (remaining >= 4)
    mask[:, 10] = in_number & room_sep & (sep != SEP_SPACE)
    mask[:, 11] = (after_comma & (sep != SEP_COMMA)) | (
        in_number & room_sep & ((sep == SEP_UNKNOWN) | (sep == SEP_SPACE))
    )
    mask[:, 12] = in_number
    if remaining <= 1:
        mask[:, :12] = False
    return mask


def next_state(
    choice: Tensor, digits: Tensor, count: Tensor, last: Tensor, sep: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grammar state after emitting ``choice`` (indices into the 13-token vocabulary)."""
    is_digit = choice < 10
    cls = torch.where(is_digit, 0, torch.where(choice == 10, 1, 2))
    count = torch.where(is_digit & (last != 0), count + 1, count)
    digits = torch.where(is_digit, torch.where(last == 0, digits + 1, torch.ones_like(digits)), 0)
    unknown = sep == SEP_UNKNOWN
    sep = torch.where(unknown & (last == 1) & is_digit, SEP_COMMA, sep)
    sep = torch.where(unknown & (last == 1) & (cls == 2), SEP_COMMA_SPACE, sep)
    sep = torch.where(unknown & (last == 0) & (cls == 2), SEP_SPACE, sep)
    return digits, count, cls, sep


class _GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values are views into a buffer with room for ``extra`` more positions: a
    decoding step writes its one position in place, where DynamicLayer's torch.cat copies the whole cache. The views
    have the same shapes and values as DynamicLayer's tensors, so attention computes the same numbers."""

    def __init__(self, keys: Tensor, values: Tensor, n: int) -> None:
        """``keys``, ``values``: (batch, heads, capacity, head_dim) buffers whose first ``n`` positions are filled."""
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k, self._v, self._n = keys, values, n
        self._view()

    def _view(self) -> None:
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        q = key_states.shape[-2]
        if self._n + q > self._k.shape[-2]:
            raise RuntimeError("the preallocated cache is full")
        self._k[:, :, self._n : self._n + q] = key_states
        self._v[:, :, self._n : self._n + q] = value_states
        self._n += q
        self._view()
        return self._k[:, :, : self._n], self._v[:, :, : self._n]

    def batch_select_indices(self, indices: Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._view()


#: rows per prefill forward: the batch's rows run their own tokens in groups of similar length, so a group pads
#: only to its own longest prompt (at batch 64, padding to the batch's longest was 18% of the prefill's tokens)
PREFILL_ROWS = 16
#: ended rows stay in the batch until they are this share of it; then the batch and the cache are compacted (a
#: compaction copies the whole cache, about as costly as computing a few ended rows for a few steps)
COMPACT_SHARE = 0.125


def _kv(layer: object) -> tuple[Tensor, Tensor]:
    """A filled key-value cache layer's keys and values."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, Tensor) or not isinstance(values, Tensor):
        raise TypeError(f"{type(layer).__name__}: the decoder needs key-value cache layers")
    return keys, values


def prefill(
    model: PreTrainedModel,
    prefix: DynamicCache,
    suffixes: list[list[int]],
    n_shared: int,
    width: int,
    extra: int,
    pad_id: int,
) -> tuple[DynamicCache, Tensor]:
    """Each row's own tokens after the shared prefix (whose cache is ``prefix``, empty when none), run in groups
    of :data:`PREFILL_ROWS` rows of similar length. Returns the batch's cache, laid out as one left-padded batch
    ([prefix | padding | the row's tokens | room for ``extra`` new positions]) in buffers that grow in place
    (:class:`_GrowingLayer`), and each row's hidden state at its last token, (rows, d_model). Padding columns are
    masked: those inside a row's group hold the pad token's keys and values, those outside it zeros (never
    uninitialised memory, whose NaNs a mask would not cancel). A sliding-window layer (Gemma 3) counts its window
    in these columns, padding included, which matters only for prompts near the window (512 tokens for Gemma 3
    270M; number prompts are about 130); `generate_numbers` warns when a batch passes it."""
    b, dev = len(suffixes), model.device
    order = sorted(range(b), key=lambda i: len(suffixes[i]))
    hidden: Tensor | None = None
    keys: list[Tensor] = []
    values: list[Tensor] = []
    for start in range(0, b, PREFILL_ROWS):
        idx = order[start : start + PREFILL_ROWS]
        g, w = len(idx), max(len(suffixes[i]) for i in idx)
        ids = torch.full((g, w), pad_id, dtype=torch.long, device=dev)
        attn = torch.ones(g, n_shared + w, dtype=torch.long, device=dev)
        for j, i in enumerate(idx):
            ids[j, w - len(suffixes[i]) :] = torch.tensor(suffixes[i])
            attn[j, n_shared : n_shared + w - len(suffixes[i])] = 0
        pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, n_shared:]
        cache = DynamicCache()
        for layer_idx, layer in enumerate(prefix.layers):  # the prefix's keys and values, one copy per row
            pk, pv = _kv(layer)
            cache.update(pk.expand(g, -1, -1, -1), pv.expand(g, -1, -1, -1), layer_idx)
        out = model.model(
            input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
        ).last_hidden_state[:, -1]
        if hidden is None:
            hidden = out.new_empty(b, out.shape[-1])
            for layer in cache.layers:
                lk, lv = _kv(layer)
                keys.append(lk.new_zeros(b, lk.shape[1], n_shared + width + extra, lk.shape[3]))
                values.append(lv.new_zeros(b, lv.shape[1], n_shared + width + extra, lv.shape[3]))
                keys[-1][:, :, :n_shared] = lk[:1, :, :n_shared]
                values[-1][:, :, :n_shared] = lv[:1, :, :n_shared]
        rows = torch.tensor(idx, device=dev)
        hidden[rows] = out
        cols = slice(n_shared + width - w, n_shared + width)
        for k, v, layer in zip(keys, values, cache.layers, strict=True):
            lk, lv = _kv(layer)
            k[rows, :, cols] = lk[:, :, n_shared:]
            v[rows, :, cols] = lv[:, :, n_shared:]
    assert hidden is not None
    full = DynamicCache()
    full.layers = [_GrowingLayer(k, v, n_shared + width) for k, v in zip(keys, values, strict=True)]  # type: ignore[misc]
    return full, hidden


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens shared by the start of every prompt, leaving each prompt at least one token of its own."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for i in range(max(n, 0)):
        if any(p[i] != first[i] for p in prompts):
            return i
    return max(n, 0)


def shared_prefix(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], share: bool = True
) -> tuple[DynamicCache, int]:
    """The chat template and system prompt are the same for every prompt: that prefix run once (its cache, and
    its length); an empty cache and 0 without ``share`` or with one prompt."""
    n_shared = common_prefix_len(prompts) if share and len(prompts) > 1 else 0
    prefix = DynamicCache()
    if n_shared:
        model.model(
            input_ids=torch.tensor([list(prompts[0][:n_shared])], device=model.device),
            past_key_values=prefix,
            use_cache=True,
        )
    return prefix, n_shared


_warned: list[bool] = []  # the sliding-window warning, once per process


def _past_window(model: PreTrainedModel, n_shared: int, span: int, suffixes: Sequence[Sequence[int]]) -> bool:
    """Whether the left padding between a shared prefix and rows of unequal length can change a sliding-window
    layer's view: the batch's columns (``n_shared`` + ``span``) pass the window. Without a shared prefix the
    padding only shifts every token of a row alike, and a config may turn the window off."""
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None)
    on = getattr(cfg, "use_sliding_window", True) is not False
    return bool(
        window and on and n_shared and n_shared + span > window and len({len(p) for p in suffixes}) > 1
    )


@torch.no_grad()
def generate_numbers(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    vocab: NumberVocab,
    *,
    max_new_tokens: int = 50,
    greedy: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    share_prefix: bool = True,
    top_k: int = 0,
    constrained: bool = True,
) -> Generation:
    """Decoding of one batch of tokenised prompts (left-padded here).

    ``constrained`` restricts every step to the 13 number tokens and the grammar (only their rows of the head
    are computed); otherwise the model samples (or picks greedily) from its full vocabulary and the stored
    allowed-token log-probs are the 13-token view of the same step.
    """
    b = len(prompts)
    dev = model.device
    prefix, n_shared = shared_prefix(model, prompts, share_prefix)
    suffixes = [list(p[n_shared:]) for p in prompts]
    width = max(len(p) for p in suffixes)
    if _past_window(model, n_shared, width + max_new_tokens, suffixes) and not _warned:
        _warned.append(True)  # once per process: a data run would repeat it every batch
        log.warning(
            "batched generation: prompts up to %d tokens and %d new ones pass the model's sliding window (%d); "
            "the left padding counts against a window, so a row shorter than the longest may differ from "
            "generating it alone. Batch prompts of equal length, or keep prompt + new tokens within the window",
            n_shared + width, max_new_tokens, model.config.sliding_window,
        )  # fmt: skip
    # preallocated for every step: step s reads the first n_shared + width + s columns (no torch.cat per step);
    # each row's own tokens sit right-aligned before the first new column, the padding between prefix and suffix
    attn = torch.zeros(b, n_shared + width + max_new_tokens, dtype=torch.long, device=dev)
    attn[:, :n_shared] = 1
    attn[:, n_shared + width :] = 1
    for i, p in enumerate(suffixes):
        attn[i, n_shared + width - len(p) : n_shared + width] = 1
    n_cols = n_shared + width
    cache, hidden = prefill(model, prefix, suffixes, n_shared, width, max_new_tokens, pad_id)
    cur_pos = torch.tensor(
        [[n_shared + len(p) - 1] for p in suffixes], device=dev
    )  # each row's last position
    vocab = NumberVocab(vocab.ids.to(dev), vocab.n_digits)
    head = model.get_output_embeddings().weight[vocab.ids]  # (13, d_model): only the rows we may emit
    bias = getattr(model.get_output_embeddings(), "bias", None)
    head_bias = bias[vocab.ids] if bias is not None else None

    digits = torch.zeros(b, dtype=torch.long, device=dev)
    count = torch.zeros(b, dtype=torch.long, device=dev)
    last = torch.full((b,), -1, dtype=torch.long, device=dev)
    sep = torch.full((b,), SEP_UNKNOWN, dtype=torch.long, device=dev)
    rows = torch.arange(b, device=dev)  # which original row each batch row is
    # rows that have not ended; an ended row stays in the batch (its outputs ignored) until enough have ended to
    # pay for compacting the cache (COMPACT_SHARE)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    # per step, written for the active rows only and read back per row at the end (no Python loop over rows);
    # log-probs in float32 also when the model runs in bf16
    step_logp = torch.zeros(b, max_new_tokens, len(vocab.ids), dtype=torch.float32, device=dev)
    step_ids = torch.zeros(b, max_new_tokens, dtype=torch.long, device=dev)
    n_steps = torch.zeros(b, dtype=torch.long, device=dev)  # steps each row took part in (its log-prob rows)
    ended = torch.zeros(b, dtype=torch.bool, device=dev)  # whether the row's last step chose the end of turn
    step_topk: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows, values, indices) per step, with top_k
    end = vocab.end if constrained else int(vocab.ids[vocab.end])  # the end of turn, as a choice
    for step in range(max_new_tokens):
        act = active.nonzero().flatten()
        r = rows[act]
        logits = (hidden @ head.T).float()  # log-probs in float32 also when the model runs in bf16
        if head_bias is not None:
            logits = logits + head_bias
        # the full head only when asked: the teacher's unconstrained distribution (top-k, free decoding)
        full = (
            model.get_output_embeddings()(hidden).float().log_softmax(-1)
            if top_k or not constrained
            else None
        )
        if top_k and full is not None:
            tk = full[act].topk(top_k, dim=-1)
            step_topk.append((r, tk.values, tk.indices))
        if constrained:
            mask = grammar_mask(digits, count, last, sep, remaining=max_new_tokens - step)
            logits = logits.masked_fill(~mask, float("-inf"))
        logp = logits.log_softmax(-1)
        scores = logits if full is None or constrained else full
        # chosen for the active rows only; an ended row still in the batch is fed the end of turn
        if greedy:
            drawn = scores[act].argmax(-1)
        else:
            probs = (scores[act] / temperature).softmax(-1)
            # drawn where the seeded generator lives (the CPU's unless a CUDA one is passed): the same seed, the
            # same draws from the same probabilities on any device and whichever ended rows are still in the batch
            on = generator.device if generator is not None else dev
            drawn = torch.multinomial(probs.to(on), 1, generator=generator).squeeze(-1).to(dev)
        choice = torch.full_like(rows, end)
        choice[act] = drawn
        new_ids = vocab.ids[choice] if constrained else choice
        live = new_ids != vocab.ids[vocab.end]
        step_logp[r, step] = logp[act]
        step_ids[r, step] = new_ids[act]
        n_steps[r] += 1
        ended[r] = ~live[act]
        if constrained:
            digits, count, last, sep = next_state(choice, digits, count, last, sep)
        active &= live
        n_active = int(active.sum())
        if not n_active or step + 1 == max_new_tokens:
            break
        if len(rows) - n_active >= COMPACT_SHARE * len(rows):  # drop ended rows from the batch and the cache
            keep = active.nonzero().flatten()
            cache.batch_select_indices(keep)
            rows, new_ids, digits, count, last, sep, active = (
                t[keep] for t in (rows, new_ids, digits, count, last, sep, active)
            )
            attn, cur_pos = attn[keep], cur_pos[keep]
        n_cols += 1
        cur_pos = cur_pos + 1
        hidden = model.model(
            input_ids=new_ids[:, None],
            attention_mask=attn[:, :n_cols],
            position_ids=cur_pos,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
    lengths = n_steps.tolist()
    n_tokens = (n_steps - ended.long()).tolist()
    out_tokens = [step_ids[i, :n].tolist() for i, n in enumerate(n_tokens)]
    logprobs = [step_logp[i, :n].cpu().clone() for i, n in enumerate(lengths)]
    if not top_k:
        return Generation(out_tokens, logprobs)
    topk_values = torch.zeros(b, max_new_tokens, top_k, dtype=torch.float32, device=dev)
    topk_ids = torch.zeros(b, max_new_tokens, top_k, dtype=torch.long, device=dev)
    for s, (r, values, indices) in enumerate(step_topk):
        topk_values[r, s], topk_ids[r, s] = values, indices
    return Generation(
        out_tokens,
        logprobs,
        [topk_values[i, :n].cpu().clone() for i, n in enumerate(lengths)],
        [topk_ids[i, :n].cpu().clone() for i, n in enumerate(lengths)],
    )
