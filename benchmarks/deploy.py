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

from lora_sweep import deploy, experiment, records, runtime


def show(name: str, summary: dict[str, float], fmt: str = ".3f") -> None:
    print(f"  {name:<44s} {summary['median']:{fmt}}  [{100 * summary['coverage']:.0f} % interval for the median "
          f"{summary['low']:{fmt}}-{summary['high']:{fmt}}; min-max {summary['min']:{fmt}}-{summary['max']:{fmt}}; {summary['n']} repeats]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results")
    parser.add_argument("--run", default=None, help="LoRA run id (default: as lora-deploy chooses)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats of every timing (default 9)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: all cores)")
    args = parser.parse_args()
    runs_dir = Path(args.results_dir) / "runs"
    torch.set_num_threads(runtime.resolve_threads(args.threads))
    rid, why = (args.run, "requested") if args.run else deploy.default_run(runs_dir)
    all_records = [r for r in (records.read_record(runs_dir, p.stem) for p in sorted(runs_dir.glob("*.json"))) if r]
    record = records.read_record(runs_dir, rid)
    baseline = records.read_record(runs_dir, record["baseline_run_id"]) or {}
    if not (records.artifact_dir(record, runs_dir) and records.artifact_dir(baseline, runs_dir)):
        sys.exit(f"error: run {rid}'s adapter or its full-FT checkpoint is not on disk; run its sweep first")
    start = time.perf_counter()
    print(f"deployment of {rid} ({why}), {args.repeats} repeats, {torch.get_num_threads()} threads, CPU {common.cpu_name()} "
          f"(compare only within this run)", flush=True)
    d = deploy.measure(record, runs_dir, all_records, why, args.repeats, ".cache/lora_sweep")
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
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
