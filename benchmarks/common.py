"""Set-up shared by the benchmarks (their interleaved repeats and statistics are lora_sweep.timing's).

Everything a benchmark trains goes through the harness's own code, as `experiment._train_and_measure` does:
`settings.compose` -> `experiment.plan` -> `data.prepare` (the token cache) -> the family's `collator` ->
`batching.train_plan` -> the family's `load_model` + `adapters.apply_method` -> `train.fit`; only the memory
probe is off (it measures memory, not speed), unless a benchmark asks for it.

The timing benchmarks also share their command line (`argument_parser`, `common_arguments`, `parse`), the warm-up
before the interleaved repeats (`warm_then_time`) and the way a ratio of two variants is summarised (`ratio`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import platform
import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterable

import torch
from transformers import AutoTokenizer, set_seed

from lora_sweep import adapters, batching, data, distributed, experiment, runtime, timing
from lora_sweep.settings import MethodSettings, Settings, TrainSettings, compose
from lora_sweep.train import TrainResult, fit, optimizer_for

WARMUP_STEPS = 3  # steps of the untimed run each variant makes before anything is timed
MATMUL_N = 2048  # the dense matmul whose throughput is the machine's peak: MATMUL_N x MATMUL_N x MATMUL_N


@dataclasses.dataclass
class Bench:
    """One composed experiment and its tokenized training data, shared by every variant of a benchmark."""

    settings: Settings
    plan: experiment.Plan
    tokenizer: Any
    tokens: Any  # datasets.DatasetDict of the tokenized train / tune / dev splits (data.prepare)
    train_set: Any  # datasets.Dataset of input_ids, attention_mask, token_type_ids, label (no id), as fit sees it
    lengths: list[int]  # tokens per training example
    collate: Callable
    threads: int

    @property
    def train(self) -> TrainSettings:
        return self.settings.train

    @property
    def device(self) -> str:
        return self.plan.device

    def method(self, name: str) -> MethodSettings:
        """The run's LoRA method (`lora`, as composed) or its paired full-FT baseline (`full`)."""
        return self.plan.method if name == "lora" else self.settings.baseline

    def label(self, name: str) -> str:
        return method_label(self.method(name))

    def schedule(self, mode: str | None = None, steps: int | None = None) -> batching.Plan:
        """The batches a real run of `steps` optimizer steps would train on with `mode` (default: the composed
        train.batching); the same seed gives the same plan."""
        t = self.train
        return batching.train_plan(self.lengths, t.batch_size, steps or t.max_steps, t.grad_accum, t.seed, mode or t.batching,
                                   t.micro_batch_floor)


def trained_method(settings: Settings) -> MethodSettings:
    """The method a composed experiment trains: its LoRA method, or with method=full the full-FT baseline's settings
    (the learning rate a real full-FT run uses)."""
    return settings.method if settings.method.name == "lora" else settings.baseline


def method_label(method: MethodSettings) -> str:
    """How the figures name a method: "full FT", or "LoRA r=<rank> <targets>" as composed."""
    return "full FT" if method.name == "full" else f"LoRA r={method.r} {method.targets}"


def setup(steps: int, threads: int, overrides: list[str] = ()) -> Bench:
    """Compose the default experiment (LoRA r=8 qv on SST-2, embedded MiniLM) with `steps` steps and the
    memory probe off, set torch's threads (0 = all cores), and load the tokens (cached after the first call)."""
    settings = compose(f"train.max_steps={steps}", "train.memory_probe=false", "train.save_adapter=false",
                       "pair_baseline=false", *overrides)
    runtime.quiet_libraries()
    p = experiment.plan(settings)
    n_threads = runtime.resolve_threads(threads)
    torch.set_num_threads(n_threads)
    s = settings
    tokenizer = AutoTokenizer.from_pretrained(p.model_path, revision=s.model.revision)
    tokens, _ = data.prepare(p.family, s, p.source, tokenizer, data.tokenizer_id(s))
    train_set = tokens["train"].remove_columns("id")
    lengths = [len(ids) for ids in train_set["input_ids"]]
    return Bench(s, p, tokenizer, tokens, train_set, lengths, p.family.collator(tokenizer), n_threads)


def build_model(bench: Bench, method: MethodSettings) -> torch.nn.Module:
    """The model a run trains, built as `experiment._train_and_measure` builds it (seeded head and adapter; AdaLoRA's
    schedule over the composed train.max_steps)."""
    set_seed(bench.train.seed)
    model = bench.plan.family.load_model(bench.plan.model_path, bench.settings)
    model, _ = adapters.apply_method(model, method, bench.plan.family.TASK_TYPE, bench.train.max_steps)
    return model


def run_harness(bench: Bench, method: MethodSettings, schedule: batching.Plan, memory_probe: bool = False,
                model: torch.nn.Module | None = None) -> TrainResult:
    """One training run through the harness's `fit` on `model` (default: a fresh one), AdaLoRA's allocation after every
    update as in a real run; `result.seconds` times the steps only."""
    model = model if model is not None else build_model(bench, method)
    train = dataclasses.replace(bench.train, memory_probe=memory_probe)
    gc.collect()
    return fit(distributed.make_accelerator(bench.device, "none"), model, bench.train_set, bench.collate, schedule, method, train,
               after_update=adapters.adalora_step(model, method))


