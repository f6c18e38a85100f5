"""Training throughput of the harness against this machine's dense matmul throughput, and what sorted micro-batches
(the default train.batching) buy over random batches; one process, every figure a ratio of runs measured side by side.

What is measured, per repeat (the variants interleaved, their order rotated every repeat):
  (a) matmul      GFLOP/s of a dense 2048 x 2048 x 2048 `torch.matmul` in the training's compute dtype (fp32 on CPU;
                  bf16 on CUDA, where the harness autocasts to bf16), on the same torch threads as training: the
                  median of 5 timed calls after warm-up. Beside it, for reference, a matmul of the model's own FFN
                  shape ([computed tokens of a median batch] x hidden @ hidden x intermediate).
  (b) full FT and LoRA (the composed run: r=8 on query/value by default), sorted micro-batches: `train.fit` on the
                  real SST-2 batches of `batching.train_plan`, exactly the code path of a real run (memory probe off).
                  Printed: s/step, real tokens/s, computed (padded) tokens/s, and the achieved GFLOP/s counted on real
                  tokens (useful work) and on computed tokens (what the machine did), each also as a fraction of (a).
  (c) LoRA on random batches (train.batching=random): the same examples per step, seed and model as the LoRA run of
                  (b); the ratio sorted / random of real tokens/s (and of s/step), and the padding fraction of each plan.
                  benchmarks/batching.py compares every batching and transformers' Trainer.

The FLOP count (lora_sweep/flops.py, printed before the runs with its check). Only matrix products are counted. Per token, forward: 2 x
the weights of every linear layer the token passes through (encoder: q, k, v, attention output, FFN in and out;
with LoRA also the adapter's A and B), plus attention 2 x 2 x seq x hidden per layer (QK^T and AV). Per example: 2
x the task head's weights (BERT's pooler and classifier act on the [CLS] token only). Not counted: embeddings
(table lookups: no multiplications), biases, softmax, LayerNorm, GELU, dropout, the loss, the optimizer. Backward,
per linear layer: 1x forward for the input gradient when its input needs one, plus 1x for the weight gradient when
its weight is trained; which applies is read from the model itself (a forward hook on every nn.Linear records
whether its input and weight require grad): full FT = 3x forward everywhere; LoRA = 2x on the frozen layers (input
gradients only), except the first layer's frozen q, k, v, whose input (the frozen embeddings) needs no gradient: no
backward (1x, the forward alone; 1.96x on average over the encoder); adapter and head 3x. Attention backward = 2x
its forward (both operands get gradients). The useful count puts each example at its own length (attention over its
real tokens); the computed count puts every example at the batch's padded length (which is what the kernels
compute). The count is checked on one padded batch against torch.utils.flop_counter, which sees the same matrix
products (on CPU it cannot see the fused SDPA attention kernel: counted analytically).

How to read the output: the FLOP model and its check; one line per run as it finishes; then (a), the table of (b)
(medians over repeats), and the ratio lines, each the median of the per-repeat ratios with a distribution-free
interval for that median (order statistics: the min-max range below 6 repeats, which holds the median with
probability 1 - 2^(1-n), 94 % for the default 5; >= 95 % from 6 repeats on) and its half-width in %. Absolute
timings vary 10-30 % between machines of the same kind, and with other load on this one: compare ratios measured
in one run. Small models on CPU reach a small fraction of the large-matmul peak (small matrices, and the unfused
element-wise work the count leaves out, and AdamW over 22.7M weights for full FT); the FFN-shaped matmul shows
what the model's shapes allow. On a busy machine torch's threads slow down many-fold: measure on a quiet one.

    python benchmarks/throughput.py                        # defaults: 50 steps x 5 repeats, all cores (about 5 min on 2 quiet cores)
    python benchmarks/throughput.py --steps 5 --repeats 2  # a quick check that it works
    python benchmarks/throughput.py method.r=64 method.targets=all_linear   # any Hydra override of the LoRA run
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import common
from lora_sweep import batching, timing
from lora_sweep.flops import FlopModel, flop_model

LINEAR_OPS = ("mm", "addmm")  # what nn.Linear runs as, forward and backward; any other counted op is attention
Rows = tuple[tuple[str, str, str], ...]  # the training variants: (name as printed, method, plan), full FT first


def counted_flops(model: nn.Module, batch: dict, device: str) -> tuple[float, float]:
    """torch.utils.flop_counter's count of one forward + backward: (linear products, everything else it saw)."""
    with FlopCounterMode(display=False) as counter:
        with common.autocast(device):
            loss = model(**batch).loss
        loss.backward()
    ops = counter.get_flop_counts()["Global"]
    linear = sum(v for op, v in ops.items() if str(op).split(".")[-1] in LINEAR_OPS)
    return float(linear), float(sum(ops.values()) - linear)


