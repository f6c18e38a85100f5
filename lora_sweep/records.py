"""Run records: one JSON file per run, named by its run id (lora_sweep.identity).

Writes are atomic (temporary file, fsync, rename) so a reader never sees a torn record and a run
killed mid-way leaves no `done` record. A per-run file lock (flock, which the OS releases when a
process dies, even by SIGKILL) keeps parallel jobs and separate sweeps from running one experiment
twice. A record that is replaced (rerun=true, or a failed run retried) is kept under `history/`.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 2  # 2: identity of lora_sweep.identity, per-example outputs, tuning split, token counts
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "lora-sweep")


def record_path(results_dir: str | Path, rid: str) -> Path:
    return Path(results_dir) / f"{rid}.json"


def read_record(results_dir: str | Path, rid: str) -> dict[str, Any] | None:
    path = record_path(results_dir, rid)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_record(results_dir: str | Path, record: dict[str, Any]) -> Path:
    """Atomically write `record` as <run_id>.json, moving any earlier record for that id to history/."""
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = record_path(folder, record["run_id"])
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{record['run_id']}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle, indent=2, sort_keys=False, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    if path.exists():
        history = folder / "history"
        history.mkdir(exist_ok=True)
        os.replace(path, history / f"{record['run_id']}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}.json")
    os.replace(tmp, path)
    return path


@contextmanager
def run_lock(results_dir: str | Path, rid: str) -> Iterator[None]:
    """Exclusive lock on one run id across processes (and hosts, where the file system supports flock)."""
    locks = Path(results_dir) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{rid}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def environment(device_name: str, threads: int) -> dict[str, Any]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "packages": versions,
        "device": device_name,
        "threads": threads,
        "host": platform.node(),
        "git_commit": _git_commit(),
    }