def synthetic_step(model: torch.nn.Module, method: MethodSettings, settings: Settings, shape: tuple[int, int], device: str,
                   autocast) -> tuple[Callable[[], float], torch.optim.Optimizer]:
    """train.fit's optimizer step (forward under `autocast`, backward, clipping, AdamW step, zero_grad) on synthetic
    ids of exactly `shape` (batch, seq): every example `seq` real tokens, so the memory model applies exactly.
    Returns the step (its loss, read back: it waits for the device) and its optimizer (what the memory probe wraps)."""
    batch, seq = shape
    model.train()
    optimizer = optimizer_for(model, method, settings.train)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(100, model.config.vocab_size, (batch, seq), device=device)
    labels = ids if settings.task.family == "instruct" else torch.zeros(batch, dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def step() -> float:
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, optimizer


def matmul_gflops(device: str, dtype: torch.dtype, m: int = MATMUL_N, k: int = MATMUL_N, n: int = MATMUL_N, calls: int = 5) -> float:
    """Median GFLOP/s of `calls` timed (after warm-up) [m x k] @ [k x n] products (each timing long enough to measure: >= 50 ms)."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)

    def timed(reps: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        synchronize(device)
        return time.perf_counter() - start

    timed(2)  # warm-up
    reps = max(1, math.ceil(0.05 / max(timed(1), 1e-6)))
    return statistics.median(2 * m * k * n * reps / timed(reps) / 1e9 for _ in range(calls))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def header(title: str, bench: Bench, args) -> None:
    """What was measured and where: the figures below only compare with figures from this same run."""
    device = torch.cuda.get_device_name() if bench.device == "cuda" else f"CPU ({cpu_name()})"
    t = bench.train
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"{title}\n  {bench.settings.model.name} on {bench.settings.task.name}, batch {t.batch_size} x grad_accum {t.grad_accum}, "
          f"max {t.max_seq_len} tokens, seed {t.seed}, {args.steps} steps per run, {args.repeats} repeats (order rotated), "
          f"{WARMUP_STEPS}-step warm-up per variant\n  device: {device}, torch {torch.__version__}, {bench.threads} torch threads "
          f"of {os.cpu_count()} cores, load average {load}", flush=True)


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """The benchmark's command line: its docstring's first line as the description and the rest, kept as written,
    after the options in --help (what is measured and how to read the output belong beside the options)."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def common_arguments(parser, steps: int, repeats: int, threads: int = 0) -> None:
    """The options every timing benchmark takes, with its own defaults: a benchmark that measures what one of the main
    job's parallel runs does defaults to its one thread."""
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per timed run (default {steps})")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"interleaved repeats of every variant (default {repeats})")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch threads (default {threads}{': all cores' if threads == 0 else ''})")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the composed experiment, e.g. method.r=16 train.batch_size=16")


def parse(parser: argparse.ArgumentParser, lora_only: str | None = None) -> tuple[argparse.Namespace, Bench]:
    """The command line and the experiment it composes; `lora_only` (what the benchmark does) refuses a run that
    overrides method=lora away, for a benchmark whose figures are about a LoRA run."""
    args = parser.parse_args()
    bench = setup(args.steps, args.threads, args.overrides)
    if lora_only and bench.method("lora").name != "lora":
        parser.error(f"{lora_only}: leave method=lora")
    return args, bench


def autocast(device: str):
    """The precision the harness trains in: bf16 autocast on CUDA, plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()


def run_checked(bench: Bench, plan: batching.Plan, memory_probe: bool = False) -> TrainResult:
    """The composed LoRA run on `plan`; one that stopped early (divergence) would time fewer steps: an error, not a figure."""
    result = run_harness(bench, bench.method("lora"), plan, memory_probe=memory_probe)
    if result.steps != len(plan.steps):
        raise RuntimeError(f"the harness stopped after {result.steps} steps: {result.divergence}")
    return result


def rates(result: TrainResult) -> dict[str, float]:
    """Seconds per optimizer step and real (unpadded) tokens per second of one run: the figures every variant shares."""
    return {"s_per_step": result.seconds / result.steps, "tok_per_s": result.real_tokens / result.seconds}


def warm_then_time(warm_ups: Iterable[Callable[[], object]], variants: dict[str, Callable[[], dict[str, float]]], repeats: int,
                   show: Callable[[dict[str, float]], str], start: float, lead: str = "  ") -> dict[str, list[dict[str, float]]]:
    """Run `warm_ups` untimed (first-call allocations and lazy set-up must not land in any variant's first timing),
    then every variant `repeats` times, interleaved by lora_sweep.timing so that a drift of the machine hits all."""
    for run in warm_ups:
        run()
    print(f"{lead}warm-up done ({elapsed(start)}); timed runs:", flush=True)
    return timing.interleaved(variants, repeats, show)


def median(runs: list[dict[str, float]], key: str) -> float:
    """The median over repeats of one figure of a variant's runs."""
    return statistics.median(r[key] for r in runs)


def ratio(runs: dict[str, list[dict[str, float]]], a: str, b: str, key: str) -> str:
    """Variant a / variant b of `key`, taken within each repeat, as a median with its interval (timing.spread)."""
    return timing.spread(timing.ratios(runs[a], runs[b], key))


def elapsed(start: float) -> str:
    return f"{time.perf_counter() - start:.0f} s"
