"""The memory model (lora_sweep.estimate) against measurements: this harness's memory probe on both embedded models,
and published peak-memory figures of 1B-70B models, with the "4 x model size" rule beside them.

Part 1 (measured here). For each configuration (model, method, rank, targets, batch, sequence length) the model is
built as a run builds it (family.load_model, adapters.apply_method, train.optimizer_for) in fp32 on CPU and trained
for two optimizer steps on synthetic token ids of exactly that length (every token real, no padding); the second
step (AdamW's state exists) is measured by lora_sweep.memory.probe, the probe every run uses, exactly as train.fit
wraps it (backward, clipping, step, zero_grad). Printed: predicted vs measured peak and its error, and per component
(weights, gradients, optimizer state, activations at the peak) predicted / measured in MiB; where the two put the
peak at different instants (start of backward vs the optimizer step) the line says so. On CUDA the same
configurations also run under bf16 autocast (as lora-sweep trains there) against torch.cuda.max_memory_allocated.
Part 1c probes what the harness does not train with but users at scale do: bf16 weights and gradient checkpointing
(SmolLM2, batch 8 x 32, full FT and LoRA r=8 on q,v).

Part 2 (published). Each published case is estimated with its own precision, batch and length, and printed beside
the published figure with the error, and beside "4 x model size" (weights, gradients and two AdamW moments at the
stored dtype: what accelerate's estimator reports for training with Adam). Sources are cited in docs/memory_model.md.

Part 3 (time). One optimizer step of each embedded model is timed on CPU (median of 3 after a warm-up) and compared
with FLOPs (lora_sweep.flops) / the measured dense-matmul rate: the ratio is the utilization a CPU step reaches.

    python benchmarks/memory_model.py            # all three parts (about 5 minutes on 2 cores)
    python benchmarks/memory_model.py --quick    # 6 configurations, to check that it works
"""

from __future__ import annotations

import gc
import statistics
import time
from contextlib import nullcontext

import torch

import common
from lora_sweep import adapters, estimate, memory
from lora_sweep.task_family import family_for
from lora_sweep.hub import resolve_model
from lora_sweep.settings import Settings, compose
from lora_sweep.train import optimizer_for

MIB = 2**20
MODELS = {"minilm": ("model=minilm_l6", "task=glue/sst2"), "smollm2": ("model=smollm2_135m", "task=instruct/alpaca")}
METHODS = [("method=full",)] + [(f"method.r={r}", f"method.targets={t}") for t in ("qv", "all_linear") for r in (1, 8, 64)]
SHAPES = {"minilm": [(8, 32), (32, 128), (64, 32)], "smollm2": [(8, 32), (4, 128)]}
QUICK = {"minilm": [(8, 32), (32, 128)], "smollm2": [(4, 32)]}
QUICK_METHODS = [("method=full",), ("method.r=8", "method.targets=qv")]

# Published peak memory of single-GPU fine-tuning runs (bytes), with what the estimate needs to redo them.
PUBLISHED = [
    # PEFT method_comparison, MetaMathQA on an L40S: batch 4, max 768 tokens, bf16 weights, AdamW, no checkpointing.
    ("PEFT MetaMathQA: Llama-3.2-3B full FT", ("model=llama3_2_3b", "method=full"), 4, 768, 37_241_225_216),
    ("PEFT MetaMathQA: Llama-3.2-3B LoRA r=32 q,v", ("model=llama3_2_3b", "method.r=32", "method.targets=qv"), 4, 768, 22_273_851_392),
    ("PEFT MetaMathQA: Llama-3.2-3B LoRA r=64 q,v", ("model=llama3_2_3b", "method.r=64", "method.targets=qv"), 4, 768, 22_540_189_696),
]


def settings_for(name: str, overrides: tuple[str, ...], cache_dir: str, *extra: str) -> Settings:
    return compose(*MODELS[name], *overrides, f"cache_dir={cache_dir}", "estimate.device=cpu", "estimate.precision=fp32", *extra)


