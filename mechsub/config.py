"""Stage configs: frozen dataclasses that validate themselves and round-trip through JSON and TOML.

Every stage of mechsub takes one of these. Fields carry their documentation in ``field(metadata={"help": ...})``
so the CLI and the docs are built from the same place, and unknown keys or wrong types fail loudly with the
name of the field to fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Self

import tomli_w


class ConfigError(ValueError):
    """A config that cannot be used; the message says which field and what to write instead."""


def doc(default: Any, help: str, optional: bool = False, placement: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with a one-line description (shown by ``--help`` and written in docs).

    ``optional``: a field added after runs existed whose default keeps the old behaviour; at its default it is
    left out of the config's identity (stage folder names, the same-config check), so earlier runs stay valid.
    ``placement``: a ``device`` or ``dtype`` field (where to compute, see :mod:`mechsub.device`): never part of
    the config's identity at any value; :func:`mechsub.runs.identity` records the resolved placement instead.
    """
    if isinstance(default, list | dict | set):
        raise TypeError("config fields must be immutable: use a tuple")
    metadata = {"help": help, "optional": optional or placement, "placement": placement}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def device_field() -> Any:
    """The ``device`` field of a stage config that loads a model."""
    return doc(
        "auto",
        "where to compute: auto (cuda if present, else cpu), cpu, cuda, cuda:N, mps; a placement: the run's "
        "identity holds the resolved device/dtype when it is not cpu/float32",
        placement=True,
    )


def dtype_field() -> Any:
    """The ``dtype`` field of a stage config that loads a model."""
    return doc(
        "auto",
        "weights and activations: auto (bfloat16 on a CUDA GPU that has it, else float32), float32, bfloat16, "
        "float16",
        placement=True,
    )


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a JSON/TOML value to the annotated type, or raise ConfigError naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{name}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if isinstance(value, int) and value.bit_length() > 1000:  # float() would raise OverflowError
            raise ConfigError(f"{name}: a number of ~{value.bit_length() * 3 // 10} digits is too large")
        # no setting means nan or inf, and config.json would hold NaN/Infinity, which JSON does not have
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table of {hint.__name__} fields, got {value!r}")
        return hint.from_dict(value, _prefix=f"{name}.")
    raise ConfigError(f"{name}: unsupported field type {hint!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every stage config. Subclasses add fields with :func:`doc` and checks in ``validate``."""

    #: the stage name a run folder is filed under
    stage: ClassVar[str] = "config"
    #: fields that name what the stage reads (models, data folders, checkpoints, files): their recorded content
    #: ids join the config in the run's identity, so a changed input makes a finished run stale
    inputs: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            # coerce in place so that Config(lr=1) and Config.from_dict({"lr": 1}) are equal
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        placed = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("placement")
        }
        if placed:
            from mechsub.device import DeviceError, check  # torch, only for configs that place a model

            try:
                check(placed.get("device", "auto"), placed.get("dtype", "auto"))
            except DeviceError as e:
                raise ConfigError(str(e)) from None
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for values that are well-typed but unusable."""

    def indirect_inputs(self) -> dict[str, str]:
        """Paths the stage reads that its input files name (not fields of its own): name → path. They join the
        run's identity like ``inputs`` do."""
        return {}

    # -- serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], _prefix: str = "") -> Self:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a table of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown key(s) {', '.join(_prefix + u for u in unknown)}; "
                f"known keys are {', '.join(sorted(known))}"
            )
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{cls.__name__}: {_prefix}{e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def identity_of(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` (a config dict) without the optional fields that hold their default, and without the placement
        fields (device, dtype) at any value."""
        skip = {
            f.name
            for f in dataclasses.fields(cls)
            if f.metadata.get("placement")
            or (f.metadata.get("optional") and _plain(data.get(f.name, f.default)) == _plain(f.default))
        }
        return {k: v for k, v in data.items() if k not in skip}

    def identity(self) -> str:
        """What names a run of this config: its JSON without optional fields at their defaults."""
        return json.dumps(self.identity_of(self.to_dict()), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.__name__}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def to_toml(self) -> str:
        return tomli_w.dumps({k: v for k, v in self.to_dict().items() if v is not None})

    @classmethod
    def from_toml(cls, text: str) -> Self:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{cls.__name__}: not valid TOML ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read a config from a ``.json`` or ``.toml`` file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix == ".toml":
            return cls.from_toml(text)
        if path.suffix == ".json":
            return cls.from_json(text)
        raise ConfigError(f"config file {path}: use a .json or .toml file")

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name → its one-line description."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds; used in ``validate``."""
    if not condition:
        raise ConfigError(message)


def _plain(value: Any) -> Any:
    """A value as JSON has it (tuples are lists), so a dict read back compares equal to a default."""
    return list(value) if isinstance(value, tuple) else value
