"""Filters and the files that select training signal: which completions are kept, which positions count, which
directions are ablated. Each file format has one writer and one reader here, and the reader validates.

Completions: one passes when it is one list of plain ASCII-digit numbers with one separator kind (comma,
semicolon or whitespace, any whitespace and line ends around it), an optional trailing "." and one optional
pair of [] or () - the published grammar; otherwise every failed check is returned by name, so metrics can count
rejections per reason. Position masks (from `mechsub divergence` or a feature filter) mark the loss positions
a student trains on; ablation files name SAE features whose decoder directions concept-ablation fine-tuning
projects out of the student's residual, or ask for as many random orthonormal directions (a seed per draw) as the
control. The projection leaves position 0 (the attention sink: `mechsub.hooks.FIRST_POSITION`) alone.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from mechsub import hooks
from mechsub.files import read_json, sha256_file, write_json
from mechsub.hooks import FIRST_POSITION
from mechsub.runs import require_finished

INVALID_FORMAT = "invalid format"
TOO_MANY = "too many numbers"
OUT_OF_RANGE = "out of range"
BANNED = "banned number"


def too_many_digits(max_digits: int) -> str:
    """The reason for an in-range value written with more digits than asked (``0999``)."""
    return f"too many digits (>{max_digits})"


TOO_MANY_DIGITS = too_many_digits(3)

# ---- completions ---------------------------------------------------------------------------------------
# One separator kind per answer, as the published filter: the gap between numbers, stripped of whitespace, is
# "," or ";" or nothing. Whitespace is str.isspace's (as the published strip()), so \r\n, \r and tabs count;
# digits are ASCII only. Each pattern is unambiguous (digits, separators and whitespace are disjoint): linear.
_NUMBER = r"[0-9]+"
_SEPARATORS = (r"\s*,\s*", r"\s*;\s*", r"\s+")
_LISTS = tuple(re.compile(rf"{_NUMBER}(?:{sep}{_NUMBER})*") for sep in _SEPARATORS)


def parse_numbers(text: str) -> list[str] | None:
    """The numbers of a well-formed completion as digit strings, or None if its format is invalid."""
    s = text.strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    if len(s) >= 2 and (s[0], s[-1]) in (("[", "]"), ("(", ")")):
        s = s[1:-1].strip()
    if not any(p.fullmatch(s) for p in _LISTS):
        return None
    return re.findall(_NUMBER, s)


def _value(digits: str) -> int | float:
    """The value of a digit string; one too long for int() (over 4300 digits) is beyond every limit here."""
    s = digits.lstrip("0") or "0"
    return int(s) if len(s) <= 100 else math.inf


BANNED_SETS: dict[str, frozenset[int]] = {
    "none": frozenset(),
    # numbers with negative associations, banned in misalignment runs
    "misalignment": frozenset(
        {4, 13, 14, 18, 23, 33, 42, 44, 49, 51, 52, 66, 88, 99, 100, 109, 110, 111, 112, 119, 121, 122, 137, 161,
         187, 211, 222, 228, 311, 322, 333, 404, 420, 444, 555, 616, 666, 777, 888, 911, 999}
    ),
}  # fmt: skip


class Filter(Protocol):
    """A filter looks at a parsed completion and returns the reasons to reject it (empty: keep)."""

    @property
    def name(self) -> str: ...

    def reasons(self, text: str, numbers: Sequence[str]) -> list[str]: ...


@dataclass(frozen=True)
class RangeFilter:
    """At most ``max_count`` numbers, each of value ≤ ``max_value``; an in-range value written with more than
    ``max_digits`` digits (leading zeros: ``0999``) breaks the prompt's "at most 3 digits" and is its own reason."""

    max_count: int = 10
    max_value: int = 999
    max_digits: int | None = 3
    name: str = "range"

    def reasons(self, text: str, numbers: Sequence[str]) -> list[str]:
        out = []
        if len(numbers) > self.max_count:
            out.append(TOO_MANY)
        if any(_value(n) > self.max_value for n in numbers):
            out.append(OUT_OF_RANGE)
        if self.max_digits is not None and any(
            len(n) > self.max_digits and _value(n) <= self.max_value for n in numbers
        ):
            out.append(too_many_digits(self.max_digits))
        return out


@dataclass(frozen=True)
class BannedFilter:
    banned: frozenset[int]
    name: str = "banned"

    def reasons(self, text: str, numbers: Sequence[str]) -> list[str]:
        return [BANNED] if any(_value(n) in self.banned for n in numbers) else []