def flop_models(bench: common.Bench, plans: dict[str, batching.Plan], tokens: dict[str, dict]) -> tuple[dict[str, FlopModel], Any]:
    """Each method's FLOP model, read off its own model and checked on one padded batch against torch's counter (the
    GFLOP/s below are only as right as this count), and the model's config (the FFN-shaped matmul's shape)."""
    example = batching.load_batch(bench.train_set, plans["random"].batches[0], bench.collate, bench.device)
    flops: dict[str, FlopModel] = {}
    config = None
    print("\nFLOP model (matrix products only; training = forward + backward; per token unless said):")
    for name in ("full", "lora"):
        model = common.build_model(bench, bench.method(name)).to(bench.device)
        flops[name] = flop_model(model, example)
        config = model.config
        show_flop_model(bench.label(name), flops[name], counted_flops(model, example, bench.device), example["input_ids"].shape)
        del model
    for name in ("full", "lora"):
        useful, computed = flops[name].plan(plans["sorted"], bench.lengths)
        real = tokens["sorted"]["real_tokens"]
        print(f"  {bench.label(name)}, sorted plan: {useful / real / 1e6:.1f} MFLOP per real token "
              f"(useful), {computed / real / 1e6:.1f} computed per real token")
    return flops, config


def show_flop_model(label: str, fm: FlopModel, counted: tuple[float, float], shape: tuple[int, int]) -> None:
    """One method's count per group of layers, and the check: the count of one padded batch of `shape` beside torch's."""
    (b, p), (linear, other) = shape, counted
    ours_linear = b * p * fm.token_train + b * fm.example_train
    ours_attention = b * p * fm.attention_train * p
    print(f"  {label}:")
    for kind, (weights, fwd, train) in fm.groups.items():
        unit = "example" if kind == "task head" else "token"
        print(f"    {kind:<16s} {weights / 1e6:8.3f} M weights  forward {fwd / 1e6:7.2f} MFLOP/{unit}  "
              f"training {train / 1e6:7.2f} MFLOP/{unit} ({train / fwd:.2f}x forward)")
    print(f"    attention        forward {fm.attention_fwd:.0f} x seq FLOP/token, training 3x: {fm.attention_train:.0f} x seq "
          f"(seq = the example's own length for the useful count, the batch's padded length for the computed count)")
    check = f"attention analytic {ours_attention / 1e9:.3f} vs counted {other / 1e9:.3f} GFLOP" if other else \
        f"attention {ours_attention / 1e9:.3f} GFLOP analytic only (the counter does not see this device's fused attention kernel)"
    print(f"    check on one padded batch ({b} x {p} tokens, forward + backward): linear layers analytic {ours_linear / 1e9:.3f} "
          f"vs torch.utils.flop_counter {linear / 1e9:.3f} GFLOP ({100 * (ours_linear / linear - 1):+.2f} %); {check}")


def matmul_variant(device: str, dtype: torch.dtype, ffn: tuple[int, int, int]) -> Callable[[], dict[str, float]]:
    """(a): the machine's dense matmul rate, and that of the model's own FFN shape, measured in the same repeat as training."""
    def matmul() -> dict[str, float]:
        return {"gflops": common.matmul_gflops(device, dtype), "gflops_ffn": common.matmul_gflops(device, dtype, *ffn)}
    return matmul


