"""`lora-deploy RESULTS_DIR`: what a saved LoRA adapter promises at deployment, measured on real eval batches (CPU).

For each measured LoRA run (default: the rank the analysis recommends, else the rank with the best estimate, seed 0)
one record `<RESULTS_DIR>/deploy/<run_id>.json` holds:
- merge: the largest |merged - unmerged| output over the whole eval split (fp32) and the metric before and after;
- latency: base model (no adapter) / unmerged adapter / merged model, at batch 1 and 32, ratios to base;
- swap: switching a loaded model to another run's adapter (PEFT load_adapter + set_adapter; PEFT's hotswap where
  it applies) against loading the paired full-FT checkpoint into a fresh model object, with the page cache warm and
  cold (the files' pages evicted first); both sizes on disk;
- many: one base serving a mixed batch for N adapters (PEFT's `adapter_names`) against N merged models.
The sweep's adapters are all SST-2 ones: "another task's adapter" is another run's (another seed or rank); the time
to load an adapter depends on its size, not on its task. Every time is a median over interleaved repeats with its
interval (lora_sweep.timing); every ratio is taken within a repeat.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import transformers
from peft import LoraConfig, PeftModel
from peft.utils.hotswap import check_hotswap_configs_compatible, hotswap_adapter
from transformers import AutoTokenizer

from lora_sweep import adapters, batching, data, experiment, records, runtime, timing
from lora_sweep.analysis import Analysis, analyse
from lora_sweep.analysis.load import load_records
from lora_sweep.distributed import make_accelerator
from lora_sweep.errors import UserError, file_errors
from lora_sweep.records import RunRecord
from lora_sweep.evaluation import predict
from lora_sweep.settings import Settings
from lora_sweep.task_family import TaskFamily

BATCH_SIZES = (1, 32)
LATENCY_BATCHES = {1: 8, 32: 1}  # real eval batches timed per repeat, spread over the length-sorted eval split
REPEATS = 5  # interleaved repeats of every timing
MANY = (1, 2, 4, 8)  # adapters on one base against as many merged models


@dataclass
class Served:
    """One LoRA run's model, data and artifacts, rebuilt from its record."""

    record: RunRecord
    settings: Settings
    family: TaskFamily
    kind: str  # the architecture family (adapters.architecture_of): which modules are the task head
    model_path: str
    dev: Any  # the tokenized eval split, in the record's order
    collate: Callable
    runs_dir: Path

    def base(self) -> torch.nn.Module:
        return self.family.load_model(self.model_path, self.settings).eval()

    def batches(self, size: int, count: int) -> list[dict]:
        """`count` real eval batches of `size` examples, the middles of `count` equal slices of the split sorted by
        length (one batch: the median length)."""
        order = batching.eval_order([len(ids) for ids in self.dev["input_ids"]], size)
        picked = [order[int((i + 0.5) * len(order) / count)] for i in range(count)]
        loaded = [batching.load_batch(self.dev, b, self.collate, "cpu") for b in picked]
        return [{k: v for k, v in batch.items() if k != "labels"} for batch in loaded]


def serve(record: RunRecord, runs_dir: Path, cache_dir: str) -> Served:
    """The run's model, data and collator as its experiment planned them (experiment.plan)."""
    p = experiment.plan(records.run_settings(record, runs_dir, cache_dir))
    s = p.settings
    tokenizer = AutoTokenizer.from_pretrained(p.model_path, revision=s.model.revision)
    tokens, _ = data.prepare(p.family, s, p.source, tokenizer, data.tokenizer_id(s))
    kind = adapters.architecture_of(p.family.load_model(p.model_path, s, meta=True))
    return Served(record, s, p.family, kind, p.model_path, tokens["dev"], p.family.collator(tokenizer), runs_dir)


def serving_config(path: Path, family: str) -> LoraConfig:
    """The adapter's saved config with its task head wrapped as adapters.HEADS wraps it now: adapters saved before
    wrapped BERT's whole pooler, which PEFT cannot route row by row in a mixed batch (the saved weights are the same)."""
    config = LoraConfig.from_pretrained(str(path))
    config.modules_to_save = adapters.HEADS[family] or None
    return config