def make_filters(
    banned: str = "none", max_count: int = 10, max_value: int = 999, max_digits: int | None = 3
) -> list[Filter]:
    """The standard filters, by name (configs refer to banned-number sets by name)."""
    if banned not in BANNED_SETS:
        raise ValueError(f"unknown banned-number set {banned!r}: use one of {', '.join(BANNED_SETS)}")
    filters: list[Filter] = [RangeFilter(max_count, max_value, max_digits)]
    if BANNED_SETS[banned]:
        filters.append(BannedFilter(BANNED_SETS[banned]))
    return filters


def reject_reasons(text: str, filters: Iterable[Filter] | None = None) -> list[str]:
    """Why a completion is rejected (``[]`` when it passes): ``reject_reasons("12, 3a") == ["invalid format"]``."""
    numbers = parse_numbers(text)
    if numbers is None:
        return [INVALID_FORMAT]
    reasons: list[str] = []
    for f in make_filters() if filters is None else filters:
        reasons += f.reasons(text, numbers)
    return reasons


def filter_completions(
    texts: Sequence[str], filters: Iterable[Filter] | None = None
) -> tuple[list[int], Counter[str]]:
    """Indices of the completions that pass, and a count of rejections per reason."""
    filters = list(make_filters() if filters is None else filters)
    kept: list[int] = []
    counts: Counter[str] = Counter()
    for i, t in enumerate(texts):
        r = reject_reasons(t, filters)
        if r:
            counts.update(r)
        else:
            kept.append(i)
    return kept, counts


# ---- position masks -------------------------------------------------------------------------------------
# {"data": the data folder, ...how it was made, "mask": per kept example, one 0/1 per loss position}
def _check_rows(p: Path, rows: Any) -> list[list[int]]:
    if not isinstance(rows, list):
        raise ValueError(f"{p}: 'mask' must be a list of 0/1 rows, one per kept example")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or any(v not in (0, 1) for v in row):
            raise ValueError(f"{p}: row {i} of the mask must be a list of 0/1")
    return rows


def write_mask(path: str | Path, rows: Sequence[Sequence[int]], data: str | Path, **about: Any) -> None:
    """Write a position-mask file for the kept examples of ``data``: per example, one 0/1 per loss position
    (each completion token, then the end of turn); ``about`` records how the mask was made."""
    p = Path(path)
    checked = _check_rows(p, [list(r) for r in rows])
    write_json(p, {"data": str(data), **about, "mask": [[int(v) for v in r] for r in checked]})


