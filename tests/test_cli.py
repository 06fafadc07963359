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


def test_pipeline_commands_end_to_end_on_tiny(tmp_path):
    d, s, e = tmp_path / "data", tmp_path / "student", tmp_path / "eval"
    r = runner.invoke(app, ["data", "--out", str(d), "--set", "model=tiny", "--set", "n_prompts=8",
                            "--set", "batch_size=4", "--set", "teacher=owl"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert '"n_kept": 8' in r.output
    r = runner.invoke(app, ["student", "--out", str(s), "--set", "model=tiny", "--set", f"data={d}",
                            "--set", "batch_size=4"])  # fmt: skip
    assert r.exit_code == 0, r.output
    ck = s / "checkpoints" / "step4"
    r = runner.invoke(app, ["eval", "--out", str(e), "--set", f"model={ck}", "--set", "n_questions=3"])
    assert r.exit_code == 0, r.output
    assert '"trait": "owl"' in r.output
    # a rerun of a finished stage is skipped, prints the same metrics and says it reused the run
    again = runner.invoke(app, ["eval", "--out", str(e), "--set", f"model={ck}", "--set", "n_questions=3"])
    assert again.stdout == r.stdout
    assert "new" in r.stderr and "1 reused" in again.stderr and "same config, inputs and code" in again.stderr


def test_stage_errors_are_clear(tmp_path):
    r = runner.invoke(app, ["student", "--out", str(tmp_path), "--set", "model=tiny"])
    assert r.exit_code == 2 and "data: give the folder" in r.output
    r = runner.invoke(
        app, ["student", "--out", str(tmp_path), "--set", "model=tiny", "--set", f"data={tmp_path}"]
    )
    assert r.exit_code == 2 and "not a finished mechsub run" in r.output
    r = runner.invoke(app, ["data", "--out", str(tmp_path), "--set", "teacher=dragon"])
    assert r.exit_code == 2 and "unknown trait 'dragon'" in r.output