def load_adapter(model: torch.nn.Module, path: Path, name: str, family: str) -> PeftModel:
    """`model` (a base, or a PeftModel) with the adapter in `path` loaded under `name` through PEFT."""
    config = serving_config(path, family)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)  # load_adapter then loads the weights into the adapter named so
        model.load_adapter(str(path), adapter_name=name)
        return model
    return PeftModel.from_pretrained(model, str(path), adapter_name=name, config=config).eval()


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (posix_fadvise DONTNEED, no privileges needed): the next read is cold."""
    for file in folder.iterdir():
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def tensor_bytes(*models: torch.nn.Module) -> int:
    """Bytes of the distinct tensors the models hold (a tensor shared by two of them counted once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for m in models for t in m.state_dict().values()}
    return sum(seen.values())


@torch.inference_mode()
def _seconds_per_batch(model: torch.nn.Module, batches: list[dict], **kwargs) -> dict[str, float]:
    start = time.perf_counter()
    for batch in batches:
        model(**batch, **kwargs)
    return {"s": (time.perf_counter() - start) / len(batches)}


def _within_repeat(runs: dict[str, list[dict[str, float]]], num: str, den: str, key: str = "s") -> dict[str, float]:
    return timing.summary(timing.ratios(runs[num], runs[den], key))


def _summaries(runs: dict[str, list[dict[str, float]]], key: str = "s") -> dict[str, dict[str, float]]:
    return {name: timing.summary([r[key] for r in values]) for name, values in runs.items()}


# ---- the four measurements -------------------------------------------------------------------------------------

def merge_equivalence(served: Served, unmerged: PeftModel, merged: torch.nn.Module) -> dict[str, Any]:
    """Outputs and metric of the whole eval split before and after merging, and against the run's recorded outputs."""
    accelerator, batch_size = make_accelerator("cpu", "none"), served.settings.train.eval_batch_size
    before, _ = predict(accelerator, unmerged, served.family, served.dev, served.collate, batch_size)
    after, _ = predict(accelerator, merged, served.family, served.dev, served.collate, batch_size)
    labels = np.asarray(served.dev["label"]) if "label" in served.dev.column_names else None  # instruction tasks have none
    metric_before, primary = served.family.split_metrics(before, labels, served.settings)
    metric_after, _ = served.family.split_metrics(after, labels, served.settings)
    recorded = served.record["examples"]["dev"]
    same = list(served.dev["id"]) == recorded["ids"]
    return {"examples": len(before), "max_abs_diff": float(abs(after - before).max()), "metric": primary,
            "before": metric_before[primary], "after": metric_after[primary], "recorded": served.record["primary_value"],
            "max_abs_diff_vs_recorded": float(np.abs(before - np.asarray(recorded["outputs"])).max()) if same else None,
            "same_examples_as_recorded": same}


def latency(served: Served, base: torch.nn.Module, unmerged: PeftModel, merged: torch.nn.Module, repeats: int) -> dict[str, Any]:
    out = {}
    for size in BATCH_SIZES:
        batches = served.batches(size, LATENCY_BATCHES[size])
        variants = {"base": lambda: _seconds_per_batch(base, batches), "unmerged": lambda: _seconds_per_batch(unmerged, batches),
                    "merged": lambda: _seconds_per_batch(merged, batches)}
        for run in variants.values():
            run()  # warm-up
        runs = timing.interleaved(variants, repeats)
        out[f"batch_{size}"] = {"batches": len(batches), "seconds_per_batch": _summaries(runs),
                                "merged/base": _within_repeat(runs, "merged", "base"),
                                "unmerged/base": _within_repeat(runs, "unmerged", "base")}
    return out


