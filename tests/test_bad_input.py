"""Damaged or outdated inputs fail with the project's own errors, naming the file and what to do.

The CLI turns ConfigError, ModelError, RunFolderError and ValueError into a one-line "error: ..."; anything
else (a KeyError, safetensors' own error) would reach the user as a traceback.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mechsub import capture, data
from mechsub.data import DataConfig
from mechsub.runs import RunFolderError

GARBAGE = torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(1)).byte().numpy().tobytes()


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("data") / "none"
    data.run(DataConfig(model="tiny", teacher="none", n_prompts=4, batch_size=4, max_new_tokens=12), d)
    assert data.load_examples(d)  # a good folder loads, and keeps something to damage
    return d


@pytest.fixture
def copy(data_folder, tmp_path):
    return shutil.copytree(data_folder, tmp_path / "none")


def test_data_row_without_kept_names_file_row_and_fix(copy):
    path = copy / "completions.json"
    rows = json.loads(path.read_text())
    del rows[2]["kept"]
    path.write_text(json.dumps(rows))
    with pytest.raises(
        RunFolderError, match=r"completions\.json row 2 has no 'kept'.*mechsub data --out .*--force"
    ):
        data.load_examples(copy)


def test_garbage_data_shard_names_the_file(copy):
    (copy / "shards" / "b0000.safetensors").write_bytes(GARBAGE)
    with pytest.raises(RunFolderError, match=r"b0000\.safetensors is not a readable safetensors file"):
        data.load_examples(copy)


def _capture_folder(tmp_path):
    """A capture folder as ``capture.capture`` writes one: index.json and one shard per chunk of sequences."""
    folder = tmp_path / "cap"
    folder.mkdir()
    hook = "blocks.0.hook_resid_post"
    (folder / "index.json").write_text(
        json.dumps({"hooks": [hook], "n_sequences": 4, "batch_size": 2, "n_positions": 7})
    )
    save_file({hook: torch.randn(3, 8)}, folder / "00000.safetensors")
    save_file({hook: torch.randn(4, 8)}, folder / "00001.safetensors")
    return folder, hook


def test_capture_shards_load_back(tmp_path):
    folder, hook = _capture_folder(tmp_path)
    assert capture.load_shards(folder)[hook].shape == (7, 8)


def test_garbage_activation_shard_names_the_file(tmp_path):
    folder, _ = _capture_folder(tmp_path)
    (folder / "00001.safetensors").write_bytes(GARBAGE)
    with pytest.raises(ValueError, match=r"00001\.safetensors is not a readable activation shard.*delete it"):
        capture.load_shards(folder)


def test_missing_or_foreign_activation_shard_is_not_a_shorter_capture(tmp_path):
    folder, _ = _capture_folder(tmp_path)
    (folder / "00001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds 3 positions in 1 shards, not the 7 .*incomplete"):
        capture.load_shards(folder)
    save_file({"blocks.1.hook_resid_post": torch.randn(4, 8)}, folder / "00001.safetensors")
    with pytest.raises(
        ValueError, match=r"00001\.safetensors has no activations at blocks\.0\.hook_resid_post"
    ):
        capture.load_shards(folder)
