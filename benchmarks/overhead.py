"""Overhead of the harness's training loop: `lora_sweep.train.fit` against a bare PyTorch + PEFT loop, in one process.

What is measured. Both variants train the same model (the harness's LoRA r=8 on query/value of the embedded
MiniLM, built by the harness's own builder from the same seed) for the same `--steps` optimizer steps on the
same real SST-2 batches (the plan `batching.train_plan` draws for a real run: train.batching, seed 0), with
AdamW (weight decay on weight matrices only), the same linear warmup/decay schedule and the same gradient
clipping, on the same torch threads. The bare loop is what one writes by hand: a DataLoader over the plan's
micro-batches, forward, backward of each micro-batch's loss weighted by its share of the step's examples, clip,
step, schedule, zero_grad, loss.item(). The harness additionally has
accelerate, the divergence guard, token counting, the loss log and the progress bar; its memory probe is off
(`--probe` adds a third variant with it on: one probed step per run, as every real run makes by default).
Only the steps are timed (model building, optimizer and data set-up are not, in either variant). Both
variants print their step losses' largest difference: 0 means they did exactly the same computation.

How it is timed. One untimed 3-step run of each variant first (warm-up), then `--repeats` repeats of every
variant, interleaved with the order rotated each repeat (bare, harness / harness, bare / ...), so that a drift of
a shared machine hits both. Each repeat gives one ratio harness / bare of seconds per step.

How to read the output. One line per run as it finishes, then one line per variant (median s/step over repeats,
min-max, real tokens/s), then the ratio line: the median of the per-repeat ratios, a distribution-free interval for
that median (order statistics; >= 95 % coverage from 6 repeats on, 96 % for the default 9; with fewer repeats it is
the min-max range and its coverage is printed) with its half-width in %, and the min-max range. The target is
harness / bare <= 1.05: met when the whole interval is at or below 1.05, missed when it is above, otherwise (or
with fewer than 5 repeats) undecided. A 5 % change is visible when the half-width is well under 5 % (about 1-2 % on
a quiet machine with the defaults); if it is wider, the machine was busy (torch's threads slow down many-fold when
other processes share the cores): run more --repeats, or on a quiet machine. Absolute timings vary 10-30 % between
machines of the same kind (and with other load on this one): compare ratios measured in one run, not seconds across
runs.

    python benchmarks/overhead.py                        # defaults: 50 steps x 9 repeats, all cores (about 3-4 min on 2 quiet cores)
    python benchmarks/overhead.py --steps 5 --repeats 2  # a quick check that it works
    python benchmarks/overhead.py method.r=16 train.batch_size=16   # any Hydra override of the experiment
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

import common

from lora_sweep import batching, timing


def bare_run(bench: common.Bench, schedule: batching.Plan) -> tuple[float, list[float]]:
    """The hand-written loop on the same model and batches: seconds for the steps, and each step's loss."""
    method, train = bench.method("lora"), bench.train
    model = common.build_model(bench, method).to(bench.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=method.lr)
    steps = len(schedule.steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(train.warmup_ratio * steps), steps)
    # Its own generator: the loader's seed draw must not consume the global RNG that dropout uses (same masks as fit).
    batches = iter(DataLoader(bench.train_set, batch_sampler=schedule.batches, collate_fn=bench.collate, generator=torch.Generator()))
    autocast = common.autocast(bench.device)
    losses = []
    gc.collect()
    common.synchronize(bench.device)
    start = time.perf_counter()
    for micros in schedule.steps:
        losses.append(bare_step(bench.device, model, micros, batches, autocast))
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    common.synchronize(bench.device)
    return time.perf_counter() - start, losses


def bare_step(device: str, model: torch.nn.Module, micros: list, batches, autocast) -> float:
    """Forward and backward of one step's micro-batches, each loss weighted by its share of the step's examples (as fit
    weights them); the step's loss."""
    step_loss, examples = 0.0, sum(map(len, micros))
    for micro in micros:
        batch = {k: v.to(device) for k, v in next(batches).items()}
        with autocast:
            loss = model(**batch).loss
        if len(micro) != examples:
            loss = loss * (len(micro) / examples)
        loss.backward()
        step_loss += loss.item()
    return step_loss


