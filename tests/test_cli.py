from typer.testing import CliRunner

from mechsub.cli import app

runner = CliRunner()


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "mnist" in r.output and "models" in r.output


def test_mnist_help_explains_fields():
    r = runner.invoke(app, ["mnist", "--help"])
    assert r.exit_code == 0 and "auxiliary" in r.output


def test_bad_override_is_a_clear_error(tmp_path):
    r = runner.invoke(app, ["mnist", "--out", str(tmp_path), "--set", "n_modles=3"])
    assert r.exit_code == 2
    assert "unknown key(s) n_modles" in r.output


def test_show_config_prints_toml():
    r = runner.invoke(app, ["mnist", "--set", "n_models=7", "--show-config"])
    assert r.exit_code == 0 and "n_models = 7" in r.output


def test_unknown_model_is_a_clear_error():
    r = runner.invoke(app, ["models", "no-such-model"])
    assert r.exit_code == 2 and "unknown model" in r.output
