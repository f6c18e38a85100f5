"""What each way of batching costs: sorted micro-batches (the default), random and length-grouped batches in the
harness, and transformers' Trainer with PEFT on the same data and budget (its train_sampling_strategy "random" and
"group_by_length", formerly group_by_length=False/True), in one
process, every figure a ratio of runs measured side by side.

What is measured. Every variant trains the composed LoRA run (r=8 on query/value of the embedded MiniLM, SST-2,
batch 32, max 64 tokens, seed 0) for `--steps` optimizer steps with the same AdamW, schedule and clipping:
  harness sorted   `train.fit` on `batching.train_plan(..., "sorted")`: random batches' examples, each step cut by
                   length into micro-batches (at least train.min_micro_batch examples each), losses weighted
  harness random   the same examples per step as sorted, one padded batch per step
  harness grouped  transformers' LengthGroupedSampler (changes which examples share a step: not the same optimisation)
  Trainer random   `transformers.Trainer` + the same PEFT model, train_sampling_strategy="random" (what a user would run)
  Trainer grouped  the same with train_sampling_strategy="group_by_length"
Printed per variant: s/step, real and computed (padded) tokens per run, the share of computed tokens that is real,
and real tokens per second; then the ratios of real tokens per second, each the median of per-repeat ratios with a
distribution-free interval (lora_sweep.timing). The Trainer's time is its whole `train()` call (its set-up included,
as a user pays it); its token counts are read off the batches its collator padded.

Only speed is measured here; whether a batching changes the result is a paired comparison over seeds of real runs
(docs/benchmarks.md: "Speed"; `results/batching/`).

    python benchmarks/batching.py                        # defaults: 40 steps x 5 repeats, 1 thread (about 6 min)
    python benchmarks/batching.py --steps 5 --repeats 2  # a quick check that it works
    python benchmarks/batching.py train.min_micro_batch=8
"""

from __future__ import annotations

import tempfile
import time
from typing import Callable

from transformers import Trainer, TrainingArguments

import common
from lora_sweep import batching

HARNESS = ("sorted", "random", "grouped")


def trainer_run(bench: common.Bench, steps: int, group_by_length: bool) -> dict[str, float]:
    """transformers' Trainer on the same PEFT model, data, optimizer settings and budget; tokens counted as it pads."""
    method, t = bench.method("lora"), bench.train
    counted = {"real": 0, "computed": 0}

    def collate(features):
        batch = bench.collate(features)
        counted["real"] += int(batch["attention_mask"].sum())
        counted["computed"] += batch["input_ids"].numel()
        return batch

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
                                 max_steps=steps, learning_rate=method.lr, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                                 warmup_steps=round(t.warmup_ratio * steps), lr_scheduler_type="linear",
                                 train_sampling_strategy="group_by_length" if group_by_length else "random",
                                 seed=t.seed, use_cpu=bench.device == "cpu", bf16=bench.device == "cuda", report_to="none",
                                 save_strategy="no", logging_strategy="no", eval_strategy="no", disable_tqdm=True,
                                 remove_unused_columns=False, dataloader_num_workers=0)
        trainer = Trainer(model=common.build_model(bench, method), args=args, train_dataset=bench.train_set, data_collator=collate)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"s_per_step": seconds / steps, "tok_per_s": counted["real"] / seconds, "real": counted["real"], "computed": counted["computed"]}


def harness_run(bench: common.Bench, plan: batching.Plan) -> dict[str, float]:
    result = common.run_checked(bench, plan)
    return {**common.rates(result), "real": result.real_tokens, "computed": result.computed_tokens}


def variants(bench: common.Bench, steps: int) -> dict[str, Callable[[], dict[str, float]]]:
    """Every variant as a run of `steps` optimizer steps (the warm-up's are short runs of the same variants)."""
    def harness(mode: str):
        plan = bench.schedule(mode, steps)
        return lambda: harness_run(bench, plan)

    def trainer(grouped: bool):
        return lambda: trainer_run(bench, steps, grouped)

    return {**{f"harness {m}": harness(m) for m in HARNESS}, "Trainer random": trainer(False), "Trainer grouped": trainer(True)}


def report(runs: dict[str, list[dict[str, float]]]) -> None:
    """The table of medians per variant, then the ratios of real tokens per second."""
    print(f"  {'variant':<16s} {'s/step':>8s} {'real tokens':>12s} {'computed':>10s} {'real share':>10s} {'real tok/s':>11s}")
    for name, values in runs.items():
        real, computed = common.median(values, "real"), common.median(values, "computed")
        print(f"  {name:<16s} {common.median(values, 's_per_step'):8.4f} {real:12.0f} {computed:10.0f} "
              f"{100 * real / computed:9.1f}% {common.median(values, 'tok_per_s'):11.0f}")
    print("  ratios of real tokens per second:")
    for a, b in (("harness sorted", "harness random"), ("harness sorted", "Trainer random"), ("harness sorted", "Trainer grouped"),
                 ("harness grouped", "harness random"), ("Trainer grouped", "Trainer random")):
        print(f"    {a} / {b}: {common.ratio(runs, a, b, 'tok_per_s')}")


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.common_arguments(parser, steps=40, repeats=5, threads=1)  # as the main job runs each of its two parallel jobs
    args, bench = common.parse(parser, lora_only="batching.py times a LoRA run")
    common.header(f"batching: {bench.label('lora')}, min micro-batch {bench.train.micro_batch_floor}", bench, args)
    start = time.perf_counter()
    runs = common.warm_then_time(variants(bench, common.WARMUP_STEPS).values(), variants(bench, args.steps), args.repeats,
                                 lambda r: f"{r['s_per_step']:.4f} s/step  {r['tok_per_s']:8.0f} real tok/s", start)
    print(f"\nresults ({args.steps} steps of {bench.train.batch_size} per run; medians over {args.repeats} repeats; "
          f"wall time {common.elapsed(start)}):")
    report(runs)


if __name__ == "__main__":
    main()