def training_variant(bench: common.Bench, flops: FlopModel, name: str, default: batching.Plan) -> Callable[..., dict[str, float]]:
    """(b), (c): one real run of method `name` on `default` (or a warm-up plan); one that did not train exactly the
    plan's steps and tokens would make the FLOP count wrong: an error, not a figure."""
    def run(plan: batching.Plan | None = None) -> dict[str, float]:
        plan = plan or default
        result = common.run_harness(bench, bench.method(name), plan)
        expected = batching.token_counts(plan.batches, bench.lengths)
        if result.steps != len(plan.steps) or result.real_tokens != expected["real_tokens"]:
            raise RuntimeError(f"{name}: the harness ran {result.steps} steps / {result.real_tokens} real tokens, not the plan's "
                               f"({result.divergence or 'tokens differ'})")
        useful, computed = flops.plan(plan, bench.lengths)
        s = result.seconds
        return {**common.rates(result), "computed_tok_per_s": result.computed_tokens / s,
                "gflops_useful": useful / s / 1e9, "gflops_computed": computed / s / 1e9}
    return run


def show(r: dict[str, float]) -> str:
    """One run's line as it finishes."""
    if "gflops_ffn" in r:
        return f"{r['gflops']:7.1f} GFLOP/s ({common.MATMUL_N}^3), {r['gflops_ffn']:7.1f} GFLOP/s (FFN shape)"
    return f"{r['s_per_step']:.4f} s/step  {r['tok_per_s']:8.0f} real tok/s  {r['gflops_useful']:6.1f} useful GFLOP/s"


def measure(bench: common.Bench, rows: Rows, plans: dict[str, batching.Plan], flops: dict[str, FlopModel], dtype: torch.dtype,
            ffn: tuple[int, int, int], repeats: int, start: float) -> dict[str, list[dict[str, float]]]:
    """Every variant warmed up on a short plan of its own batching, then the matmul and the three runs interleaved."""
    matmul = matmul_variant(bench.device, dtype, ffn)
    variants = {"matmul": matmul, **{v: training_variant(bench, flops[name], name, plans[g]) for v, name, g in rows}}
    warm = {g: bench.schedule(g, steps=common.WARMUP_STEPS) for g in plans}
    warm_ups = [matmul, *(lambda v=v, g=g: variants[v](warm[g]) for v, _, g in rows)]
    return common.warm_then_time(warm_ups, variants, repeats, show, start, lead="\n")


def of_peak(runs: dict[str, list[dict[str, float]]], variant: str, key: str) -> list[float]:
    """A variant's GFLOP/s per repeat as a fraction of that repeat's matmul rate."""
    return [r[key] / m["gflops"] for r, m in zip(runs[variant], runs["matmul"])]


def report_matmul(runs: dict, dtype: torch.dtype, threads: int, ffn: tuple[int, int, int]) -> None:
    """(a): the peak every training figure is read against."""
    rows, hidden, inter = ffn
    n = common.MATMUL_N
    print(f"(a) dense {str(dtype).removeprefix('torch.')} matmul {n}x{n}x{n}, {threads} threads, GFLOP/s: "
          f"{timing.spread([r['gflops'] for r in runs['matmul']], '.1f')}")
    print(f"    FFN-shaped matmul [{rows} x {hidden}] @ [{hidden} x {inter}] (the median sorted micro-batch's computed tokens), "
          f"GFLOP/s: {timing.spread([r['gflops_ffn'] for r in runs['matmul']], '.1f')}")


