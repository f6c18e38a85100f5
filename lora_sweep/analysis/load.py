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
from lora_sweep.records import SCHEMA_VERSION

MIB = 2**20
IN_MEMORY_ONLY = ["examples", "tune_curve"]  # per-example outputs: for the paired tests, not for export


def _tune_curve(record: dict[str, Any]) -> dict[str, Any] | None:
    """The tuning split's learning curve with what pairs it example by example: its labels and ids."""
    tune = (record.get("examples") or {}).get("tune") or {}
    if not record.get("tune_curve"):
        return None
    return {"ids": tune.get("ids"), "labels": tune.get("labels"), "points": record["tune_curve"]}


def _row(record: dict[str, Any]) -> dict[str, Any]:
    config = record.get("config") or {}
    train = config.get("train") or {}
    memory = record.get("memory") or {}
    split = memory.get("split_bytes") or {}
    times = record.get("time") or {}
    params = record.get("params") or {}
    targets = record.get("targets")
    budget = record.get("budget") or {}
    environment = record.get("environment") or {}
    forgetting = record.get("forgetting") or {}
    label = targets if isinstance(targets, str) or targets is None else ",".join(targets)
    if record.get("rank_pattern"):  # its own series: never a learning-rate variant of the uniform rank
        label = f"{label}, rank_pattern {record.get('rank_pattern_source')}"
    row = {
        "run_id": record["run_id"],
        "config_id": record["config_id"],
        "context_id": record["context_id"],
        "status": record["status"],
        "error": record.get("error"),
        "diverged_at_step": record.get("diverged_at_step"),
        "task": record["task"],
        "task_family": record.get("task_family"),
        "model": record["model"],
        "method": record["method"],
        "r": record.get("r"),
        "alpha": record.get("alpha"),
        "alpha_policy": record.get("alpha_policy"),
        "scaling": record.get("scaling"),
        "targets": label,
        "rank_pattern": bool(record.get("rank_pattern")),
        "seed": record.get("seed"),
        "lr": record.get("lr"),
        "baseline_run_id": record.get("baseline_run_id"),
        "max_steps": train.get("max_steps"),
        "batch_size": train.get("batch_size"),
        "max_seq_len": train.get("max_seq_len"),
        "batching": train.get("batching") or ("grouped" if train.get("group_by_length") else "random"),  # schema 2 named it group_by_length
        "batching_free_id": identity.batching_free_id(record["identity"]) if record.get("identity") else None,
        "micro_batches": record.get("micro_batches"),
        "primary_metric": record.get("primary_metric"),
        "primary_value": record.get("primary_value"),
        "tune_value": record.get("tune_value"),
        "initial_loss": budget.get("initial_loss"),
        "final_loss": budget.get("final_loss"),
        "loss_slope": budget.get("slope_per_100_steps"),
        "loss_slope_se": budget.get("slope_se"),
        "still_improving": budget.get("still_improving"),
        "train_padding": ((record.get("tokens") or {}).get("train") or {}).get("padding_fraction"),
        "params_total": params.get("total"),
        "params_trainable": params.get("trainable"),
        "params_adapter": params.get("adapter"),
        "params_head": params.get("head"),
        "device": memory.get("device"),
        "peak_mib": memory["peak_bytes"] / MIB if memory.get("peak_bytes") else None,
        "cuda_max_allocated_mib": memory["cuda_max_allocated_bytes"] / MIB if memory.get("cuda_max_allocated_bytes") else None,
        "train_s": times.get("train_s"),
        "eval_s": times.get("eval_s"),
        "data_prep_s": times.get("data_prep_s"),
        "samples_per_s": times.get("samples_per_s"),
        "tokens_per_s": times.get("tokens_per_s"),
        "artifact_bytes": (record.get("artifact") or {}).get("bytes"),
        "loss_curve": json.dumps(record.get("loss_curve") or []),
        "versions": json.dumps(environment.get("packages") or {}, sort_keys=True),
        "git_commit": environment.get("git_commit"),
        "grad_after_backward_mib": memory["grad_bytes_after_backward"] / MIB if memory.get("grad_bytes_after_backward") else None,
        "examples": (record.get("examples") or {}).get("dev"),
        "tune_curve": _tune_curve(record),
        "curve_eval_s": times.get("curve_eval_s"),
        "finished_at": record.get("finished_at"),
        "forgetting": forgetting.get("forgetting"),  # lora_sweep.forgetting: positive = worse after training
        "forgetting_probe": forgetting.get("probe"),
        "forgetting_before": forgetting.get("before"),
    }
    info = metric_info(record.get("primary_metric") or "")
    row.update(higher_is_better=info.higher_is_better, primary_scale=info.scale, primary_unit=info.unit)
    row.update({f"mem_{k}_mib": v / MIB for k, v in split.items()})
    row.update({f"metric_{k}": v for k, v in (record.get("metrics") or {}).items()})
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
            rows.append(_row(record))
    for note in skipped:
        print(f"warning: skipped {note}", file=sys.stderr)
    if not rows:
        raise UserError(f"no readable run records in {folder}" + (f" ({len(skipped)} skipped, listed above)" if skipped else ""))
    return pd.DataFrame(rows), skipped
