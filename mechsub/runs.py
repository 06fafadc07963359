"""Run folders: every stage writes one that explains itself, atomically, and resumes after an interruption.

Layout of a stage folder::

    config.json    written first: resolved config, stage, seed, package version, git commit, model and weights hash
    units/*.json   finished pieces of work (one per seed, per m, per shard...); a resumed run skips these
    ...            the stage's outputs
    metrics.json   written last: its presence marks the stage finished
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import mechsub
from mechsub.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")
_UMASK = os.umask(0)
os.umask(_UMASK)


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (for example it holds a different config)."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; on success it replaces ``folder`` whole, on error it is removed."""
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path} is not valid JSON ({e}); delete it to recompute") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Config):
        return o.to_dict()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def git_commit() -> str | None:
    """The commit of the mechsub checkout, with ``+dirty`` if it has uncommitted changes; None outside git."""
    here = Path(mechsub.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # results under artifacts/ are outputs, not code: rewriting them does not make the code dirty
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":(top)",
                ":(top,exclude)artifacts",
            ],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


@dataclass
class Run:
    """An open stage folder. Use :func:`stage` to get one."""

    root: Path
    config: Config
    done: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    resumed_units: list[str] = field(default_factory=list)
    computed_units: list[str] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.root / name

    def unit(self, key: str, compute: Callable[[], T]) -> T:
        """Return the saved result of unit ``key`` or compute, save atomically and return it.

        A unit's result must be JSON-serialisable; larger outputs go beside it, written before the unit
        file so that a unit file on disk always means its outputs are complete.
        """
        p = self.root / "units" / f"{key}.json"
        if p.exists():
            self.resumed_units.append(key)
            log.info("%s: unit %s already done, skipped", self.root, key)
            return read_json(p)  # type: ignore[no-any-return]
        result = compute()
        write_json(p, result)
        self.computed_units.append(key)
        return result

    def finish(self, metrics: dict[str, Any]) -> None:
        """Write metrics.json (last), marking the stage finished."""
        self.metrics = metrics
        write_json(self.root / "metrics.json", metrics)
        self.done = True


def describe(config: Config, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """What config.json holds: the resolved config and what is needed to reproduce it."""
    return {
        "stage": config.stage,
        "config": config.to_dict(),
        "seed": getattr(config, "seed", None),
        "mechsub_version": mechsub.__version__,
        "git_commit": git_commit(),
        "model": model,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@contextmanager
def stage(
    root: str | Path, config: Config, *, model: dict[str, Any] | None = None, force: bool = False
) -> Iterator[Run]:
    """Open (or resume, or skip) the stage folder ``root`` for ``config``.

    - finished folder with the same config → ``run.done`` is True and ``run.metrics`` holds its metrics;
    - unfinished folder with the same config → resume: finished units are read back, not recomputed;
    - folder with a different config → RunFolderError (pick another folder or delete it);
    - otherwise a new folder, with config.json written first.

    ``force`` deletes an existing run folder (one holding config.json) and starts over.
    """
    root = Path(root)
    cfg_path = root / "config.json"
    if force and cfg_path.exists():
        import shutil

        log.info("%s: --force, deleting the previous run", root)
        shutil.rmtree(root)
    if cfg_path.exists():
        old = read_json(cfg_path)
        same = type(config).identity_of(old.get("config") or {}) == type(config).identity_of(config.to_dict())
        if old.get("stage") != config.stage or not same:
            raise RunFolderError(
                f"{root} already holds a {old.get('stage')!r} run with a different config; "
                f"use another output folder or delete {root} to start over"
            )
        if (root / "metrics.json").exists():
            log.info("%s: finished with the same config, skipped", root)
            yield Run(root, config, done=True, metrics=read_json(root / "metrics.json"))
            return
        log.info("%s: resuming an unfinished run", root)
    else:
        root.mkdir(parents=True, exist_ok=True)
        write_json(cfg_path, describe(config, model))
    yield Run(root, config)
