from dataclasses import dataclass
from typing import Literal

import pytest

from mechsub.cli import build_config
from mechsub.config import Config, ConfigError, check, doc
from mechsub.mnist import MnistConfig


@dataclass(frozen=True)
class Inner(Config):
    k: int = doc(1, "an int")


@dataclass(frozen=True)
class Outer(Config):
    name: str = doc("owl", "a name")
    lr: float = doc(1e-3, "a float")
    kind: Literal["a", "b"] = doc("a", "a choice")
    sizes: tuple[int, ...] = doc((1, 2), "a tuple")
    inner: Inner = doc(Inner(), "a nested config")  # noqa: RUF009 (frozen, so sharing is safe)
    maybe: int | None = doc(None, "optional")

    def validate(self) -> None:
        check(self.lr > 0, "lr: must be > 0")


def test_json_and_toml_round_trip():
    c = Outer(name="cat", lr=2, sizes=(3, 4, 5), inner=Inner(k=7), maybe=3)
    assert Outer.from_json(c.to_json()) == c
    assert Outer.from_toml(c.to_toml()) == c
    assert isinstance(Outer.from_json(c.to_json()).lr, float)


def test_file_round_trip(tmp_path):
    c = MnistConfig(n_models=4, m_sweep=(2, 3))
    (tmp_path / "c.toml").write_text(c.to_toml())
    (tmp_path / "c.json").write_text(c.to_json())
    assert MnistConfig.load(tmp_path / "c.toml") == c
    assert MnistConfig.load(tmp_path / "c.json") == c


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nmae": "x"}, "unknown key(s) nmae"),
        ({"lr": "fast"}, "lr: expected a number"),
        ({"lr": -1.0}, "lr: must be > 0"),
        ({"kind": "c"}, "kind: 'c' is not one of"),
        ({"sizes": 3}, "sizes: expected a list"),
        ({"sizes": [1, "x"]}, "sizes[1]: expected an integer"),
        ({"inner": {"j": 1}}, "unknown key(s) inner.j"),
        ({"maybe": True}, "maybe"),
    ],
)
def test_bad_values_are_named(data, message):
    with pytest.raises(ConfigError, match=None) as e:
        Outer.from_dict(data)
    assert message in str(e.value)


def test_mutable_defaults_are_refused():
    with pytest.raises(TypeError):
        doc([1], "a list")


def test_malformed_files(tmp_path):
    (tmp_path / "bad.toml").write_text("n_models = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        MnistConfig.load(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        MnistConfig.load(tmp_path / "missing.toml")
    (tmp_path / "c.yaml").write_text("")
    with pytest.raises(ConfigError, match="use a .json or .toml"):
        MnistConfig.load(tmp_path / "c.yaml")


def test_mnist_config_checks_m_in_sweep():
    with pytest.raises(ConfigError, match="must be one of m_sweep"):
        MnistConfig(m=4, m_sweep=(1, 2))


def test_cli_overrides(tmp_path):
    c = build_config(MnistConfig, None, ["n_models=5", "m_sweep=[3]", "noise=uniform"])
    assert c == MnistConfig(n_models=5, m_sweep=(3,))
    with pytest.raises(ConfigError, match="key=value"):
        build_config(MnistConfig, None, ["n_models"])


def test_every_field_is_documented():
    assert all(MnistConfig.help().values())
