"""Evaluation's share of a run, and what the evaluation batch size changes; one process, figures measured side by side.

What is measured. One LoRA run of the composed experiment (by default the main job's: LoRA r=8 on query/value,
SST-2, 150 steps) is trained once through the harness's `train.fit` and timed (the steps only, as a record's
`train_s`). Its model is then evaluated on the tuning and dev splits by `evaluation.evaluate_split`, the code path of
every real run, at each `--batch-sizes` value, the variants interleaved over `--repeats` (order rotated). For each
batch size: seconds for both splits, the padding fraction, and the largest difference of its outputs from the first
batch size's (float noise of a different matmul blocking; the metrics are printed to show they do not move).

Then the share: evaluation / (training + evaluation) per repeat, the figure that issue #10 asks to be <= 10 %.
Beside it, the floor no batching can go under in this precision: the share if evaluation computed only the matrix
products of every real token's forward pass (lora_sweep.flops, no padding) at this machine's dense matmul peak
(a large `torch.matmul` on the same threads) and nothing else.

Threads: the main job trains its LoRA runs two at a time with one thread each; use `--threads 1` (the default here)
to measure what such a run does.

    python benchmarks/evaluation.py                        # defaults: 150 steps, batch sizes 128 64 32 16, 5 repeats, 1 thread (about 5 min)
    python benchmarks/evaluation.py --steps 10 --repeats 2 # a quick check that it works
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import numpy as np
import torch

import common
from lora_sweep import batching, distributed, evaluation, timing
from lora_sweep.flops import flop_model
from lora_sweep.train import TrainResult


def train_once(bench: common.Bench) -> tuple[torch.nn.Module, TrainResult]:
    """The composed LoRA run, trained once and timed as a record's train_s: the model every batch size evaluates."""
    model = common.build_model(bench, bench.method("lora"))
    trained = common.run_harness(bench, bench.method("lora"), bench.schedule(), model=model)
    print(f"\ntrained {bench.label('lora')}: {trained.steps} steps in {trained.seconds:.1f} s "
          f"({trained.real_tokens} real tokens, {trained.real_tokens / trained.seconds:.0f} real tok/s)", flush=True)
    return model, trained


def eval_variant(bench: common.Bench, accelerator, model: torch.nn.Module, splits: dict, batch_size: int) -> Callable[[], dict]:
    """Both splits evaluated by the code path of a real run at `batch_size`: seconds, and the outputs to compare."""
    settings = dataclasses.replace(bench.settings, train=dataclasses.replace(bench.settings.train, eval_batch_size=batch_size))

    def run() -> dict:
        t0 = time.perf_counter()
        out = {name: evaluation.evaluate_split(accelerator, model, bench.plan.family, split, bench.collate, settings)
               for name, split in splits.items()}
        common.synchronize(bench.device)
        return {"s": time.perf_counter() - t0, "outputs": out}
    return run


def floor(bench: common.Bench, model: torch.nn.Module, splits: dict) -> tuple[float, float]:
    """The FLOPs of every real token's forward matrix products (no padding), and the matmul peak they are read at."""
    example = batching.load_batch(splits["dev"], list(range(8)), bench.collate, bench.device)
    useful = flop_model(model, example).forward([len(x) for n in splits for x in splits[n]["input_ids"]])
    return useful, common.matmul_gflops(bench.device, next(model.parameters()).dtype)


def report_variants(runs: dict, splits: dict, trained: TrainResult) -> None:
    """Per batch size: seconds, padding, share of the run, and how far its outputs and metrics are from the first's."""
    reference = runs[next(iter(runs))][0]["outputs"]
    real = sum(reference[n]["tokens"]["real_tokens"] for n in splits)
    print(f"  evaluated: {real} real tokens (tune {reference['tune']['tokens']['real_tokens']}, dev {reference['dev']['tokens']['real_tokens']}) "
          f"against {trained.real_tokens} trained")
    print(f"  {'variant':<16s} {'seconds (tune + dev)':<70s} {'padding':>8s} {'share of run':>13s} {'max |diff|':>10s}  metrics (tune, dev)")
    for name, results in runs.items():
        outs = results[0]["outputs"]
        computed = sum(outs[n]["tokens"]["computed_tokens"] for n in splits)
        share = [r["s"] / (r["s"] + trained.seconds) for r in results]
        diff = max(float(np.max(np.abs(np.asarray(outs[n]["examples"]["outputs"]) - np.asarray(reference[n]["examples"]["outputs"]))))
                   for n in splits)
        metrics = ", ".join(f"{outs[n]['metrics'][outs[n]['primary_metric']]:.4f}" for n in splits)
        print(f"  {name:<16s} {timing.spread([r['s'] for r in results], '.2f'):<70s} {100 * (1 - real / computed):7.1f}% "
              f"{100 * statistics.median(share):12.1f}% {diff:10.1e}  {metrics}")


def report_floor(bench: common.Bench, runs: dict, trained: TrainResult, useful: float, peak: float) -> None:
    """The fastest batch size against the first, and the share no batching can go under."""
    first = next(iter(runs))
    best = min(runs, key=lambda n: common.median(runs[n], "s"))
    print(f"  fastest: {best}; {first} / {best} seconds: {common.ratio(runs, first, best, 's')}")
    least = useful / peak / 1e9  # every real token's forward matrix products at the matmul peak, nothing else
    print(f"  floor: {useful / 1e9:.0f} GFLOP of forward matrix products on real tokens at the {peak:.0f} GFLOP/s matmul peak = "
          f"{least:.1f} s, a share of {100 * least / (least + trained.seconds):.1f} % against this training")
    if bench.device == "cpu":  # what another number format would offer (evaluating another model than the trained one)
        bf16 = common.matmul_gflops("cpu", torch.bfloat16)
        print(f"  for reference: the same matmul in bf16 runs at {bf16:.0f} GFLOP/s ({bf16 / peak:.2f}x)")


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.common_arguments(parser, steps=150, repeats=5, threads=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 64, 32, 16], help="evaluation batch sizes to compare")
    args, bench = common.parse(parser)
    common.header("evaluation's share of a run", bench, args)
    splits = {"tune": bench.tokens["tune"], "dev": bench.tokens["dev"]}
    accelerator = distributed.make_accelerator(bench.device, "none")

    start = time.perf_counter()
    model, trained = train_once(bench)
    variants = {f"eval batch {b}": eval_variant(bench, accelerator, model, splits, b) for b in args.batch_sizes}
    for run in variants.values():
        run()  # warm-up
    runs = timing.interleaved(variants, args.repeats, show=lambda r: f"{r['s']:.2f} s")
    print(f"\nresults (wall time {common.elapsed(start)}):")
    useful, peak = floor(bench, model, splits)
    report_variants(runs, splits, trained)
    report_floor(bench, runs, trained, useful, peak)


if __name__ == "__main__":
    main()
