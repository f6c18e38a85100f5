"""Run records -> one tidy pandas DataFrame, a row per run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from lora_sweep import identity, records
from lora_sweep.errors import UserError
from lora_sweep.metrics import metric_info
from lora_sweep.records import SCHEMA_VERSION, RunRecord

MIB = 2**20
IN_MEMORY_ONLY = ["examples", "tune_curve", "module_ranks"]  # per-example outputs and per-module ranks: not for export


def _tune_curve(record: RunRecord) -> dict[str, Any] | None:
    """The tuning split's learning curve with what pairs it example by example: its labels and ids."""
    if not record["tune_curve"]:
        return None
    tune = (record["examples"] or {}).get("tune") or {}
    return {"ids": tune.get("ids"), "labels": tune.get("labels"), "points": record["tune_curve"]}


def _base_targets(record: RunRecord) -> str | None:
    """The targets preset or module names, as one label."""
    targets = record["targets"]
    return targets if isinstance(targets, str) or targets is None else ",".join(targets)


def _allocator(record: RunRecord) -> str | None:
    """Who chose each module's rank: adalora or eva (during or before training), `rank_pattern <name>` (given up front,
    such as the rank advisor's), or uniform; None for full FT."""
    if record["method"] == "full":
        return None
    if record["method"] == "adalora":
        return "adalora"
    if str(((record["config"] or {}).get("method") or {}).get("init", "")).lower() == "eva":
        return "eva"
    return f"rank_pattern {record['rank_pattern_source']}" if record["rank_pattern"] else "uniform"


def _targets(record: RunRecord) -> str | None:
    """The series a LoRA run belongs to: its targets, and who allocated its ranks where not uniform (never a
    learning-rate variant of the uniform rank)."""
    allocator = _allocator(record)
    return _base_targets(record) if allocator in (None, "uniform") else f"{_base_targets(record)}, {allocator}"


def _module_ranks(record: RunRecord) -> dict[str, int] | None:
    """Each adapted module's rank as trained to the end: an allocator's final choice, a rank pattern, or r everywhere."""
    if record["method"] == "full" or not record["adapted_modules"]:
        return None
    return record["allocated_ranks"] or {m: (record["rank_pattern"] or {}).get(m, record["r"]) for m in record["adapted_modules"]}


def _described(record: RunRecord) -> dict[str, Any]:
    """What the run is: its identity's parts and the settings the tables group and label by."""
    train = record["config"]["train"] if record["config"] else {}
    return {
        **{key: record[key] for key in ("run_id", "config_id", "context_id", "status", "error", "diverged_at_step", "task",
                                        "task_family", "model", "method", "r", "alpha", "alpha_policy", "scaling")},
        "targets": _targets(record),
        "base_targets": _base_targets(record),
        "allocator": _allocator(record),
        "rank_pattern": record["rank_pattern_source"] if record["rank_pattern"] else None,
        **{key: record[key] for key in ("seed", "lr", "baseline_run_id")},
        **{key: train.get(key) for key in ("max_steps", "batch_size", "max_seq_len")},
        "batching": train.get("batching") or ("grouped" if train.get("group_by_length") else "random"),  # schema 2 named it group_by_length
        "batching_free_id": identity.batching_free_id(record["identity"]) if record["identity"] else None,
        "micro_batches": record["micro_batches"],
    }