def hotswap_blocker(a: LoraConfig, b: LoraConfig) -> str | None:
    """Why PEFT's hotswap_adapter cannot replace adapter `a` by `b` in place, or None where it can."""
    if a.modules_to_save or b.modules_to_save:
        return ("the adapters save a trained task head beside their LoRA matrices (modules_to_save), which "
                "hotswap_adapter does not swap")
    if a.r != b.r or set(a.target_modules) != set(b.target_modules):
        return "the adapters differ in rank or adapted modules"
    try:
        check_hotswap_configs_compatible(a, b)
    except ValueError as exc:
        return str(exc)
    return None


def swap(served: Served, unmerged: PeftModel, other: RunRecord, checkpoint: Path, repeats: int) -> dict[str, Any]:
    """Switching the loaded model to `other`'s adapter against loading the full-FT checkpoint into a fresh model."""
    family = served.kind
    path, own = records.artifact_dir(other, served.runs_dir), records.artifact_dir(served.record, served.runs_dir)
    architecture = getattr(transformers, transformers.AutoConfig.from_pretrained(checkpoint).architectures[0])

    def adapter_swap(cold: bool) -> Callable[[], dict[str, float]]:
        def measure() -> dict[str, float]:
            if cold:
                evict(path)
            start = time.perf_counter()
            load_adapter(unmerged, path, "swap", family)
            unmerged.set_adapter("swap")
            seconds = time.perf_counter() - start
            unmerged.set_adapter("default")
            unmerged.delete_adapter("swap")
            return {"s": seconds}
        return measure

    def checkpoint_load(cold: bool) -> Callable[[], dict[str, float]]:
        def measure() -> dict[str, float]:
            if cold:
                evict(checkpoint)
            start = time.perf_counter()
            architecture.from_pretrained(checkpoint)
            return {"s": time.perf_counter() - start}
        return measure

    variants = {"adapter swap (warm)": adapter_swap(False), "adapter swap (cold)": adapter_swap(True),
                "checkpoint load (warm)": checkpoint_load(False), "checkpoint load (cold)": checkpoint_load(True)}
    blocker = hotswap_blocker(LoraConfig.from_pretrained(str(own)), LoraConfig.from_pretrained(str(path)))
    if blocker is None:
        def hotswap() -> dict[str, float]:
            start = time.perf_counter()
            hotswap_adapter(unmerged, str(path), adapter_name="default")
            seconds = time.perf_counter() - start
            hotswap_adapter(unmerged, str(own), adapter_name="default")
            return {"s": seconds}
        variants["hotswap (warm)"] = hotswap
    for run in variants.values():
        run()  # warm-up: the first call of each pays one-time costs (imports, allocator)
    runs = timing.interleaved(variants, repeats)
    return {
        "adapter_run_id": other["run_id"], "adapter_r": other["r"], "adapter_seed": other["seed"],
        "adapter_bytes": other["artifact"]["bytes"], "checkpoint_run_id": served.record["baseline_run_id"],
        "seconds": _summaries(runs),
        "swap/checkpoint (warm)": _within_repeat(runs, "adapter swap (warm)", "checkpoint load (warm)"),
        "swap/checkpoint (cold)": _within_repeat(runs, "adapter swap (cold)", "checkpoint load (cold)"),
        "hotswap": "measured" if blocker is None else f"not applicable: {blocker}",
        "cache_note": "warm: the files were read in an earlier repeat; cold: their pages were evicted with "
                      "posix_fadvise(DONTNEED) just before the load (the OS may keep pages another process maps)",
    }


