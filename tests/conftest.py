import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest

from mechsub import models


@pytest.fixture(scope="session")
def tiny() -> models.LoadedModel:
    return models.load("tiny")


@pytest.fixture(scope="session")
def smol() -> models.LoadedModel:
    return models.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma() -> models.LoadedModel:
    return models.load("gemma3-270m")
