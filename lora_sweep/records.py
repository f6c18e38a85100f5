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
from typing import Any, Iterator, TypedDict

from lora_sweep.files import follow_umask

SCHEMA_VERSION = 2  # 2: identity of lora_sweep.identity, per-example outputs, tuning split, token counts
STATUSES = ("done", "failed", "diverged")
REQUIRED = ("run_id", "status", "task", "model", "method")  # the fields every reader of a record of any schema relies on
RUNS = "runs"  # a results folder's runs folder: the report, tables and plots go beside it
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "lora-sweep")


class Params(TypedDict):
    total: int  # parameters of the base model
    trainable: int
    adapter: int  # LoRA A/B matrices (and DoRA magnitudes; AdaLoRA's singular values): what is trained
    head: int  # task head parameters that are trained
    kept: int | None  # adapters: Σ rank × (d + k) over the final ranks (an allocator's choice as plain LoRA); absent before it existed


class LossTrend(TypedDict):
    initial_loss: float | None
    final_loss: float | None  # mean over the last steps
    tail_steps: int  # the last quarter of training, over which the slope is fitted
    slope_per_100_steps: float | None
    slope_se: float | None
    still_improving: bool | None  # the slope's 95% interval lies below zero: the budget may limit the result


class Memory(TypedDict, total=False):
    device: str
    peak_bytes: int | None  # the probe's peak of live tensor bytes (lora_sweep.memory)
    split_bytes: dict[str, int] | None  # weights, gradients, optimizer, activations, other: at the peak
    grad_bytes_after_backward: int | None
    cuda_max_allocated_bytes: int | None
    cuda_max_reserved_bytes: int | None
    per_process_peak_bytes: list[int]  # only with several processes; the fields above are the highest process's
    init_peak_bytes: int  # only with init=eva: the probe's peak over EVA's data pass (its first SVD update and its costliest batch's)


class Processes(TypedDict):
    mode: str  # train.distributed
    world_size: int
    per_process_batch: int
    grad_accum: int
    global_batch: int


class TokenCount(TypedDict):
    real_tokens: int
    computed_tokens: int  # padding included
    padding_fraction: float


class SplitOutputs(TypedDict):
    ids: list[int]  # the examples' ids in the task's source: what pairs two runs example by example
    labels: list | None
    outputs: list  # one per example (lora_sweep.task_family.TaskFamily.batch_outputs)


class CurvePoint(TypedDict):
    step: int
    metrics: dict[str, float]  # on the tuning split
    outputs: list


class Times(TypedDict, total=False):
    data_prep_s: float
    data_from_cache: bool
    train_s: float
    steps: int
    samples_per_s: float | None
    tokens_per_s: float | None  # real (not padding) tokens
    computed_tokens_per_s: float | None
    eval_s: float  # the final evaluation; absent for a diverged run
    curve_eval_s: float  # the learning curve's checkpoints
    init_s: float  # only with init=eva: EVA's data pass before training, part of the run's cost


class Artifact(TypedDict):
    path: str  # relative to the record's folder
    bytes: int


class Environment(TypedDict):
    python: str
    packages: dict[str, str | None]  # PACKAGES' versions
    device: str
    threads: int
    git_commit: str | None  # with "-dirty" when tracked files had changes


class RunRecord(TypedDict, total=False):
    """One run's record, as written (experiment.execute) and as every reader gets it (read_fields).

    The first block is known before training and is in every record; the second is what training measured and is
    absent from a run that failed before it (read_fields gives those fields as None)."""

    schema_version: int
    run_id: str  # lora_sweep.identity.run_id: the experiment's identity, hashed
    config_id: str  # the identity without the seed
    context_id: str  # the identity without the method: what a LoRA run and its baseline share
    sweep: str | None  # the sweep that last attempted it (sweep.sweep_token)
    status: str  # running (never on disk), done, failed, diverged
    error: str | None  # one line
    diverged_at_step: int | None
    started_at: str
    model: str  # the model preset's name
    model_name_or_path: str  # records.portable_model
    task: str
    task_family: str
    data_source: str
    method: str  # lora | adalora | full
    r: int | None
    alpha: float | None  # the effective alpha
    alpha_policy: str | None
    scaling: str | None  # e.g. "alpha=16", "alpha=2r", "rsLoRA"
    targets: str | list[str] | None  # a preset's name or module names
    match_budget: str | None
    rank_pattern: dict[str, int] | None  # every adapted module's rank, where not all are `r`
    rank_pattern_source: str | None  # a preset's name, a file's stem, or "inline"
    allocated_ranks: dict[str, int] | None  # AdaLoRA (at the end) and EVA (after its pass): each target module's rank, 0 = dropped
    lr: float
    seed: int
    baseline_run_id: str | None
    baseline_status: str | None
    identity: dict[str, Any]  # lora_sweep.identity.experiment_identity
    config: dict[str, Any]  # the settings, folders relative to the record (run_settings reads them back)
    environment: Environment

    adapted_modules: list[str]
    params: Params
    loss_curve: list[list[float]]  # [step, loss] at each logging step
    budget: LossTrend
    memory: Memory
    processes: Processes
    train_examples: int
    tune_examples: int
    eval_examples: int
    tokens: dict[str, TokenCount]  # train, tune, dev
    micro_batches: int
    metrics: dict[str, float]  # on the eval split
    primary_metric: str
    primary_value: float
    tune_metrics: dict[str, float]
    tune_value: float
    examples: dict[str, SplitOutputs]  # dev and tune
    tune_curve: list[CurvePoint]  # the tuning split at train.curve_points and at the end
    time: Times
    forgetting: dict[str, Any]  # lora_sweep.forgetting.Probe.measure
    artifact: Artifact | None  # the saved adapter or model; None when train.save_adapter=false
    log: str  # a failed run's traceback, relative to the record
    finished_at: str


