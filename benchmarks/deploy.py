"""Deployment ratios side by side in one process: merged / base latency, adapter swap / checkpoint load, mixed batch
on one base / N merged models (lora_sweep.deploy measures them; this prints them and writes no record).

    .venv/bin/python benchmarks/deploy.py [RESULTS_DIR] [--run RUN_ID] [--repeats 9] [--threads 0]

Needs the run's saved adapter and its full-FT checkpoint (results/runs/artifacts/, written by the sweep).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import common

from lora_sweep import deploy, records, runtime
from lora_sweep.analysis import analyse
from lora_sweep.analysis.load import load_records
from lora_sweep.errors import UserError
from lora_sweep.records import RunRecord


def show(name: str, summary: dict[str, float], fmt: str = ".3f") -> None:
    print(f"  {name:<44s} {summary['median']:{fmt}}  [{100 * summary['coverage']:.0f} % interval for the median "
          f"{summary['low']:{fmt}}-{summary['high']:{fmt}}; min-max {summary['min']:{fmt}}-{summary['max']:{fmt}}; {summary['n']} repeats]")


def chosen_run(runs_dir: Path, run: str | None) -> tuple[str, str, RunRecord, list[RunRecord]]:
    """The LoRA run to deploy (as lora-deploy chooses unless `run` names one), why, its record and every record; exits
    when it has no finished record, or its adapter or its baseline's checkpoint is not on disk (nothing to measure)."""
    try:
        rid, why = (run, "requested") if run else deploy.default_run(analyse(*load_records(runs_dir)), runs_dir)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    all_records = [records.read_fields(r) for r in (records.read_record(runs_dir, p.stem) for p in sorted(runs_dir.glob("*.json"))) if r]
    record = next((r for r in all_records if r["run_id"] == rid), None)
    if record is None or record["method"] != "lora" or record["status"] != "done":
        sys.exit(f"error: no finished LoRA run {rid} in {runs_dir}")
    baseline = next((r for r in all_records if r["run_id"] == record["baseline_run_id"]), {})
    if not (records.artifact_dir(record, runs_dir) and records.artifact_dir(baseline, runs_dir)):
        sys.exit(f"error: run {rid}'s adapter or its full-FT checkpoint is not on disk; run its sweep first")
    return rid, why, record, all_records


def report(d: dict) -> None:
    """Every ratio lora_sweep.deploy measured, with its interval, and the sizes on disk and in memory."""
    merge = d["merge"]
    print(f"merge: max |merged - unmerged| over {merge['examples']} eval examples {merge['max_abs_diff']:.1e}; "
          f"{merge['metric']} {merge['before']:.4f} -> {merge['after']:.4f}")
    for size in ("batch_1", "batch_32"):
        show(f"latency merged / base, {size}", d["latency"][size]["merged/base"])
        show(f"latency unmerged / base, {size}", d["latency"][size]["unmerged/base"])
    if d["swap"]:
        show("adapter swap / checkpoint load, warm", d["swap"]["swap/checkpoint (warm)"])
        show("adapter swap / checkpoint load, cold", d["swap"]["swap/checkpoint (cold)"])
        for name, seconds in d["swap"]["seconds"].items():
            show(f"{name}, s", seconds, ".4f")
        print(f"  hotswap: {d['swap']['hotswap']}")
    print(f"  size on disk: adapter {d['adapter_bytes']:,} B, full-FT checkpoint {d['checkpoint_bytes']:,} B "
          f"({d['adapter_bytes'] / d['checkpoint_bytes']:.2%})")
    for many in d["many"]:
        show(f"N={many['n']}: mixed batch / N merged models, time", many["mixed/merged time"])
        mixed, merged = many["tensor_bytes"]["mixed batch"], many["tensor_bytes"]["merged models"]
        print(f"  N={many['n']}: examples/s mixed {many['examples_per_s']['mixed batch']['median']:.0f}, merged "
              f"{many['examples_per_s']['merged models']['median']:.0f}; tensor MiB mixed {mixed / 2**20:.0f}, merged {merged / 2**20:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results")
    parser.add_argument("--run", default=None, help="LoRA run id (default: as lora-deploy chooses)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats of every timing (default 9)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: all cores)")
    args = parser.parse_args()
    runs_dir = Path(args.results_dir) / "runs"
    torch.set_num_threads(runtime.resolve_threads(args.threads))
    rid, why, record, all_records = chosen_run(runs_dir, args.run)
    start = time.perf_counter()
    print(f"deployment of {rid} ({why}), {args.repeats} repeats, {torch.get_num_threads()} threads, CPU {common.cpu_name()} "
          f"(compare only within this run)", flush=True)
    report(deploy.measure(record, runs_dir, all_records, why, args.repeats, ".cache/lora_sweep"))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