def _measured(record: RunRecord) -> dict[str, Any]:
    """What the run measured, in the tables' units (MiB, seconds); None where it did not get that far."""
    memory, times, params = record["memory"] or {}, record["time"] or {}, record["params"] or {}
    budget, forgetting, environment = record["budget"] or {}, record["forgetting"] or {}, record["environment"] or {}

    def mib(value: int | None) -> float | None:
        return value / MIB if value else None

    return {
        "primary_metric": record["primary_metric"], "primary_value": record["primary_value"], "tune_value": record["tune_value"],
        "initial_loss": budget.get("initial_loss"), "final_loss": budget.get("final_loss"),
        "loss_slope": budget.get("slope_per_100_steps"), "loss_slope_se": budget.get("slope_se"),
        "still_improving": budget.get("still_improving"),
        "train_padding": ((record["tokens"] or {}).get("train") or {}).get("padding_fraction"),
        **{f"params_{key}": params.get(key) for key in ("total", "trainable", "adapter", "head", "kept")},
        "module_ranks": _module_ranks(record),
        "init_s": times.get("init_s"), "init_peak_mib": mib(memory.get("init_peak_bytes")),
        "device": memory.get("device"), "peak_mib": mib(memory.get("peak_bytes")),
        "cuda_max_allocated_mib": mib(memory.get("cuda_max_allocated_bytes")),
        **{key: times.get(key) for key in ("train_s", "eval_s", "data_prep_s", "samples_per_s", "tokens_per_s")},
        "artifact_bytes": (record["artifact"] or {}).get("bytes"),
        "loss_curve": json.dumps(record["loss_curve"] or []),
        "versions": json.dumps(environment.get("packages") or {}, sort_keys=True),
        "git_commit": environment.get("git_commit"),
        "grad_after_backward_mib": mib(memory.get("grad_bytes_after_backward")),
        "examples": (record["examples"] or {}).get("dev"),
        "tune_curve": _tune_curve(record),
        "curve_eval_s": times.get("curve_eval_s"),
        "finished_at": record["finished_at"],
        "forgetting": forgetting.get("forgetting"),  # lora_sweep.forgetting: positive = worse after training
        "forgetting_probe": forgetting.get("probe"),
        "forgetting_before": forgetting.get("before"),
    }


def _row(record: RunRecord) -> dict[str, Any]:
    """One run as a row of the runs table: what it is, what it measured, its metric's display facts, every metric
    and the memory split."""
    row = {**_described(record), **_measured(record)}
    info = metric_info(record["primary_metric"] or "")
    row.update(higher_is_better=info.higher_is_better, primary_scale=info.scale, primary_unit=info.unit)
    row.update({f"mem_{k}_mib": v / MIB for k, v in ((record["memory"] or {}).get("split_bytes") or {}).items()})
    row.update({f"metric_{k}": v for k, v in (record["metrics"] or {}).items()})
    return row


def load_records(records_dir: str | Path, run_ids: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """All readable records of a folder (or just `run_ids`) as a DataFrame, and a note for each file skipped (also
    printed: a damaged record is moved to corrupt/ and the analysis carries on without it)."""
    folder = Path(records_dir)
    if not folder.is_dir():
        raise UserError(f"no results folder at {folder}; run a sweep first (e.g. `lora-sweep +sweep=quick`)")
    paths = [folder / f"{rid}.json" for rid in run_ids] if run_ids is not None else sorted(folder.glob("*.json"))
    rows, skipped = [], []
    for path in paths:
        try:
            record = records.load(path)
        except records.DamagedRecord as exc:
            skipped.append(str(exc))
            continue
        except OSError as exc:
            skipped.append(f"{path.name}: unreadable ({exc.strerror or type(exc).__name__})")
            continue
        if record is None:
            skipped.append(f"{path.name}: no such file")
        elif record.get("schema_version") != SCHEMA_VERSION:
            skipped.append(f"{path.name}: schema version {record.get('schema_version')}, this analysis reads version {SCHEMA_VERSION}")
        else:
            try:
                rows.append(_row(records.read_fields(record)))
            except records.UnknownFields as exc:
                skipped.append(f"{path.name}: {exc}; written by another version of lora-sweep")
    for note in skipped:
        print(f"warning: skipped {note}", file=sys.stderr)
    if not rows:
        raise UserError(f"no readable run records in {folder}" + (f" ({len(skipped)} skipped, listed above)" if skipped else ""))
    return pd.DataFrame(rows), skipped
