"""Fuzzing of config parsing: whatever JSON-like table a user writes, a stage config is built or ConfigError says
which field is wrong; never a TypeError, OverflowError or KeyError from deep inside."""

import dataclasses
import importlib
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechsub.config import Config, ConfigError

STAGE_MODULES = (
    "analyze",
    "bench",
    "data",
    "divergence",
    "evaluate",
    "mnist",
    "sae",
    "student",
    "study",
    "teacher",
)


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


for _m in STAGE_MODULES:
    importlib.import_module(f"mechsub.{_m}")
CONFIGS = sorted(
    {c for c in _subclasses(Config) if c.__module__.startswith("mechsub.")}, key=lambda c: c.__name__
)


def test_every_stage_config_is_fuzzed():
    # grep -n "class .*Config(Config)" mechsub/*.py lists these ten
    assert len(CONFIGS) >= 10 and {c.stage for c in CONFIGS} >= {"mnist", "data", "sae", "study"}


def _names(cls: type[Config]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _defaults(cls: type[Config]) -> dict:
    try:
        return cls().to_dict()
    except ConfigError:  # a config with a required input (no usable default): start from nothing
        return {}


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 1, 2**63, 10**400, -(10**400)])  # 10**400: beyond any float
    | st.floats()  # nan and ±inf included
    | st.text(max_size=12)
    | st.sampled_from(["owl", "none", "tiny", "topk", "standard", "uniform", "constrained", "1e-3", ""])
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


@st.composite
def tables(draw: st.DrawFn, cls: type[Config]) -> object:
    """A JSON-like table for ``cls``: random keys and values, or its defaults with a few fields changed or
    removed (which reaches ``validate``), now and then not a table at all."""
    names = _names(cls)
    keys = st.sampled_from(names) | st.text(max_size=10)
    kind = draw(st.sampled_from(["random", "mutated", "mutated", "not a table"]))
    if kind == "not a table":
        return draw(values)
    if kind == "random":
        return draw(st.dictionaries(keys, values, max_size=6))
    table = _defaults(cls)
    for k in draw(st.lists(st.sampled_from(names), max_size=2)):
        table.pop(k, None)
    table.update(draw(st.dictionaries(keys, values, min_size=1, max_size=3)))
    return table


def _same(a: object, b: object) -> bool:
    """Equality in which nan equals nan (a config may hold one only where validate allows it)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_from_dict_builds_or_raises_config_error(cls, data):
    table = data.draw(tables(cls))
    try:
        cfg = cls.from_dict(table)
    except ConfigError as e:
        assert str(e)  # a message to show
        return
    _check_stored(cls, cfg)


def _strict(token: str) -> object:
    raise AssertionError(f"config.json would hold {token}, which JSON does not have")


def _check_stored(cls: type[Config], cfg: Config) -> None:
    """What was built is strict JSON (no NaN or Infinity) and round-trips through the config.json of runs."""
    text = cfg.to_json()
    json.loads(text, parse_constant=_strict)
    assert _same(cls.from_json(text).to_dict(), cfg.to_dict())


NASTY = [None, True, 0, -1, 2**63, 10**400, -(10**400), 0.5, -0.0, math.nan, math.inf, -math.inf, "", "x",
         "1", [], [1, "a"], [[]], {}, {"a": 1}]  # fmt: skip


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_with_every_nasty_value(cls):
    # exhaustive over one changed field: what random tables reach only now and then
    base = _defaults(cls)
    for name in _names(cls):
        for value in NASTY:
            try:
                cfg = cls.from_dict({**base, name: value})
            except ConfigError:
                continue
            except Exception as e:
                pytest.fail(f"{cls.__name__}.{name} = {value!r:.40}: {type(e).__name__}: {e}")
            _check_stored(cls, cfg)
