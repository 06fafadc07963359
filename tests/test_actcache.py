import numpy as np
import pytest
import torch

from mechsub import actcache, hooks

HOOKS = [hooks.resid_post(0), hooks.resid_post(1)]


def _windows(n, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (n, size), generator=g).tolist()


def _fresh(tiny, windows, hook):
    """A capture by hand: one forward per window batch, every position but 0, window-major."""
    acts = hooks.read(tiny, torch.tensor(windows), [hook])[hook]
    return acts[:, 1:].reshape(-1, acts.shape[-1])


def test_cached_activations_equal_a_fresh_capture_at_the_same_positions(tmp_path, tiny):
    ws = _windows(7)
    idx = actcache.write_cache(
        tiny, ws, HOOKS, tmp_path / "c", dtype="float32", batch_size=2, shard_windows=3
    )
    assert idx["n_shards"] == 3 and idx["rows"] == 7 * 11 and idx["tokens_captured"] == 7 * 12
    for h in HOOKS:
        c = actcache.CachedActivations(tmp_path / "c", h)
        fresh = _fresh(tiny, ws, h)
        assert len(c) == 77 and torch.equal(c.all(), fresh)
        perm = np.random.default_rng(1).permutation(77)[:20]  # rows in any order, across shards
        assert torch.equal(c.rows(perm), fresh[perm])
    half = actcache.write_cache(tiny, ws, HOOKS[:1], tmp_path / "h", dtype="float16", shard_windows=4)
    assert half["dtype"] == "float16"
    c16 = actcache.CachedActivations(tmp_path / "h", HOOKS[0])
    assert c16.arrays[0].dtype == np.float16
    assert torch.equal(c16.all(), _fresh(tiny, ws, HOOKS[0]).half().float())


def test_an_interrupted_cache_resumes_with_only_the_missing_shards(tmp_path, tiny, monkeypatch):
    ws = _windows(9)
    ref = tmp_path / "ref"
    actcache.write_cache(tiny, ws, HOOKS, ref, dtype="float32", batch_size=3, shard_windows=3)
    calls = []
    real = hooks.read

    def dies_on_the_third_forward(model, ids, names, **kw):
        calls.append(ids.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, ids, names, **kw)

    monkeypatch.setattr(hooks, "read", dies_on_the_third_forward)
    with pytest.raises(KeyboardInterrupt):
        actcache.write_cache(tiny, ws, HOOKS, tmp_path / "c", dtype="float32", batch_size=3, shard_windows=3)
    assert (tmp_path / "c" / "00001" / "done.json").is_file() and not (tmp_path / "c" / "00002").exists()
    with pytest.raises(ValueError, match="unfinished"):
        actcache.CachedActivations(tmp_path / "c", HOOKS[0])
    calls.clear()

    def counted(model, ids, names, **kw):
        calls.append(ids.shape[0])
        return real(model, ids, names, **kw)

    monkeypatch.setattr(hooks, "read", counted)
    again = actcache.write_cache(
        tiny, ws, HOOKS, tmp_path / "c", dtype="float32", batch_size=3, shard_windows=3
    )
    assert len(calls) == 1 and again["tokens_captured"] == 3 * 12  # shard 2 only
    for h in HOOKS:
        for k in range(3):
            assert (tmp_path / "c" / f"{k:05d}" / f"{h}.npy").read_bytes() == (
                ref / f"{k:05d}" / f"{h}.npy"
            ).read_bytes()
    with pytest.raises(ValueError, match="other windows, hooks or settings"):
        actcache.write_cache(
            tiny, ws[:8], HOOKS, tmp_path / "c", dtype="float32", batch_size=3, shard_windows=3
        )


def test_batches_are_seeded_and_each_epoch_covers_every_row_once(tmp_path, tiny):
    ws = _windows(4, size=9)  # 32 rows
    actcache.write_cache(tiny, ws, HOOKS[:1], tmp_path / "c", dtype="float32", shard_windows=3)
    c = actcache.CachedActivations(tmp_path / "c", HOOKS[0])
    full = c.all()

    def first(seed, n):
        it = c.batches(8, seed)
        return [next(it) for _ in range(n)]

    epoch = torch.cat(first(0, 4))
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(epoch) == key(full)  # 4 batches of 8 = every row exactly once
    assert all(torch.equal(a, b) for a, b in zip(first(0, 6), first(0, 6), strict=True))
    assert not torch.equal(torch.cat(first(0, 4)), torch.cat(first(1, 4)))
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(c.batches(64, 0))


def test_cache_refuses_bad_input(tmp_path, tiny):
    with pytest.raises(ValueError, match="same length"):
        actcache.write_cache(tiny, [[1, 2, 3], [1, 2]], HOOKS, tmp_path / "c")
    with pytest.raises(ValueError, match="dtype"):
        actcache.write_cache(tiny, _windows(2), HOOKS, tmp_path / "c", dtype="bfloat16")
    with pytest.raises(FileNotFoundError, match="no activation cache"):
        actcache.CachedActivations(tmp_path / "nothing", HOOKS[0])
    actcache.write_cache(tiny, _windows(2), HOOKS[:1], tmp_path / "c")
    with pytest.raises(ValueError, match=r"not blocks\.1"):
        actcache.CachedActivations(tmp_path / "c", HOOKS[1])
    assert actcache.corpus_split(100, 60, 20) == (range(60), range(80, 100))
    with pytest.raises(ValueError, match="do not fit"):
        actcache.corpus_split(100, 90, 20)
