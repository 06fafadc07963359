"""Run folders: every stage writes one that explains itself, atomically, and resumes after an interruption.

Layout of a stage folder::

    .mechsub-run   written first: marks the folder as mechsub's (only such folders are ever deleted or replaced)
    config.json    resolved config, its identity (config + content ids of every input + code version), seed,
                   package version, git commit, model and weights hash
    units/*.json   finished pieces of work (one per seed, per m, per shard...); a resumed run skips these
    ...            the stage's outputs, metrics.json among them
    done.json      written last, atomically: every output with its size and sha256; only it marks "finished"

A stage's identity is its config, the recorded content ids of the inputs it reads (data folders, checkpoints,
SAEs: the hash of their ``done.json`` or manifest, never a re-hash of gigabytes) and the version of the code it
runs (a hash of the syntax trees of its module and every mechsub module that module imports). A finished folder
is reused only when all three match; a stale one is run again (the old one is kept aside until the new one is
complete), unless reuse was asked for explicitly. A lock file beside the folder keeps two processes out of one
run; a lock whose process is gone is taken over.
"""

from __future__ import annotations

import ast
import contextvars
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import mechsub
from mechsub import device, models
from mechsub.config import Config
from mechsub.files import (
    FILE_MODE,
    RunFolderError,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    read_dict,
    read_json,
    remove_temp,
    sha256_file,
    write_json,
)

__all__ = [  # the file helpers are part of what a stage uses from here
    "Run",
    "RunFolderError",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "read_json",
    "remove_temp",
    "sha256_file",
    "stage",
    "write_json",
]  # fmt: skip

log = logging.getLogger(__name__)
T = TypeVar("T")

MARKER = ".mechsub-run"
CONFIG = "config.json"
DONE = "done.json"
FORMAT = 2  # run-folder format: 2 = marker + done record + identity with inputs and code
_BOOKKEEPING = {MARKER, CONFIG, DONE}


# --- provenance -----------------------------------------------------------------------------------------
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


# modules that keep books but compute nothing a result depends on: editing them must not invalidate runs
_NOT_CODE = {"mechsub.runs", "mechsub.files", "mechsub.cli", "mechsub.reliability"}
# libraries whose versions change what a stage computes (and the Python whose syntax trees are hashed)
_LIBRARIES = ("torch", "transformers", "peft", "sae-lens", "transformer-lens", "safetensors")


def _module_file(name: str) -> Path | None:
    root = Path(mechsub.__file__).resolve().parent
    rel = name.split(".")[1:]
    for cand in (root.joinpath(*rel).with_suffix(".py"), root.joinpath(*rel, "__init__.py")):
        if rel and cand.is_file():
            return cand
    return None


def _imports(name: str, tree: ast.AST) -> set[str]:
    """mechsub modules imported anywhere in ``tree`` (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mechsub.")}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "mechsub":
                out |= {f"mechsub.{a.name}" for a in node.names}
            elif node.module.startswith("mechsub."):
                out.add(node.module)
                out |= {f"{node.module}.{a.name}" for a in node.names}  # a submodule imported by name
    return {m for m in out if _module_file(m) is not None}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.cache
def code_version(module: str) -> str:
    """A hash of the code a stage runs: the syntax trees (comments, formatting and docstrings ignored) of
    ``module`` and every mechsub module it imports, transitively."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name in _NOT_CODE:
            continue
        path = _module_file(name)
        if path is None:
            seen[name] = ""
            continue
        tree = ast.parse(path.read_text())
        todo += sorted(_imports(name, tree))
        seen[name] = ast.dump(_strip_docstrings(tree), annotate_fields=False)
    h = hashlib.sha256(f"python {sys.version_info[:2]}\n".encode())
    h.update(" ".join(f"{lib}=={_dist_version(lib)}" for lib in _LIBRARIES).encode())
    for name in sorted(seen):
        h.update(f"{name}\n{seen[name]}\n".encode())
    return h.hexdigest()[:16]


def _find_run(path: Path) -> Path | None:
    """The mechsub run folder that holds ``path`` (itself or an ancestor), if any."""
    for p in (path, *path.parents):
        if (p / MARKER).is_file():
            return p
    return None