FIELDS = tuple(RunRecord.__annotations__)


class UnknownFields(ValueError):
    """A record holding fields this version does not know: written by another version of lora-sweep."""


def read_fields(raw: dict[str, Any]) -> RunRecord:
    """`raw` (a record of this schema, as read from disk) with every field of RunRecord present, None where the run
    did not reach it: readers index fields instead of guessing. A field this version does not define is refused."""
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise UnknownFields(f"holds fields this version does not define ({', '.join(unknown)})")
    return {**dict.fromkeys(FIELDS), **raw}  # type: ignore[return-value]


def record_path(runs_dir: str | Path, rid: str) -> Path:
    return Path(runs_dir) / f"{rid}.json"


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


def read_record(runs_dir: str | Path, rid: str) -> dict[str, Any] | None:
    """The record of run `rid`, or None if it has none; a damaged one is moved aside with a warning, and the run runs again."""
    try:
        return load(record_path(runs_dir, rid))
    except DamagedRecord as exc:
        print(f"warning: in {runs_dir}, {exc}; its run counts as not done", file=sys.stderr)
        return None


def _move_aside(path: Path, folder: str) -> Path:
    """Move a record into `folder` beside it, under a name no other move can take."""
    target = path.parent / folder / f"{path.stem}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:8]}.json"
    target.parent.mkdir(exist_ok=True)
    os.replace(path, target)
    return target


def write_record(runs_dir: str | Path, record: dict[str, Any]) -> Path:
    """Atomically write `record` as <run_id>.json, moving any earlier record for that id to history/."""
    folder = Path(runs_dir)
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


def write_log(runs_dir: str | Path, rid: str, text: str) -> str:
    """Append a failed run's traceback to logs/<run_id>.log beside its record; the path as the record holds it."""
    folder = Path(runs_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{rid}.log", "a") as handle:
        handle.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n{text}")
    return f"logs/{rid}.log"


def portable(path: str | Path | None, runs_dir: str | Path) -> str | None:
    """`path` as a record holds it: relative to the record's folder, so a record names no user's folders and moves with them."""
    if path is None:
        return None
    return os.path.relpath(Path(path).expanduser().resolve(), Path(runs_dir).expanduser().resolve())


def portable_model(name_or_path: str, runs_dir: str | Path) -> str:
    """model.name_or_path as a record keeps it: a local folder relative to the record's folder, written ./ or ../
    so it never reads as a hub id (run_settings turns it back); a hub id or a package's model as given."""
    if not Path(name_or_path).expanduser().is_dir():
        return name_or_path
    relative = portable(name_or_path, runs_dir)
    return relative if Path(relative).parts[0] == ".." else f"./{relative}"


@contextmanager
def run_lock(runs_dir: str | Path, rid: str) -> Iterator[None]:
    """Exclusive lock on one run id across processes (and hosts, where the file system supports flock)."""
    locks = Path(runs_dir) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{rid}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process runs it: say why this one sits still, then wait for its record
            print(f"[lora-sweep] waiting for {locks.name}/{rid}.lock in {runs_dir}: another process is running {rid}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _git_commit() -> str | None:
    """The code's commit, with "-dirty" when tracked files other than the committed results (outputs, which a fresh
    run of the main job replaces) have changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
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


def runs_folder(folder: str | Path) -> Path:
    """The runs folder a command was pointed at: `folder` itself when it is one (named runs/, or holding records
    and no runs/), else its runs/ subfolder (a results folder, as `lora-analyze results`)."""
    folder = Path(folder)
    if folder.name == RUNS or (not (folder / RUNS).is_dir() and any(folder.glob("*.json"))):
        return folder
    return folder / RUNS


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
    config.pop("results_dir", None)  # records of before runs_dir held the runs folder under this name
    config.update(runs_dir=str(runs_dir), artifacts_dir=str(runs_dir / config["artifacts_dir"]),
                  cache_dir=cache_dir or str((runs_dir / config["cache_dir"]).resolve()))
    for key in ("data_dir", "train_file", "eval_file"):
        if config["task"].get(key):
            config["task"][key] = str(runs_dir / config["task"][key])
    if config["model"]["name_or_path"].startswith(("./", "../")):  # a local folder (portable_model)
        config["model"]["name_or_path"] = str(runs_dir / config["model"]["name_or_path"])
    return settings.from_config(OmegaConf.create(config), strict=False)