def report_training(bench: common.Bench, runs: dict, rows: Rows, tokens: dict[str, dict]) -> None:
    """(b): the table of the three runs, medians over repeats."""
    med = lambda name, key: common.median(runs[name], key)  # noqa: E731
    print(f"(b) training, {bench.settings.task.name} on {bench.settings.model.name}; GFLOP/s and '/(a)' per repeat against that repeat's matmul")
    print(f"    {'variant':<30s} {'s/step':>8s} {'real tok/s':>10s} {'comp tok/s':>10s} {'padding':>8s} "
          f"{'useful GF/s':>11s} {'comp GF/s':>10s} {'useful/(a)':>10s} {'comp/(a)':>9s}")
    for variant, _, plan_name in rows:
        useful_frac, comp_frac = of_peak(runs, variant, "gflops_useful"), of_peak(runs, variant, "gflops_computed")
        print(f"    {variant:<30s} {med(variant, 's_per_step'):8.4f} {med(variant, 'tok_per_s'):10.0f} {med(variant, 'computed_tok_per_s'):10.0f} "
              f"{100 * tokens[plan_name]['padding_fraction']:7.1f}% {med(variant, 'gflops_useful'):11.2f} {med(variant, 'gflops_computed'):10.2f} "
              f"{100 * statistics.median(useful_frac):9.1f}% {100 * statistics.median(comp_frac):8.1f}%")


def report_ratios(bench: common.Bench, runs: dict, rows: Rows, flops: dict[str, FlopModel], default: batching.Plan) -> None:
    """(b), what it amounts to: the fraction of the peak reached, and LoRA's time against full FT's beside what FLOPs predict."""
    (v_full, _, _), (v_lora, _, _), _ = rows
    for variant, name, _ in rows[:2]:
        print(f"    {bench.label(name)} useful GFLOP/s / (a): {timing.spread(of_peak(runs, variant, 'gflops_useful'))}")
    comp_full, comp_lora = flops["full"].plan(default, bench.lengths)[1], flops["lora"].plan(default, bench.lengths)[1]
    print(f"    LoRA / full FT s/step: {common.ratio(runs, v_lora, v_full, 's_per_step')}  "
          f"(their matmul FLOPs alone would give {comp_lora / comp_full:.3f})")


def report_batching(bench: common.Bench, runs: dict, rows: Rows, tokens: dict[str, dict], steps: int) -> None:
    """(c): what sorted micro-batches buy over random batches, same examples per step."""
    _, (v_lora, _, _), (v_random, _, _) = rows
    print(f"(c) sorted micro-batches vs random batches, {bench.label('lora')}, same {steps} steps and seed: padding "
          f"{100 * tokens['sorted']['padding_fraction']:.1f} % sorted, {100 * tokens['random']['padding_fraction']:.1f} % random "
          f"({tokens['sorted']['real_tokens']} vs {tokens['random']['real_tokens']} real tokens per run)")
    print(f"    sorted / random real tokens/s: {common.ratio(runs, v_lora, v_random, 'tok_per_s')}")
    print(f"    random / sorted s/step:        {common.ratio(runs, v_random, v_lora, 's_per_step')}")


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.common_arguments(parser, steps=50, repeats=5)
    args, bench = common.parse(parser, lora_only="throughput.py compares full FT with a LoRA run")
    common.header("training throughput against dense matmul throughput", bench, args)
    dtype = torch.bfloat16 if bench.device == "cuda" else torch.float32
    plans = {"sorted": bench.schedule(), "random": bench.schedule("random")}
    tokens = {k: batching.token_counts(p.batches, bench.lengths) for k, p in plans.items()}
    flops, config = flop_models(bench, plans, tokens)
    ffn_rows = int(statistics.median(batching.padded_tokens(b, bench.lengths) for b in plans["sorted"].batches))
    ffn = (ffn_rows, config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size))
    rows = ((f"{bench.label('full')}, sorted", "full", "sorted"), (f"{bench.label('lora')}, sorted", "lora", "sorted"),
            (f"{bench.label('lora')}, random", "lora", "random"))

    start = time.perf_counter()
    runs = measure(bench, rows, plans, flops, dtype, ffn, args.repeats, start)
    print(f"\nresults ({args.steps} steps of {bench.train.batch_size} per run, medians over {args.repeats} repeats; "
          f"wall time {common.elapsed(start)}):")
    report_matmul(runs, dtype, bench.threads, ffn)
    report_training(bench, runs, rows, tokens)
    report_ratios(bench, runs, rows, flops, plans["sorted"])
    report_batching(bench, runs, rows, tokens, args.steps)


if __name__ == "__main__":
    main()