def measure(settings: Settings, batch: int, seq: int, device: str) -> dict:
    """One probed optimizer step (the second) of the model a run trains, on synthetic ids of length `seq`; bf16 weights
    and gradient checkpointing as estimate.precision and estimate.gradient_checkpointing ask (part 1c)."""
    family = family_for(settings)
    torch.manual_seed(0)
    model = family.load_model(resolve_model(settings.model.name_or_path, settings.cache_dir), settings)
    model = model.to(device, estimate.PRECISIONS[settings.estimate.resolved_precision].weight_dtype)
    if settings.estimate.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model, _ = adapters.apply_method(model, settings.method, family.TASK_TYPE)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    step, optimizer = common.synthetic_step(model, settings.method, settings, (batch, seq), device, autocast)
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        result = {"cuda_peak": torch.cuda.max_memory_allocated(), "cuda_base": base}
    else:
        with memory.probe(model, optimizer, torch.device(device)) as probe:
            step()
        result = {"peak": probe.peak_bytes, **probe.split}
    return result


def mib(x: float) -> str:
    return f"{x / MIB:8.1f}"


def configurations(configs: dict):
    """(model, overrides, batch, seq) of every configuration in `configs`, model by model, method by method."""
    for name, (shapes, methods) in configs.items():
        for overrides in methods:
            for batch, seq in shapes:
                yield name, overrides, batch, seq


def predict_and_measure(name: str, overrides: tuple[str, ...], batch: int, seq: int, cache_dir: str, device: str,
                        *extra: str) -> tuple[estimate.Estimate, dict]:
    """The estimate of one configuration and the measurement of its probed step."""
    s = settings_for(name, overrides, cache_dir, f"estimate.batch_size={batch}", f"estimate.seq_len={seq}", *extra)
    predicted = estimate.estimate(s, common.trained_method(s))
    measured = measure(s, batch, seq, device)
    gc.collect()
    return predicted, measured


def part_probe(configs: dict, cache_dir: str, title: str, *extra: str) -> list[float]:
    """The estimate against the harness's probe, in total and per component, with where each puts the peak."""
    print(f"\n{title} (MiB; error = predicted / measured - 1)")
    print(f"  {'model':<8s} {'method':<22s} {'batch':>5s} {'seq':>4s} {'peak pred':>9s} {'measured':>9s} {'error':>7s}   "
          f"weights p/m          grads p/m            optimizer p/m        activations p/m      peak at")
    errors = []
    for name, overrides, batch, seq in configurations(configs):
        predicted, measured = predict_and_measure(name, overrides, batch, seq, cache_dir, "cpu", *extra)
        err = predicted.peak / measured["peak"] - 1
        errors.append(err)
        probe_at = "optimizer step" if measured["other"] > measured["activations"] else "backward"
        where = predicted.peak_at if probe_at == predicted.peak_at else f"{predicted.peak_at} (probe: {probe_at})"
        parts = "  ".join(f"{mib(getattr(predicted, k))}/{mib(measured[k])}" for k in ("weights", "gradients", "optimizer", "activations"))
        print(f"  {name:<8s} {predicted.label:<22s} {batch:5d} {seq:4d} {mib(predicted.peak):>9s} {mib(measured['peak']):>9s} "
              f"{100 * err:+6.1f}%   {parts}  {where}", flush=True)
    absolute = [abs(e) for e in errors]
    print(f"  peak error over {len(errors)} configurations: median |error| {100 * statistics.median(absolute):.1f} %, "
          f"max |error| {100 * max(absolute):.1f} %, mean error {100 * statistics.mean(errors):+.1f} % (goal: within 5 %)")
    return errors


def part_cuda(configs: dict, cache_dir: str) -> None:
    """The estimate against CUDA's allocator, under the precision lora-sweep trains in on a GPU."""
    print("\nPart 1b (CUDA): bf16 autocast over fp32 weights (as lora-sweep trains on a GPU) vs torch.cuda.max_memory_allocated")
    errors = []
    for name, overrides, batch, seq in configurations(configs):
        predicted, measured = predict_and_measure(name, overrides, batch, seq, cache_dir, "cuda",
                                                  "estimate.device=cuda", "estimate.precision=bf16_autocast")
        err = predicted.peak / measured["cuda_peak"] - 1
        errors.append(err)
        print(f"  {name:<8s} {predicted.label:<22s} {batch:5d} {seq:4d} predicted {mib(predicted.peak)} measured "
              f"{mib(measured['cuda_peak'])} MiB  {100 * err:+6.1f}%", flush=True)
    print(f"  max |error| {100 * max(abs(e) for e in errors):.1f} % over {len(errors)} configurations")