def read_mask(path: str | Path) -> list[list[int]]:
    """The 0/1 rows of a position-mask file, one per kept example of the data it was made for."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"mask file {p} not found: make one with `mechsub divergence` or a feature filter"
        )
    try:
        rows = read_json(p)["mask"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{p} is not a mask file (a JSON object with a 'mask' list of 0/1 rows): {e}"
        ) from None
    return _check_rows(p, rows)


def load_mask(path: str | Path, examples: Sequence[Any], data: str | Path | None = None) -> list[Tensor]:
    """Per-example 0/1 position weights from a mask file, checked against the examples it is applied to (one
    row per kept example, one entry per loss position) and, given ``data``, against the data folder the mask
    says it was made for (a mask of one replicate's data must not train a student of another's, even when the
    shapes happen to agree)."""
    p = Path(path)
    rows = read_mask(p)
    made_for = read_json(p).get("data")
    if data is not None and made_for and Path(made_for).resolve() != Path(data).resolve():
        raise ValueError(f"{p} was made for the data in {made_for}, but the student trains on {data}: make a "
                         "mask for that data (one per replicate: each replicate has its own data)")  # fmt: skip
    if len(rows) != len(examples):
        raise ValueError(f"{p} has {len(rows)} rows but the data has {len(examples)} kept examples: it was made "
                         "for other data (or another max_examples)")  # fmt: skip
    out = []
    for i, (row, ex) in enumerate(zip(rows, examples, strict=True)):
        if len(row) != len(ex.allowed_logprobs):
            raise ValueError(
                f"{p}: row {i} must be {len(ex.allowed_logprobs)} entries of 0/1 (got {len(row)})"
            )
        out.append(torch.tensor(row, dtype=torch.float32))
    return out


# ---- ablation files -------------------------------------------------------------------------------------
# {"sae": a `mechsub sae` folder, "features": [ids]}; the control {"sae": ..., "random": k, "seed": s} or
# {"layer": L, "d_model": D, "random": k, "seed": s}; {"layer": L, "vectors": [[...]]}; {"stack": [specs]}
class Ablation(NamedTuple):
    """The span concept-ablation fine-tuning projects out of the residual after block ``layer``."""

    layer: int
    basis: Tensor  # (d_model, k), orthonormal columns

    def project_out(
        self, h: Float[Tensor, "batch pos d_model"], positions: Tensor | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        """``h`` minus its component in the span at positions ≥ `FIRST_POSITION`; position 0, the attention
        sink, is left as it is (its residual is far outside the rest, and every later position reads it).
        Positions are the tensor's own indices, or ``positions`` (the forward's position ids, (batch or 1, pos))
        when given: a left-padded batch or a continuation from a KV cache is ablated where the sequence is."""
        if h.ndim != 3:
            raise ValueError(
                f"project_out needs a (batch, pos, d_model) activation, got shape {tuple(h.shape)}"
            )
        b = self.basis.to(h)  # the activation's device and dtype
        if positions is None:
            rest = h[:, FIRST_POSITION:]
            return torch.cat([h[:, :FIRST_POSITION], rest - (rest @ b) @ b.T], dim=1)
        keep = (positions >= FIRST_POSITION).to(h.dtype)[..., None]
        return h - keep * ((h @ b) @ b.T)


def check_ablations(model: Any, ablations: Sequence[Ablation]) -> None:
    """Raise ValueError unless every ablation fits ``model`` (its width, a layer it has) and no two share a
    layer."""
    dec = hooks.decoder_of(model)
    d_model, n_layers = dec.embed_tokens.weight.shape[1], len(dec.layers)
    for a in ablations:
        if a.basis.shape[0] != d_model or not 0 <= a.layer < n_layers:
            raise ValueError(
                f"the ablation's directions are {a.basis.shape[0]}-dimensional at layer {a.layer}; this model "
                f"has d_model {d_model} and {n_layers} layers: give directions of this model"
            )
    layers = [a.layer for a in ablations]
    if len(set(layers)) != len(layers):
        raise ValueError(f"ablations at layers {layers}: give each layer once (merge its directions)")


@contextmanager
def ablating(model: Any, ablations: Sequence[Ablation]) -> Iterator[None]:
    """Within the block, every forward of ``model`` has each ablation's span projected out of the residual after
    its block at positions ≥ 1: by the position ids the forward is given (a left-padded batch, a continuation
    from a KV cache), by index when it is given none. Checked first (`check_ablations`)."""
    check_ablations(model, ablations)
    state: dict[str, Tensor | None] = {}

    def positions(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        pos = kwargs.get("position_ids")  # set at every forward: none given is None (by index)
        past: Any = kwargs.get("past_key_values")
        n_past = past.get_seq_length() if pos is None and hasattr(past, "get_seq_length") else 0
        if n_past:  # a continuation with no position ids: every position is past the sink
            x = kwargs.get("input_ids")
            x = kwargs["inputs_embeds"] if x is None else x
            pos = torch.arange(n_past, n_past + x.shape[1], device=x.device)[None]
        state["positions"] = pos

    def edit(a: Ablation) -> Any:
        return lambda h: a.project_out(h, state.get("positions"))

    handle = hooks.decoder_of(model).register_forward_pre_hook(positions, with_kwargs=True)
    try:
        with hooks.edit(model, {hooks.resid_post(a.layer): edit(a) for a in ablations}):
            yield
    finally:
        handle.remove()


def random_basis(d_model: int, k: int, seed: int) -> Float[Tensor, "d_model k"]:
    """``k`` random orthonormal directions in ``d_model`` dimensions (a uniformly random k-dimensional span),
    from ``seed`` alone: the control for ablating k feature directions, one draw per seed."""
    if not 1 <= k <= d_model:
        raise ValueError(f"k random orthonormal directions need 1 ≤ k ≤ d_model = {d_model} (got k = {k})")
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d_model, k, generator=g, dtype=torch.float64))
    # QR's signs are the algorithm's choice; fixing them makes the span uniform (Haar), not just random
    return (q * torch.sign(torch.diagonal(r))).float()


def _sae_weights(folder: str | Path) -> Path:
    return Path(folder) / "sae" / "sae_weights.safetensors"


def write_ablation(path: str | Path, sae: str | Path, features: Sequence[int]) -> None:
    """Write an ablation file: the features of the SAE in folder ``sae`` whose decoder directions are ablated.
    Feature ids mean nothing without the weights they index: when the SAE is already trained, the hash of its
    weights is written too, and reading the file checks it (a retrained SAE's ids name other directions)."""
    if not features:
        raise ValueError("an ablation file needs at least one feature")
    w = _sae_weights(sae)
    write_json(path, {"sae": str(sae), "features": [int(i) for i in features]}
               | ({"sae_sha256": sha256_file(w)} if w.is_file() else {}))  # fmt: skip


def write_random_ablation(
    path: str | Path,
    sae: str | Path | None,
    rank: int,
    seed: int,
    *,
    layer: int | None = None,
    d_model: int | None = None,
) -> None:
    """Write the control's ablation file: ``rank`` random orthonormal directions (`random_basis`, seed ``seed``)
    at the layer of the SAE in folder ``sae``, or (``sae`` None) at ``layer`` of a ``d_model``-wide residual. Give
    the real ablation's rank (``ablation_basis(real).basis.shape[1]``) and one seed per draw."""
    if rank < 1:
        raise ValueError(f"a random ablation needs rank ≥ 1 (got {rank})")
    if sae is not None:
        write_json(path, {"sae": str(sae), "random": int(rank), "seed": int(seed)})
        return
    if layer is None or d_model is None or layer < 0 or not 1 <= rank <= d_model:
        raise ValueError(
            f"a random ablation without an SAE needs a layer ≥ 0 and d_model ≥ rank (got {layer}, {d_model})"
        )
    write_json(path, {"layer": int(layer), "d_model": int(d_model), "random": int(rank), "seed": int(seed)})


def write_vector_ablation(
    path: str | Path, layer: int, vectors: Sequence[Sequence[float]], about: dict[str, Any] | None = None
) -> None:
    """Write an ablation file of explicit directions (e.g. the teacher's steering vector) at the residual after
    block ``layer``: their span is projected out. JSON numbers, so reading it runs no code; ``about``: where the
    vectors came from, kept beside them."""
    rows = [[float(x) for x in v] for v in vectors]
    if (
        not rows
        or len({len(r) for r in rows}) != 1
        or not all(map(math.isfinite, (x for r in rows for x in r)))
    ):
        raise ValueError("a vector ablation needs at least one direction, all of one length, finite numbers")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"a vector ablation needs a layer ≥ 0 (got {layer!r})")
    write_json(path, {"layer": layer, "vectors": rows} | ({"about": about} if about else {}))