def content_id(value: str) -> str | None:
    """What identifies the content of an input a config names, or None if ``value`` names no input.

    - a built-in model name → its name and the weights hash its cache recorded;
    - a checkpoint (a folder with a mechsub model manifest) → the weights hash the manifest recorded;
    - a path inside a mechsub run → that run's done record (the run must be finished);
    - any other file → its sha256; any other folder → the sha256 of its files' names and hashes.
    """
    if not value:
        return None
    if value in models.KNOWN:
        # a built-in model is fixed by the version of the package that ships it (the tiny one by the code that
        # builds it, already in the code version); the loaded weights' hash is recorded beside, in config.json
        src = models.EMBEDDED.get(value)
        return f"model:{value}:{_dist_version(src.package) if src else 'builtin'}"
    path = Path(value)
    if not path.exists():
        return None
    manifest = path / models.MANIFEST
    if manifest.is_file() and (sha := _manifest_sha(manifest)):
        return f"weights:{sha}"
    run = _find_run(path.resolve())
    if run is not None:
        done = run / DONE
        if not done.is_file():
            raise RunFolderError(
                f"input {value} belongs to the unfinished run {run}: finish that run first (rerun its command)"
            )
        rel = path.resolve().relative_to(run).as_posix()
        outputs = _recorded_outputs(done)
        if rel in outputs:  # one output: its recorded hash, so other outputs of that run don't matter
            return f"sha256:{outputs[rel]}"
        under = {k: v for k, v in outputs.items() if rel == "." or k.startswith(rel + "/")}
        if under and (rel == "." or path.is_dir()):
            return "outputs:" + hashlib.sha256(json.dumps(under, sort_keys=True).encode()).hexdigest()
        # a file added to a finished run after the fact (not in its record): its own content
    if path.is_file():
        return f"file:{sha256_file(path)}"
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}:{sha256_file(p)}\n".encode())
    return f"folder:{h.hexdigest()}"


def _recorded_outputs(done: Path) -> dict[str, str]:
    try:
        return {k: v["sha256"] for k, v in read_json(done)["outputs"].items()}
    except (RunFolderError, KeyError, TypeError, AttributeError):
        raise RunFolderError(f"{done} is corrupt: rerun the command that made {done.parent}") from None


def _dist_version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"


def _manifest_sha(path: Path) -> str | None:
    sha = read_dict(path).get("weights_sha256")
    return sha if isinstance(sha, str) else None


def input_ids(config: Config) -> dict[str, Any]:
    """Content ids of every input the config names (fields listed in its ``inputs``, and the paths its
    ``indirect_inputs`` finds inside them: the SAE an ablation file names, the teacher a data folder names)."""
    out: dict[str, Any] = {}
    for name, value in config.indirect_inputs().items():
        if (cid := content_id(value)) is not None:
            out[name] = cid
    for name in type(config).inputs:
        value = getattr(config, name)
        if isinstance(value, tuple):
            ids = [content_id(v) for v in value]
            if any(ids):
                out[name] = ids
        elif (cid := content_id(value)) is not None:
            out[name] = cid
    return out


def identity(config: Config) -> dict[str, Any]:
    """Everything a finished run must match to be reused: config, inputs' content ids and code version, and, for a
    stage that computes anywhere but cpu/float32, where (``compute``: ``"cuda/bfloat16"``; see mechsub.device)."""
    out = {
        "config": type(config).identity_of(config.to_dict()),
        "inputs": input_ids(config),
        "code": code_version(type(config).__module__),
    }
    placed = device.of_config(config)
    if placed is not None and placed.tag != device.REFERENCE:
        out["compute"] = placed.tag
    return out


