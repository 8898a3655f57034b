"""The stage contract (DESIGN.md): keys, directories, atomic writes, manifests, completion, locking.

Every stage is ``run_stage(name, workdir, config, inputs, version, build)``: the key is a hash of
(stage name, canonical JSON config, input keys, version); the output directory is
``<workdir>/<stage>/<key[:16]>/``; ``build(dir)`` writes its files (atomically, with the helpers here) and
returns the manifest fields; ``manifest.json`` is written last. A directory with a valid manifest is
complete and is returned at once on the next call; one without is incomplete and ``build`` runs again
(training stages resume from their own checkpoints inside it). A per-directory file lock makes two
concurrent runs of the same stage build once: the second waits, then finds the manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

MANIFEST = "manifest.json"
KEY_PREFIX = 16


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):  # nested models (e.g. inside key_extra) hash as JSON, never as repr
        return obj.model_dump(mode="json", by_alias=True)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot put {type(obj).__name__} into a stage key")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_jsonable)


def stage_key(stage: str, config: Any, inputs: dict[str, str] | None = None, version: str = "1") -> str:
    """sha256 of (stage, canonical config, input keys, version): same inputs, same key."""
    payload = canonical_json({"stage": stage, "config": config, "inputs": inputs or {}, "version": version})
    return hashlib.sha256(payload.encode()).hexdigest()


def compute_key(stage: str, config: Any, inputs: dict[str, str] | None, version: str, key_extra: Any = None) -> str:
    """The key ``run_stage`` uses: ``key_extra`` (e.g. source fingerprints) joins the config in the hash."""
    key_config = config if key_extra is None else {"config": config, "extra": key_extra}
    return stage_key(stage, key_config, inputs, version)


def stage_dir(workdir: str | Path, stage: str, key: str) -> Path:
    return Path(workdir) / stage / key[:KEY_PREFIX]


# ------------------------------------------------------------------------------------------ atomic writes
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename onto it, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def remove_temp_files(directory: Path) -> int:
    """Delete leftovers of killed atomic writes (``.<name>.*.tmp``); returns how many."""
    n = 0
    if directory.exists():
        for p in directory.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    return n


# ------------------------------------------------------------------------------------------ manifests
def code_version() -> str:
    """git revision of the package checkout, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
        rev = out.stdout.strip()
        if out.returncode or not rev:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
        return rev + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_manifest(directory: str | Path, key: str | None = None) -> dict | None:
    """The manifest if ``directory`` holds a complete stage output (valid JSON, matching key), else None."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return None
    if key is not None and manifest.get("key") != key:
        return None
    for rel in manifest.get("files", {}):
        if not (Path(directory) / rel).exists():
            return None
    return manifest


def write_manifest(directory: str | Path, fields: dict[str, Any]) -> dict:
    manifest = dict(fields)
    manifest["complete"] = True
    manifest.setdefault("written_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


@contextlib.contextmanager
def dir_lock(directory: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive advisory lock on ``<directory>.lock`` (flock: released if the process dies)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = directory.parent / f"{directory.name}.lock"
    with open(lock_path, "a+") as f:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"{directory} is locked by another run for over {timeout_s} s") from None
                time.sleep(0.5)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{socket.gethostname()}:{os.getpid()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ run a stage
def run_stage(
    stage: str,
    workdir: str | Path,
    config: Any,
    inputs: dict[str, str] | None,
    version: str,
    build: Callable[[Path], dict[str, Any]],
    *,
    key_extra: Any = None,
) -> dict[str, Any]:
    """Run ``build`` into the stage directory unless a complete output exists.

    ``build(dir)`` returns the manifest fields (``files`` maps relative paths to metadata; ``summary``
    holds headline numbers). Returns a small dict: stage, key, dir, cached, summary, manifest path.
    ``key_extra`` joins the key without being part of the recorded config (e.g. source fingerprints).
    """
    key = compute_key(stage, config, inputs, version, key_extra)
    out = stage_dir(workdir, stage, key)

    def result(manifest: dict, cached: bool) -> dict[str, Any]:
        return {
            "stage": stage, "key": key, "dir": str(out), "cached": cached,
            "summary": manifest.get("summary", {}), "manifest": str(out / MANIFEST),
        }

    manifest = read_manifest(out, key)
    if manifest is not None:
        return result(manifest, cached=True)
    with dir_lock(out):
        manifest = read_manifest(out, key)  # another run may have finished while we waited
        if manifest is not None:
            return result(manifest, cached=True)
        out.mkdir(parents=True, exist_ok=True)
        remove_temp_files(out)
        started = time.time()
        fields = build(out) or {}
        fields = {
            "stage": stage, "key": key, "version": version,
            "config": json.loads(canonical_json(config)), "inputs": inputs or {},
            **fields,
            "timing": {"started": started, "seconds": round(time.time() - started, 3)},
            "code_version": code_version(), "host": platform.node(),
        }
        manifest = write_manifest(out, fields)
    return result(manifest, cached=False)


def find_complete(workdir: str | Path, stage: str) -> list[Path]:
    """Complete output directories of a stage, newest manifest first."""
    root = Path(workdir) / stage
    dirs = [d for d in root.glob("*") if d.is_dir() and read_manifest(d) is not None]
    return sorted(dirs, key=lambda d: (d / MANIFEST).stat().st_mtime, reverse=True)