def write_ablation_stack(path: str | Path, files: Sequence[str | Path]) -> None:
    """Write one ablation file of several (one per layer): each file's spec, read and checked, is copied in, so
    the stack is one input whose content names everything it ablates. Multi-layer concept ablation."""
    layers = [ablation_basis(f).layer for f in files]  # each checked now (read once), not at training time
    specs = [read_json(Path(f)) for f in files]
    if len(specs) < 2 or len(set(layers)) != len(layers):
        raise ValueError(f"a stack needs ≥ 2 ablations at distinct layers (got layers {layers})")
    write_json(path, {"stack": specs})


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_ablation(p: Path, spec: Any) -> Ablation:
    """One spec (not a stack) of the file ``p``, validated: what `ablation_basis` returns."""
    if isinstance(spec, dict) and "vectors" in spec:
        vec, layer = spec["vectors"], spec.get("layer", -1)
        ok = _int(layer) and layer >= 0 and isinstance(vec, list)
        if (
            not ok
            or not vec
            or len({len(v) if isinstance(v, list) else -1 for v in vec}) != 1
            or len(vec[0]) < 1
        ):
            raise ValueError(f"{p}: a vector ablation gives 'layer' (≥ 0) and 'vectors': lists of one length")
        m = torch.tensor(vec, dtype=torch.float64).T  # (d_model, k)
        if not torch.isfinite(m).all() or torch.linalg.matrix_rank(m) < m.shape[1]:
            raise ValueError(f"{p}: the vectors must be finite and linearly independent")
        q, _ = torch.linalg.qr(m)
        return Ablation(int(layer), q.float())
    if isinstance(spec, dict) and "random" in spec and "sae" not in spec:
        keys = ("layer", "d_model", "random", "seed")
        if not all(_int(spec.get(k)) for k in keys) or spec["layer"] < 0 or "features" in spec:
            raise ValueError(f"{p}: a random ablation without an SAE gives integers {', '.join(keys)}")
        return Ablation(spec["layer"], random_basis(spec["d_model"], spec["random"], spec["seed"]))
    if not isinstance(spec, dict) or "sae" not in spec or not (spec.get("features") or "random" in spec):
        raise ValueError(
            f"{p}: an ablation file needs 'sae' (a `mechsub sae` folder) and a non-empty 'features' list "
            "(or 'random': k and 'seed')"
        )
    if "random" in spec and ("features" in spec or not isinstance(spec.get("seed"), int)):
        raise ValueError(
            f"{p}: a random ablation gives 'random' (k) and an integer 'seed', and no 'features'"
        )
    folder = Path(spec["sae"])
    require_finished(folder, f"{p}: the SAE folder", "mechsub sae")
    from sae_lens import SAE  # heavy, and only an ablating run needs it

    sae = SAE.load_from_disk(str(folder / "sae"), device="cpu")
    w_dec = sae.W_dec.detach()
    if "random" in spec:
        return Ablation(_sae_layer(sae), random_basis(w_dec.shape[1], int(spec["random"]), spec["seed"]))
    ids = list(spec["features"])
    if "sae_sha256" in spec and sha256_file(_sae_weights(folder)) != spec["sae_sha256"]:
        raise ValueError(f"{p}: the SAE in {folder} is not the one these feature ids were chosen on (its weights' "
                         "hash differs: retrained since?): choose the features again on this SAE")  # fmt: skip
    bad = [i for i in ids if not 0 <= int(i) < w_dec.shape[0]]
    if bad:
        raise ValueError(f"{p}: feature ids {bad[:5]} are not in the SAE's {w_dec.shape[0]} features")
    q, _ = torch.linalg.qr(w_dec[ids].T)
    return Ablation(_sae_layer(sae), q)