def many_adapters(served: Served, pool: list[RunRecord], repeats: int) -> list[dict[str, Any]]:
    """For N adapters: one base serving a mixed batch (row i -> adapter i mod N) against N merged models, each given
    its own rows of the batch: examples per second and the tensor bytes each way holds."""
    batch = served.batches(32, 1)[0]
    rows = len(batch["input_ids"])
    family = served.kind
    out = []
    for n in [n for n in MANY if n <= len(pool)]:
        paths = [records.artifact_dir(r, served.runs_dir) for r in pool[:n]]
        names = [f"a{i}" for i in range(n)]
        mixed = served.base()
        for name, path in zip(names, paths):
            mixed = load_adapter(mixed, path, name, family)
        routing = [names[i % n] for i in range(rows)]
        merged = [load_adapter(served.base(), path, "default", family).merge_and_unload() for path in paths]
        parts = [{k: v[i::n] for k, v in batch.items()} for i in range(n)]

        @torch.inference_mode()
        def each_merged(keep: bool = False) -> dict[str, Any]:
            start = time.perf_counter()
            outputs = [model(**part).logits for model, part in zip(merged, parts)]
            return {"s": time.perf_counter() - start, **({"logits": outputs} if keep else {})}  # timed repeats keep no logits

        @torch.inference_mode()
        def one_mixed(keep: bool = False) -> dict[str, Any]:
            start = time.perf_counter()
            logits = mixed(**batch, adapter_names=routing).logits
            return {"s": time.perf_counter() - start, **({"logits": logits} if keep else {})}

        check_mixed, check_merged = one_mixed(keep=True)["logits"], each_merged(keep=True)["logits"]
        agree = max(float((check_mixed[i::n] - part).abs().max()) for i, part in enumerate(check_merged))
        runs = timing.interleaved({"mixed batch": one_mixed, "merged models": each_merged}, repeats)
        throughput = {name: timing.summary([rows / r["s"] for r in values]) for name, values in runs.items()}
        out.append({"n": n, "adapter_run_ids": [r["run_id"] for r in pool[:n]], "batch": rows,
                    "examples_per_s": throughput, "mixed/merged time": _within_repeat(runs, "mixed batch", "merged models"),
                    "tensor_bytes": {"mixed batch": tensor_bytes(mixed), "merged models": tensor_bytes(*merged)},
                    "max_abs_diff_mixed_vs_merged": agree})
    return out


# ---- which runs, and the command ---------------------------------------------------------------------------------

def measure(record: RunRecord, runs_dir: Path, all_records: list[RunRecord], chosen: str, repeats: int,
            cache_dir: str) -> dict[str, Any]:
    """The deploy record of one LoRA run whose adapter and paired full-FT checkpoint are on disk."""
    started = time.perf_counter()
    served = serve(record, runs_dir, cache_dir)
    base = served.base()
    unmerged = load_adapter(served.base(), records.artifact_dir(record, runs_dir), "default", served.kind)
    merged = copy.deepcopy(unmerged).merge_and_unload()
    baseline = next(r for r in all_records if r["run_id"] == record["baseline_run_id"])
    others = sorted((r for r in all_records if r["method"] == "lora" and r["run_id"] != record["run_id"]
                     and r["context_id"] == record["context_id"] and records.artifact_dir(r, runs_dir)),
                    key=lambda r: (r["config_id"] != record["config_id"], r["r"], r["seed"]))  # same config first: hotswap may apply
    out = {
        "run_id": record["run_id"], "status": "done", "task": record["task"], "model": record["model"], "method": "lora",
        "r": record["r"], "seed": record["seed"], "targets": record["targets"], "chosen": chosen,
        "adapter_bytes": record["artifact"]["bytes"], "checkpoint_bytes": baseline["artifact"]["bytes"],  # the weights, as the runs recorded them
        "repeats": repeats, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": records.environment("cpu", torch.get_num_threads()),
        "merge": merge_equivalence(served, unmerged, merged),
        "latency": latency(served, base, unmerged, merged, repeats),
        "swap": swap(served, unmerged, others[0], records.artifact_dir(baseline, runs_dir), repeats) if others else None,
        "many": many_adapters(served, [record, *others], repeats),
    }
    out["seconds"] = time.perf_counter() - started
    return out