def variants(bench: common.Bench, schedule: batching.Plan, probe: bool, losses: dict[str, list[float]]) -> dict:
    """bare and harness (and harness+probe) runs on `schedule` or a warm-up plan; each run leaves its step losses in `losses`."""
    def bare(plan: batching.Plan = schedule) -> dict[str, float]:
        seconds, losses["bare"] = bare_run(bench, plan)
        return {"s_per_step": seconds / len(losses["bare"]), "tok_per_s": batching.token_counts(plan.batches, bench.lengths)["real_tokens"] / seconds}

    def harness(plan: batching.Plan = schedule, probe: bool = False) -> dict[str, float]:
        result = common.run_checked(bench, plan, memory_probe=probe)
        losses["harness+probe" if probe else "harness"] = result.step_losses
        return common.rates(result)

    out = {"bare": bare, "harness": harness}
    if probe:
        out["harness+probe"] = lambda plan=schedule: harness(plan, probe=True)
    return out


def report(runs: dict[str, list[dict[str, float]]], losses: dict[str, list[float]]) -> None:
    """Medians per variant, whether the computations were the same, and each variant's ratio to bare against the target."""
    same = max(abs(a - b) for name in runs if name != "bare" for a, b in zip(losses[name], losses["bare"]))
    print(f"  {'variant':<16s} {'s/step':>9s} {'min-max s/step':>17s} {'real tok/s':>11s}")
    for name, values in runs.items():
        s = [r["s_per_step"] for r in values]
        print(f"  {name:<16s} {statistics.median(s):9.4f} {min(s):8.4f}-{max(s):<8.4f} {common.median(values, 'tok_per_s'):11.0f}")
    print(f"  same computation: largest |step loss difference| vs bare = {same:.2e}")
    for name in runs:
        if name == "bare":
            continue
        r = timing.ratios(runs[name], runs["bare"], "s_per_step")
        print(f"  ratio {name}/bare s/step: {timing.spread(r)}\n    target <= 1.05: {verdict(r)}")


def verdict(r: list[float]) -> str:
    """harness / bare <= 1.05, decided only by an interval that lies wholly on one side of it."""
    lo, hi, cover = timing.median_interval(r) if len(r) > 1 else (r[0], r[0], 0.0)
    if cover < 0.9:
        return f"undecided ({len(r)} repeats give no interval of 90 % or more: use --repeats 5 or more)"
    return "met" if hi <= 1.05 else "missed" if lo > 1.05 else "undecided (the interval straddles 1.05: more repeats)"


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.common_arguments(parser, steps=50, repeats=9)
    parser.add_argument("--probe", action="store_true", help="add a third variant: the harness with its one-step memory probe on")
    args, bench = common.parse(parser, lora_only="overhead.py times a LoRA run")
    common.header(f"harness fit() vs a bare PyTorch + PEFT loop: {bench.label('lora')}, lr {bench.method('lora').lr:g}", bench, args)
    schedule = bench.schedule()
    counts = batching.token_counts(schedule.batches, bench.lengths)
    print(f"  batches: {bench.train.batching}, {counts['real_tokens']} real tokens per run, "
          f"padding {100 * counts['padding_fraction']:.1f} %", flush=True)

    losses: dict[str, list[float]] = {}
    timed = variants(bench, schedule, args.probe, losses)
    start = time.perf_counter()
    warm = bench.schedule(steps=common.WARMUP_STEPS)
    runs = common.warm_then_time([lambda run=run: run(warm) for run in timed.values()], timed, args.repeats,
                                 lambda r: f"{r['s_per_step']:.4f} s/step  {r['tok_per_s']:8.0f} real tok/s", start)
    print(f"\nresults ({args.steps} steps per run; medians over {args.repeats} repeats; wall time {common.elapsed(start)}):")
    report(runs, losses)


if __name__ == "__main__":
    main()