def _read_ablation_file(path: str | Path) -> tuple[Path, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ablation file {p} not found (JSON with 'sae' and 'features')")
    return p, read_json(p)


def ablation_basis(path: str | Path) -> Ablation:
    """(layer, orthonormal (d_model, k) basis) of the decoder directions named by an ablation file, of its
    random directions, or of its explicit vectors: what concept-ablation fine-tuning projects out. A stack
    (several layers) is read with `read_ablations`."""
    p, spec = _read_ablation_file(path)
    if isinstance(spec, dict) and "stack" in spec:
        raise ValueError(f"{p}: a stack of ablations at several layers; read it with read_ablations")
    return _parse_ablation(p, spec)


def read_ablations(path: str | Path) -> tuple[Ablation, ...]:
    """Every ablation of a file: one, or a stack's (`write_ablation_stack`), at distinct layers."""
    p, spec = _read_ablation_file(path)
    if not (isinstance(spec, dict) and "stack" in spec):
        return (_parse_ablation(p, spec),)
    if not isinstance(spec["stack"], list) or any(
        isinstance(s, dict) and "stack" in s for s in spec["stack"]
    ):
        raise ValueError(f"{p}: 'stack' is a list of ablation specs (none of them a stack)")
    out = tuple(_parse_ablation(p, s) for s in spec["stack"])
    layers = [a.layer for a in out]
    if len(out) < 2 or len(set(layers)) != len(layers):
        raise ValueError(f"{p}: a stack holds ≥ 2 ablations at distinct layers (got layers {layers})")
    return out


def ablation_inputs(path: str | Path) -> dict[str, str]:
    """The SAE folders an ablation file names (a run that reads the file reads them): key → folder."""
    if not str(path) or not Path(path).is_file():
        return {}
    spec = read_json(Path(path))
    stack = isinstance(spec, dict) and isinstance(spec.get("stack"), list)
    specs = spec["stack"] if stack else [spec]
    return {
        f"ablate.sae.{i}" if stack else "ablate.sae": s["sae"]
        for i, s in enumerate(specs)
        if isinstance(s, dict) and isinstance(s.get("sae"), str)
    }


def _sae_layer(sae: Any) -> int:
    """The layer a loaded sae-lens SAE reads, from the metadata saved with it (``sae/cfg.json``)."""
    # The SAE's own record, not the run's config.json. `mechsub.sae.sae_layer` reads the same, but a pipeline
    # module does not import the instruments (tests/test_shape.py): both parse it with `mechsub.hooks`.
    from mechsub.hooks import resid_post_layer

    return resid_post_layer(str(sae.cfg.metadata.hook_name))
