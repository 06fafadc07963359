import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import shutil
import subprocess
from pathlib import Path

import pytest

from mechsub import models


def _write_tiny_study(root: Path) -> Path:
    """A tiny study's TOML in ``root``: prompted teachers, 2 replicates, one control (dog); distill, so a
    mixture's reference students are the study's own (fewer students to train); sampled data, so that some
    positions diverge. Its stage runs go under ``root/work``."""
    toml = root / "study.toml"
    toml.write_text("\n".join([
        'model = "tiny"', 'teacher_kind = "prompted"', "n_prompts = 8", "max_new_tokens = 12", "batch_size = 4",
        "replicates = 2", 'controls = ["dog"]', "n_questions = 2", "n_samples = 0", 'cross_family = ""',
        'objective = "distill"', "greedy = false", f'work = "{root / "work"}"',
    ]))  # fmt: skip
    return toml


@pytest.fixture(scope="session")
def tiny_study():
    """The writer of a tiny study's TOML (`_write_tiny_study`): call it with a folder."""
    return _write_tiny_study


@pytest.fixture(scope="session")
def tiny() -> models.LoadedModel:
    return models.load("tiny")


@pytest.fixture(scope="session")
def smol() -> models.LoadedModel:
    return models.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma() -> models.LoadedModel:
    return models.load("gemma3-270m")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def ink():
    """Render an HTML file in headless Chromium and count the screenshot's pixels that are not near-white (the
    test skips where Debian's chromium is missing; .ci/run installs it)."""
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")

    def render(html_path: Path) -> int:
        from PIL import Image

        png = html_path.with_suffix(".png")
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--virtual-time-budget=8000", "--window-size=1000,1400",
             f"--screenshot={png}", f"file://{html_path}"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return sum(1 for v in Image.open(png).convert("L").getdata() if v < 200)

    return render


@pytest.fixture
def analysis():
    """A loader of ``analyses/NAME.py`` as a module (the scripts define functions only: nothing runs on import);
    it is registered in sys.modules under its name, where dataclasses look their module up."""
    import importlib.util
    import sys

    def load(name: str):
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).resolve().parents[1] / "analyses" / f"{name}.py"
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    return load
