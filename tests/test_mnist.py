import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mechsub import mnist
from mechsub.config import ConfigError
from mechsub.mnist import MnistConfig

SMALL = MnistConfig(
    n_models=3, m_sweep=(1, 3), teacher_epochs=2, distill_steps=20, distill_batch_size=32, hidden=32
)


def test_batched_mlps_are_independent():
    params = mnist.init_mlps(3, (5, 4, 2), seed=0)
    x = torch.randn(3, 7, 5)
    full = mnist.forward(params, x)
    for i in range(3):
        alone = mnist.forward([p[i : i + 1] for p in params], x[i : i + 1])
        torch.testing.assert_close(full[i : i + 1], alone)


def test_init_shares_hidden_layers_across_m():
    a = mnist.init_mlps(2, (6, 8, 8, 11), seed=1)
    b = mnist.init_mlps(2, (6, 8, 8, 13), seed=1)
    c = mnist.init_mlps(2, (6, 8, 8, 11), seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4], strict=True))
    assert not torch.equal(a[0], c[0])


def test_m1_aux_distillation_has_zero_gradient():
    # softmax over a single logit is constant: the aux-only student with m=1 must not move at all
    cfg = SMALL
    data = mnist.load_digits_split(cfg.test_fraction, cfg.seed)
    sizes = (64, cfg.hidden, cfg.hidden, 11)
    ref = mnist.init_mlps(cfg.n_models, sizes, seed=0)
    teacher = mnist.train_teacher(ref, data[0], data[1], cfg, torch.Generator().manual_seed(0))
    other = mnist.init_mlps(cfg.n_models, sizes, seed=5)
    students = mnist.distill_students(ref, other, teacher, 1, cfg, torch.Generator().manual_seed(0))
    assert all(torch.equal(s, r) for s, r in zip(students["student_aux"], ref, strict=True))
    assert not all(torch.equal(s, r) for s, r in zip(students["student_all"], ref, strict=True))


def test_small_run_writes_metrics_and_figure(tmp_path):
    m = mnist.run(SMALL, tmp_path)
    for key in [
        "reference_acc",
        "teacher_acc",
        "student_aux_acc",
        "student_all_acc",
        "cross_init_aux_acc",
        "cross_init_all_acc",
        "m_sweep",
        "n_models",
        "seconds",
    ]:
        assert key in m
        if key.endswith("_acc"):
            assert f"{key}_ci95" in m and 0.0 <= m[key] <= 1.0
    assert [s["m"] for s in m["m_sweep"]] == [1, 3]
    assert m["teacher_acc"] > 0.5  # even two epochs of a small teacher learn the digits
    assert (tmp_path / "mnist.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "config.json").read_text())["config"] == SMALL.to_dict()


def test_same_seed_same_results(tmp_path):
    a = mnist.run(SMALL, tmp_path / "a")
    b = mnist.run(SMALL, tmp_path / "b")
    assert (tmp_path / "a" / "units" / "m3.json").read_bytes() == (
        tmp_path / "b" / "units" / "m3.json"
    ).read_bytes()
    assert a["student_aux_acc"] == b["student_aux_acc"]


def test_killed_run_resumes_with_identical_results(tmp_path):
    cfg = SMALL.replace(m_sweep=(1, 2, 3, 5), distill_steps=150)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    cmd = [sys.executable, "-m", "mechsub.cli", "mnist", "--config", str(tmp_path / "cfg.json")]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], env=env)
    first_unit = tmp_path / "killed" / "units" / "m1.json"
    deadline = time.time() + 120
    while not first_unit.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (tmp_path / "killed" / "metrics.json").exists():
        pytest.fail("the run finished before it could be killed; make the config slower")
    assert first_unit.exists()
    done_before = sorted(p.name for p in (tmp_path / "killed" / "units").iterdir())
    assert "m5.json" not in done_before
    subprocess.run([*cmd, "--out", str(tmp_path / "killed")], env=env, check=True)
    subprocess.run([*cmd, "--out", str(tmp_path / "clean")], env=env, check=True)
    killed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert killed["resumed_units"] == [n.removesuffix(".json") for n in done_before]
    for key in ("student_aux_acc", "cross_init_aux_acc", "m_sweep"):
        assert killed[key] == clean[key]
    assert not [p for p in (tmp_path / "killed").rglob("*.tmp")]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("distill_batch_size", 0),
        ("distill_batch_size", -3),
        ("batch_size", 0),
        ("hidden", 0),
        ("teacher_epochs", 0),
        ("distill_steps", 0),
        ("n_models", 1),
        ("m_sweep", ()),
        ("m_sweep", (3, 1, 3)),
        ("m_sweep", (0, 3)),
        ("m", 4),
        ("lr", 0.0),
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("test_fraction", 0.0),
        ("test_fraction", 1.0),
        ("test_fraction", float("nan")),
        ("test_fraction", 1e-4),  # rounds to no test digit at all
        ("test_fraction", 0.9999),  # no training digit
    ],
)
def test_unusable_numbers_fail_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^MnistConfig: {field}: "):
        MnistConfig.from_dict({**SMALL.to_dict(), field: value})


def test_digit_count_is_the_data_sets():
    from sklearn.datasets import load_digits

    assert len(load_digits().data) == mnist.N_DIGITS


def test_cli_refuses_a_zero_batch_before_writing(tmp_path):
    from typer.testing import CliRunner

    from mechsub.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["mnist", "--out", str(out), "--set", "distill_batch_size=0"])
    assert r.exit_code == 2 and "error: MnistConfig: distill_batch_size: must be ≥ 1, got 0" in r.output
    assert not out.exists()