def part_published(cache_dir: str) -> None:
    print("\nPart 2: published peak memory vs the estimate (GB = 1e9 bytes; bf16 weights as published; sources: docs/memory_model.md)")
    print(f"  {'case':<42s} {'published':>9s} {'estimate':>9s} {'error':>7s} {'4x rule':>8s} {'error':>7s}   split of the estimate (GB)")
    for label, overrides, batch, seq, published in PUBLISHED:
        s = compose(*overrides, "task=instruct/alpaca", f"cache_dir={cache_dir}", "estimate.precision=bf16",
                    f"estimate.batch_size={batch}", f"estimate.seq_len={seq}")
        e = estimate.estimate(s, common.trained_method(s))
        rule = 4 * 2 * e.params  # accelerate's estimate-memory for Adam training: 4 x the bf16 model
        split = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in e.components().items() if v)
        print(f"  {label:<42s} {published / 1e9:9.2f} {e.peak / 1e9:9.2f} {100 * (e.peak / published - 1):+6.1f}% "
              f"{rule / 1e9:8.2f} {100 * (rule / published - 1):+6.1f}%   {split}")


def matmul_rate() -> float:
    """FLOP/s of a dense fp32 1024^3 matmul on torch's threads: what a step's FLOPs are read against."""
    threads = torch.get_num_threads()
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    rate = 10 * 2 * n**3 / (time.perf_counter() - start)
    print(f"  dense fp32 matmul {n}^3 on {threads} threads: {rate / 1e9:.1f} GFLOP/s")
    return rate


def time_step(s: Settings, method, batch: int, seq: int) -> tuple[float, list[float]]:
    """The FLOPs of one optimizer step of the model `s` trains on `batch` x `seq` synthetic ids, and the seconds of
    three such steps after a warm-up."""
    from lora_sweep.flops import flop_model

    family = family_for(s)
    model = family.load_model(resolve_model(s.model.name_or_path, s.cache_dir), s)
    model, _ = adapters.apply_method(model, method, family.TASK_TYPE)
    model.train()
    optimizer = optimizer_for(model, method, s.train)
    ids = torch.randint(100, model.config.vocab_size, (batch, seq))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "labels": ids if s.task.family == "instruct" else torch.zeros(batch, dtype=torch.long)}
    flops = flop_model(model, inputs).batch([seq] * batch, padded=True)
    times = []
    for k in range(4):
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if k:
            times.append(time.perf_counter() - start)
    del model, optimizer
    gc.collect()
    return flops, times


def part_time(cache_dir: str) -> None:
    """How much of the matmul rate a CPU training step reaches: the estimate's time assumes a utilization."""
    print("\nPart 3: step time on this CPU vs FLOPs / measured matmul rate (fp32, one optimizer step, median of 3)")
    rate = matmul_rate()
    for name, overrides, batch, seq in (("minilm", ("method=full",), 32, 64), ("minilm", ("method.r=8",), 32, 64),
                                        ("smollm2", ("method.r=8",), 4, 64)):
        s = settings_for(name, overrides, cache_dir)
        method = common.trained_method(s)
        flops, times = time_step(s, method, batch, seq)
        measured = statistics.median(times)
        print(f"  {name:<8s} {common.method_label(method):<16s} batch {batch} x {seq}: "
              f"{flops / 1e9:7.1f} GFLOP/step, at the matmul rate {flops / rate:.3f} s, measured {measured:.3f} s "
              f"(range {min(times):.3f}-{max(times):.3f}): utilization {flops / rate / measured:.2f}")


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a few configurations, to check that it works")
    parser.add_argument("--cache-dir", default=".cache/lora_sweep", help="where the converted SmolLM2 lives (default: the project's cache)")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    configs = {m: (QUICK[m] if args.quick else SHAPES[m], QUICK_METHODS if args.quick else METHODS) for m in MODELS}
    start = time.perf_counter()
    if "1" in parts:
        part_probe(configs, args.cache_dir, "Part 1: predicted vs measured by the harness's memory probe (CPU, fp32)")
        beyond = {"smollm2": ([(8, 32)], QUICK_METHODS)}
        part_probe(beyond, args.cache_dir, "Part 1c: what the harness does not train with, same probe: bf16 weights", "estimate.precision=bf16")
        part_probe(beyond, args.cache_dir, "Part 1c: gradient checkpointing (fp32)", "estimate.gradient_checkpointing=true")
        if torch.cuda.is_available():
            part_cuda(configs, args.cache_dir)
    if "2" in parts:
        part_published(args.cache_dir)
    if "3" in parts:
        part_time(args.cache_dir)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
