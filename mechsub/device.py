"""Where a stage computes: device and dtype, resolved once at the edge and recorded with the run.

``resolve("auto", "auto")`` is CUDA in bf16 where there is a GPU that has it, else the CPU in fp32 (today's path,
bit for bit). Stage configs carry ``device`` and ``dtype`` as *placement* fields (:data:`PLACEMENT`): the words
a user wrote never enter a run's identity, the resolved placement does, and only when it is not cpu/float32:

- on a CPU machine ``auto`` and ``cpu`` give the same bytes, so they must name the same run (and every run made
  before these fields existed keeps its identity);
- on a GPU the numbers differ (other kernels, bf16), so a GPU run is not silently reused for, resumed into or
  mixed with a CPU run of the same config: :func:`mechsub.runs.identity` adds ``compute: "cuda/bfloat16"``.

Optional backends (vLLM, accelerate, nnsight remote) are imported through :func:`need`, which names the extra.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

import torch

#: the stage-config field names that say where to compute, not what
PLACEMENT = ("device", "dtype")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
#: where every result before placement fields was computed: leaves a run's identity unchanged
REFERENCE = "cpu/float32"


class DeviceError(ValueError):
    """A device or dtype that cannot be used here; the message says what to write instead."""


@dataclass(frozen=True)
class Placement:
    """A resolved device and dtype."""

    device: torch.device
    dtype: torch.dtype

    @property
    def tag(self) -> str:
        """``"cpu/float32"``, ``"cuda/bfloat16"``: what config.json records (the device's type, not its index:
        cuda:0 and cuda:1 compute the same numbers)."""
        return f"{self.device.type}/{str(self.dtype).removeprefix('torch.')}"


def check(device: str, dtype: str) -> None:
    """Raise DeviceError for words :func:`resolve` can never accept (without looking at the machine)."""
    if device != "auto" and re.fullmatch(r"cpu|mps|cuda(:\d+)?", device) is None:
        raise DeviceError(f"device: {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if dtype != "auto" and _ALIASES.get(dtype, dtype) not in DTYPES:
        raise DeviceError(f"dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)} (or bf16, fp16, fp32)")


def resolve(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``device``: auto (cuda if present, else cpu), cpu, cuda, cuda:N or mps. ``dtype``: auto (bfloat16 on a
    CUDA device that supports it, else float32), float32, bfloat16, float16 (or bf16/fp16/fp32)."""
    check(device, dtype)
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device: {device!r} asked for, but torch sees no CUDA GPU; use auto or cpu")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise DeviceError(f"device: {device!r} asked for, but MPS is not available; use auto or cpu")
    if dtype == "auto":
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return dev, torch.bfloat16 if bf16 else torch.float32
    return dev, DTYPES[_ALIASES.get(dtype, dtype)]


def placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """:func:`resolve` as a :class:`Placement`."""
    return Placement(*resolve(device, dtype))


def of_config(config: Any) -> Placement | None:
    """The resolved placement of a stage config with ``device``/``dtype`` fields; None for one without."""
    if not hasattr(config, "device"):
        return None
    return placement(config.device, getattr(config, "dtype", "auto"))


def need(module: str, extra: str, what: str) -> Any:
    """Import the optional ``module`` or raise ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs {module}, which is not installed (or fails to import: {e}); "
            f"install it with: pip install 'mechsub[{extra}]'"
        ) from None
