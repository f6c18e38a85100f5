"""Run records: one JSON file per run, named by its run id (lora_sweep.identity).

Writes are atomic (temporary file, fsync, rename) so a reader never sees a torn record and a run
killed mid-way leaves no `done` record. A per-run file lock (flock, which the OS releases when a
process dies, even by SIGKILL) keeps parallel jobs and separate sweeps from running one experiment
twice. A record that is replaced (rerun=true, or a failed run retried) is kept under `history/`;
a file that is not a record (damaged on disk, or edited) is moved to `corrupt/` and its run runs again.
A failed run's traceback goes to `logs/<run_id>.log`; the record keeps one line.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from lora_sweep.files import follow_umask

SCHEMA_VERSION = 2  # 2: identity of lora_sweep.identity, per-example outputs, tuning split, token counts
STATUSES = ("done", "failed", "diverged")
REQUIRED = ("run_id", "status", "task", "model", "method")  # the fields every reader of a record of any schema relies on
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "lora-sweep")


def record_path(results_dir: str | Path, rid: str) -> Path:
    return Path(results_dir) / f"{rid}.json"


class DamagedRecord(Exception):
    """A file where a run's record should be that is not one; it has been moved to corrupt/."""


def _damage(record: Any, rid: str) -> str | None:
    """Why `record` is not the record of run `rid`, or None if it is."""
    if not isinstance(record, dict):
        return f"holds {json.dumps(record)[:40]} instead of a record"
    missing = [key for key in REQUIRED if not isinstance(record.get(key), str)]
    if missing:
        return f"lacks {', '.join(missing)}"
    if record["run_id"] != rid:
        return f"holds run {record['run_id']}, not {rid}"
    return None if record["status"] in STATUSES else f"has the unknown status {record['status']!r}"


def load(path: Path) -> dict[str, Any] | None:
    """The record in `path`, or None if there is none. A damaged file (torn, not JSON, not this run's record) is
    moved to corrupt/ beside it, so its run counts as not done, and DamagedRecord says which file and why."""
    try:
        with open(path, "rb") as handle:
            raw, inode = handle.read(), os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw)
    except ValueError as exc:  # not UTF-8, or not (complete) JSON
        damage = f"is not JSON ({exc})"
    else:
        damage = _damage(record, path.stem)
        if damage is None:
            return record
    try:
        if os.stat(path).st_ino != inode:  # a writer replaced it since: read the new one
            return load(path)
        moved = _move_aside(path, "corrupt")
    except FileNotFoundError:  # another reader moved it first
        return None
    raise DamagedRecord(f"{path.name} {damage}; moved to corrupt/{moved.name}")


def read_record(results_dir: str | Path, rid: str) -> dict[str, Any] | None:
    """The record of run `rid`, or None if it has none; a damaged one is moved aside with a warning, and the run runs again."""
    try:
        return load(record_path(results_dir, rid))
    except DamagedRecord as exc:
        print(f"warning: in {results_dir}, {exc}; its run counts as not done", file=sys.stderr)
        return None


def _move_aside(path: Path, folder: str) -> Path:
    """Move a record into `folder` beside it, under a name no other move can take."""
    target = path.parent / folder / f"{path.stem}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:8]}.json"
    target.parent.mkdir(exist_ok=True)
    os.replace(path, target)
    return target


def write_record(results_dir: str | Path, record: dict[str, Any]) -> Path:
    """Atomically write `record` as <run_id>.json, moving any earlier record for that id to history/."""
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = record_path(folder, record["run_id"])
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{record['run_id']}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=2, sort_keys=False, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        follow_umask(tmp)
        if path.exists():
            _move_aside(path, "history")
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk, say: leave no temporary file behind
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not exc.filename:  # a write or fsync names no file: name the folder it failed in
            exc.filename = str(folder)
        raise
    return path


def write_log(results_dir: str | Path, rid: str, text: str) -> str:
    """Append a failed run's traceback to logs/<run_id>.log beside its record; the path as the record holds it."""
    folder = Path(results_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{rid}.log", "a") as handle:
        handle.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n{text}")
    return f"logs/{rid}.log"


def portable(path: str | Path | None, results_dir: str | Path) -> str | None:
    """`path` as a record holds it: relative to the record's folder, so a record names no user's folders and moves with them."""
    if path is None:
        return None
    return os.path.relpath(Path(path).expanduser().resolve(), Path(results_dir).expanduser().resolve())


def portable_model(name_or_path: str, results_dir: str | Path) -> str:
    """model.name_or_path as a record keeps it: a local folder relative to the record's folder, written ./ or ../
    so it never reads as a hub id (run_settings turns it back); a hub id or a package's model as given."""
    if not Path(name_or_path).expanduser().is_dir():
        return name_or_path
    relative = portable(name_or_path, results_dir)
    return relative if Path(relative).parts[0] == ".." else f"./{relative}"


@contextmanager
def run_lock(results_dir: str | Path, rid: str) -> Iterator[None]:
    """Exclusive lock on one run id across processes (and hosts, where the file system supports flock)."""
    locks = Path(results_dir) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{rid}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process runs it: say why this one sits still, then wait for its record
            print(f"[lora-sweep] waiting for {locks.name}/{rid}.lock in {results_dir}: another process is running {rid}", flush=True)
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
        "git_commit": _git_commit(),
    }


def artifact_dir(record: dict[str, Any], runs_dir: Path) -> Path | None:
    """The run's saved adapter or model folder, or None where it is not on disk (artifacts are not committed)."""
    path = (record.get("artifact") or {}).get("path")
    return runs_dir / path if path and (runs_dir / path).is_dir() else None


def run_settings(record: dict[str, Any], runs_dir: Path, cache_dir: str | None = None):
    """The run's settings from its record, its folders made absolute (a record keeps them relative to its own folder);
    the token cache and converted models from `cache_dir` when given (a command's own), else the run's."""
    import copy

    from omegaconf import OmegaConf

    from lora_sweep import settings  # here, not at the top: settings pulls in Hydra, which reading records does not need

    config = copy.deepcopy(record["config"])
    config.update(results_dir=str(runs_dir), artifacts_dir=str(runs_dir / config["artifacts_dir"]),
                  cache_dir=cache_dir or str((runs_dir / config["cache_dir"]).resolve()))
    if config["task"]["data_dir"]:
        config["task"]["data_dir"] = str(runs_dir / config["task"]["data_dir"])
    if config["model"]["name_or_path"].startswith(("./", "../")):  # a local folder (portable_model)
        config["model"]["name_or_path"] = str(runs_dir / config["model"]["name_or_path"])
    return settings.from_config(OmegaConf.create(config), strict=False)