def default_run(analysis: Analysis, runs_dir: Path) -> tuple[str, str]:
    """The seed-0 run of the rank to use (Analysis.rank_to_use: the recommended rank, else the one closest to full FT)
    of the first recommendation that names a rank, else of the first; returns its run id and why it was chosen."""
    recommendation = analysis.recommendation
    if recommendation.empty:
        raise UserError(f"no finished LoRA configuration in {runs_dir} to measure")
    named = recommendation[recommendation["r"].notna()] if "r" in recommendation else recommendation.iloc[:0]
    config, why = analysis.rank_to_use((named if len(named) else recommendation).iloc[0])
    if "delta" not in config or pd.isna(config["delta"]):
        raise UserError(f"no LoRA configuration in {runs_dir} is paired with a finished full-FT baseline; use --run RUN_ID")
    runs = analysis.runs
    runs = runs[(runs["config_id"] == config["config_id"]) & (runs["seed"] == 0) & (runs["status"] == "done")]
    if runs.empty:
        raise UserError(f"the chosen configuration (r={int(config['r'])}) has no seed-0 run in {runs_dir}")
    return runs.iloc[0]["run_id"], f"{why} (r={int(config['r'])}, seed 0)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lora-deploy", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results",
                        help="a results folder holding runs/, or the runs folder itself (default: results)")
    parser.add_argument("--run", action="append", default=[], help="run id of a LoRA run to measure (repeatable; "
                        "default: the seed-0 run of the recommended rank, else of the rank with the best estimate)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"interleaved repeats of every timing (default {REPEATS})")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: all cores)")
    parser.add_argument("--cache-dir", default=".cache/lora_sweep", help="token cache and converted models (default: .cache/lora_sweep)")
    args = parser.parse_args(argv)
    runtime.quiet_libraries()
    try:
        with file_errors():
            sys.exit(deploy(records.runs_folder(args.results_dir), args.run, args.repeats, args.threads, args.cache_dir))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def deploy(runs_dir: Path, run_ids: list[str], repeats: int, threads: int, cache_dir: str, analysis: Analysis | None = None) -> int:
    """Measure the runs and write their deploy records; returns the exit status: 1 where a run was not measured (its
    artifacts are missing), so a script never takes a measurement that was not made for one."""
    if repeats < 2:
        raise UserError(f"--repeats={repeats} gives no spread; use 2 or more")
    torch.set_num_threads(runtime.resolve_threads(threads))
    if not run_ids and analysis is None:
        analysis = analyse(*load_records(runs_dir))
    chosen = {rid: "requested" for rid in run_ids} or dict([default_run(analysis, runs_dir)])
    all_records = [records.read_fields(r) for r in (records.read_record(runs_dir, p.stem) for p in sorted(runs_dir.glob("*.json"))) if r]
    status = 0
    for rid, why in chosen.items():
        record = next((r for r in all_records if r["run_id"] == rid), None)
        if record is not None and record["method"] == "adalora":
            raise UserError(f"--run {rid} is an AdaLoRA run: lora-deploy measures LoRA adapters (AdaLoRA's unmerged form "
                            f"computes at its initial rank and has no mixed-batch serving); its final ranks re-train as LoRA "
                            f"with method.rank_pattern=<its tables/allocated/*.yaml>, and that run deploys")
        if record is None or record["method"] != "lora" or record["status"] != "done":
            raise UserError(f"--run {rid}: no finished LoRA run of that id in {runs_dir}")
        baseline = next((r for r in all_records if r["run_id"] == record["baseline_run_id"]), {})
        missing = [name for name, r in (("adapter", record), ("full-FT checkpoint", baseline)) if not records.artifact_dir(r, runs_dir)]
        if missing:
            print(f"[lora-deploy] {rid}: its {' and '.join(missing)} is not on disk (artifacts are not committed; re-run its "
                  f"sweep to save them): not measured", file=sys.stderr)
            status = 1
            continue
        print(f"[lora-deploy] {rid}: {why}; measuring ({repeats} repeats, {torch.get_num_threads()} threads)", flush=True)
        out = measure(record, runs_dir, all_records, why, repeats, cache_dir)
        path = records.write_record(runs_dir.parent / "deploy", out)
        print(f"[lora-deploy] wrote {path} in {out['seconds']:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    main()