def describe(
    config: Config, model: dict[str, Any] | None = None, ident: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What config.json holds: the resolved config, its identity and what is needed to reproduce it."""
    return {
        "stage": config.stage,
        "format": FORMAT,
        "config": config.to_dict(),
        "identity": ident if ident is not None else identity(config),
        "seed": getattr(config, "seed", None),
        "mechsub_version": mechsub.__version__,
        "git_commit": git_commit(),
        "model": model,
        "compute": placed.tag if (placed := device.of_config(config)) is not None else None,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --- what happened to each stage (read by the study and the CLI to say what was reused and why) -------------
@dataclass(frozen=True)
class StageEvent:
    root: str
    stage: str
    status: str  # new | resumed | reused | rerun | reused-stale | replaced
    reason: str = ""


_EVENTS: contextvars.ContextVar[list[StageEvent] | None] = contextvars.ContextVar(
    "mechsub_events", default=None
)
_REUSE_STALE: contextvars.ContextVar[bool] = contextvars.ContextVar("mechsub_reuse_stale", default=False)


@contextmanager
def recording() -> Iterator[list[StageEvent]]:
    """Collect the :class:`StageEvent` of every stage opened inside the block."""
    events: list[StageEvent] = []
    token = _EVENTS.set(events)
    try:
        yield events
    finally:
        _EVENTS.reset(token)


@contextmanager
def reuse_stale(on: bool = True) -> Iterator[None]:
    """Inside the block, a finished run whose inputs or code changed is reused (and says so) instead of rerun."""
    token = _REUSE_STALE.set(on)
    try:
        yield
    finally:
        _REUSE_STALE.reset(token)


def _event(root: Path, stage_name: str, status: str, reason: str = "") -> None:
    (log.warning if status in ("rerun", "reused-stale", "replaced") else log.info)(
        "%s: %s%s", root, status, f" ({reason})" if reason else ""
    )
    events = _EVENTS.get()
    if events is not None:
        events.append(StageEvent(str(root), stage_name, status, reason))


# --- locks ----------------------------------------------------------------------------------------------
def lock_path(root: Path) -> Path:
    root = Path(root).resolve()
    return root.parent / f".{root.name}.lock"


def lock_owner(root: Path) -> dict[str, Any] | None:
    """Who holds the lock of ``root`` (pid, host, started), or None when nobody does.

    The lock is an advisory ``flock`` on a file beside the folder: the kernel drops it when its process dies, so
    there are no stale locks to detect; the pid and host in the file are only for messages.
    """
    p = lock_path(root)
    try:
        fd = os.open(p, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_dict(p)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # a leftover file that nobody holds
    finally:
        os.close(fd)


@contextmanager
def lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on run folder ``root``: ``flock`` on ``.NAME.lock`` beside it (the owner's pid and
    host written in it for messages). Raises RunFolderError at once if another process holds it."""
    p = lock_path(root)
    p.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(p, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = lock_owner(root) or {}
            who = f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('started')}"
            raise RunFolderError(
                f"{root} is in use by another mechsub process ({who}); wait for it to finish or use another "
                "output folder"
            ) from None
        try:  # the file we locked may have been unlinked by its previous holder meanwhile: then lock anew
            same = os.fstat(fd).st_ino == os.stat(p).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(me).encode())
    try:
        yield
    finally:
        Path(p).unlink(missing_ok=True)  # while still holding it: a waiter re-checks the inode (above)
        os.close(fd)


# --- the folder itself ------------------------------------------------------------------------------------
def is_run(root: Path) -> bool:
    """Whether ``root`` is a run folder mechsub wrote (it carries the marker)."""
    return (Path(root) / MARKER).is_file()


def is_finished(root: str | Path) -> bool:
    """Whether ``root`` is a finished mechsub run (its done record is written; :func:`verify` checks it)."""
    return is_run(Path(root)) and (Path(root) / DONE).is_file()


def require_finished(root: str | Path, what: str, command: str) -> Path:
    """``root`` if it is a finished run, else a RunFolderError saying which command makes (or resumes) it."""
    root = Path(root)
    if not root.exists():
        raise RunFolderError(f"{what} {root} does not exist; make it with `{command} --out {root}`")
    if not is_finished(root):
        raise RunFolderError(
            f"{what} {root} is not a finished mechsub run; run `{command} --out {root}` with the config it was "
            "started with (it resumes)"
        )
    return root


def _legacy(root: Path) -> str | None:
    """The stage of a run folder written by a mechsub from before run markers, else None."""
    old = read_dict(root / CONFIG)
    return str(old["stage"]) if "mechsub_version" in old and isinstance(old.get("stage"), str) else None


def run_stage(root: Path) -> str | None:
    """The stage kind the marker of run folder ``root`` names (None if unreadable)."""
    stage_name = read_dict(Path(root) / MARKER).get("stage")
    return stage_name if isinstance(stage_name, str) else None


def aside_folders(root: Path) -> list[Path]:
    """Earlier runs of ``root`` moved aside by a replacement that has not completed (newest last)."""
    return sorted(root.parent.glob(f".{root.name}.replaced-*"))


def _outputs(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in _BOOKKEEPING and not any(part.endswith(".tmp") for part in p.parts):
            out[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def verify(root: Path) -> list[str]:
    """Why the finished run ``root`` cannot be trusted (missing or changed outputs, a corrupt done record)."""
    try:
        done = read_json(root / DONE)
        outputs = done["outputs"]
        assert isinstance(outputs, dict)
    except (RunFolderError, KeyError, TypeError, AssertionError):
        return ["done.json is corrupt"]
    problems = []
    for rel, rec in outputs.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != rec.get("bytes") or sha256_file(p) != rec.get("sha256"):
            problems.append(f"{rel} was changed or is corrupt")
    return problems


def _move_aside(root: Path) -> Path:
    aside = root.parent / f".{root.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    os.replace(root, aside)
    return aside


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
        file so that a unit file on disk always means its outputs are complete. A corrupt unit file is
        recomputed, not trusted.
        """
        p = self.root / "units" / f"{key}.json"
        if p.exists():
            try:
                result = read_json(p)
            except RunFolderError as e:
                log.warning("%s; recomputing unit %s", e, key)
            else:
                self.resumed_units.append(key)
                log.info("%s: unit %s already done, skipped", self.root, key)
                return result  # type: ignore[no-any-return]
        result = compute()
        write_json(p, result)
        self.computed_units.append(key)
        return result

    def finish(self, metrics: dict[str, Any]) -> None:
        """Write metrics.json, then the done record listing every output with its hash (last: "finished")."""
        self.metrics = metrics
        write_json(self.root / "metrics.json", metrics)
        write_json(
            self.root / DONE,
            {"outputs": _outputs(self.root), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        )
        self.done = True


def _read_config(root: Path) -> dict[str, Any]:
    try:
        old = read_json(root / CONFIG)
    except (RunFolderError, FileNotFoundError):
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        raise RunFolderError(
            f"{root}/config.json is missing or corrupt, so nothing in {root} can be matched to a config; "
            f"rerun with --force to replace the run (it is a mechsub run folder), or `mechsub clean {root} --all`"
        )
    return old


def _stale_reasons(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    before = old.get("identity") or {}
    reasons = []
    if before.get("code") != new["code"]:
        reasons.append("code changed")
    was, now = before.get("compute", device.REFERENCE), new.get("compute", device.REFERENCE)
    if was != now:
        reasons.append(f"computed on {was}, now on {now}")
    a, b = before.get("inputs") or {}, new["inputs"]
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if changed:
        reasons.append("inputs changed: " + ", ".join(changed))
    return reasons


@contextmanager
def stage(
    root: str | Path, config: Config, *, model: dict[str, Any] | None = None, force: bool = False
) -> Iterator[Run]:
    """Open (or resume, or skip, or replace) the stage folder ``root`` for ``config``, holding its lock.

    - finished folder, same identity → ``run.done`` is True and ``run.metrics`` holds its metrics;
    - finished folder, same config but inputs or code changed → run again (or reuse, inside :func:`reuse_stale`);
    - finished folder whose outputs no longer match their done record → resume (recompute what is missing);
    - unfinished folder with the same config → resume: finished units are read back, not recomputed;
    - folder with a different config → RunFolderError (pick another folder, or ``force``);
    - a folder that is not a mechsub run (no marker) → RunFolderError, even with ``force``;
    - otherwise a new folder, with the marker and config.json written first.

    A replaced run (``force`` or stale) is moved aside and deleted only once the new run has finished; if the new
    run fails, the old one is put back.
    """
    root = Path(root)
    ident = identity(config)
    with lock(root):
        if root.exists() and not is_run(root) and _legacy(root) == config.stage:
            # a run of this stage written before run markers: adopt it; it has no identity, so it is stale
            write_json(root / MARKER, {"stage": config.stage, "format": FORMAT, "adopted": True})
        if root.exists() and not is_run(root) and any(root.iterdir()):
            hint = " (it looks like a run of an older mechsub, from before run markers)" * bool(_legacy(root))
            raise RunFolderError(
                f"{root} exists and is not a mechsub run folder{hint}: it has no {MARKER} marker, so "
                "mechsub will not write into or delete it; choose another output folder"
            )
        if root.exists():
            remove_temp(root)
        if is_run(root) and (kind := run_stage(root)) != config.stage:
            raise RunFolderError(
                f"{root} holds a {kind!r} run; a {config.stage!r} run will not replace it, even with --force: "
                "choose another output folder"
            )
        replace_reason = "--force" if force and is_run(root) else ""
        if is_run(root) and not replace_reason:
            old = _read_config(root)
            same = (
                old.get("stage") == config.stage
                and type(config).identity_of(old["config"]) == ident["config"]
            )
            if not same:
                kept = aside_folders(root)
                raise RunFolderError(
                    f"{root} already holds a {old.get('stage')!r} run with a different config; use another "
                    "output folder, or --force to replace it"
                    + (f" (an earlier run is kept at {kept[-1]}: `mechsub clean {root} --restore` puts it back)"
                       if kept else "")
                )  # fmt: skip
            stale = _stale_reasons(old, ident)
            if (root / DONE).is_file():
                problems = verify(root)
                if stale and not _REUSE_STALE.get():
                    replace_reason = "; ".join(stale)
                elif problems:
                    # units would be read back while the side files they wrote are damaged: run it all again
                    replace_reason = "outputs changed after it finished: " + "; ".join(problems)
                else:
                    if stale:
                        _event(root, config.stage, "reused-stale", "; ".join(stale))
                    else:
                        _event(root, config.stage, "reused", "same config, inputs and code")
                    metrics = read_json(root / "metrics.json") if (root / "metrics.json").is_file() else {}
                    yield Run(root, config, done=True, metrics=metrics)
                    return
            elif stale:  # never resume a stale run: its units were computed from the old inputs or code
                replace_reason = "unfinished, and " + "; ".join(stale)
            else:
                _event(root, config.stage, "resumed", "unfinished")
        aside = None
        if replace_reason:
            aside = _move_aside(root)
            _event(root, config.stage, "rerun" if replace_reason != "--force" else "replaced", replace_reason)
        run = Run(root, config)
        try:
            if not is_run(root):
                root.mkdir(parents=True, exist_ok=True)
                write_json(root / MARKER, {"stage": config.stage, "format": FORMAT})
                write_json(root / CONFIG, describe(config, model, ident))
                if not replace_reason:
                    _event(root, config.stage, "new")
            yield run
        except BaseException:
            if aside is not None and not run.done:
                shutil.rmtree(root, ignore_errors=True)
                os.replace(aside, root)
                log.warning("%s: the new run failed; the previous run was put back", root)
            raise
        if run.done:
            for prev in ([aside] if aside is not None else []) + aside_folders(root):
                _carry_over(prev, root)
                shutil.rmtree(prev, ignore_errors=True)


def _carry_over(old: Path, root: Path) -> None:
    """Move into ``root`` the files of the replaced run ``old`` that it did not make (a user's notes, an
    analysis's extra output): files a finished run's done record does not list, that the new run has not written."""
    if not (old / DONE).is_file():
        return  # an unfinished run: what it made is not listed anywhere, so nothing can be told apart
    try:
        listed = set(read_json(old / DONE)["outputs"])
    except (RunFolderError, KeyError, TypeError):
        return
    for p in sorted(old.rglob("*")):
        rel = p.relative_to(old).as_posix()
        if (not p.is_file() or rel in listed or rel in _BOOKKEEPING or rel.startswith("units/")
                or any(part.endswith(".tmp") for part in p.parts) or (root / rel).exists()):  # fmt: skip
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, root / rel)
        log.warning("%s: kept %s, which the replaced run did not make", root, rel)


def clean(root: str | Path, *, everything: bool = False, restore: bool = False) -> list[str]:
    """Make ``root`` safe to run again: remove temporary leftovers, corrupt units and an unverifiable done record
    (a lock needs no cleaning: it dies with its process). Holds the folder's lock while it works.

    ``restore`` puts back an earlier run that a replacement moved aside (when the replacement never finished);
    ``everything`` deletes the run folder itself (only if it is a mechsub run). Returns what was done.
    """
    root = Path(root)
    did: list[str] = []
    with lock(root):
        if root.exists() and not is_run(root):
            raise RunFolderError(f"{root} is not a mechsub run folder (no {MARKER}); not touching it")
        if everything:
            if root.exists():
                shutil.rmtree(root)
                did.append(f"deleted the run {root}")
            return did
        if root.exists():
            did += [f"removed leftover {p.relative_to(root)}" for p in remove_temp(root)]
            if (root / DONE).is_file() and (problems := verify(root)):
                (root / DONE).unlink()
                did.append("marked unfinished (" + "; ".join(problems) + "): the next run computes it again")
            units = root / "units"
            for u in sorted(units.glob("*.json")) if units.is_dir() else []:
                try:
                    read_json(u)
                except RunFolderError:
                    u.unlink()
                    did.append(f"removed the corrupt unit {u.name}")
        asides = aside_folders(root)
        if asides and restore and not (root / DONE).is_file():
            if root.exists():
                shutil.rmtree(root)
            os.replace(asides[-1], root)
            did.append(f"restored the earlier run from {asides[-1].name}")
        elif asides:
            did.append(f"an earlier run is kept at {asides[-1]} (--restore puts it back)")
    return did
