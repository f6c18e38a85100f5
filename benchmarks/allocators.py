"""What an automatic rank allocator adds to a uniform LoRA run's cost, measured side by side in one process.

What is measured. The default experiment (LoRA r=8 on query/value of the embedded MiniLM, SST-2, the main job's 100
steps; any override below) at uniform r's budget, each variant built and trained by the harness's own code
(`+allocator=<name>`, as `+sweep=autorank` composes it) on the same real batches (one plan: train.batching, seed 0):
- uniform: LoRA at r, through `train.fit`;
- AdaLoRA: the same steps at target r (init_r = 1.5 r unless overridden), PEFT's `update_and_allocate` after every
  update as a real run calls it: its importance scores, masks and orthogonality regulariser are the extra per step;
- EVA pass: `experiment.eva_pass` on a freshly built EVA model, the data pass a real EVA run makes before training
  (the plan's first method.eva_examples training examples); the training that follows costs what uniform's does.
The rank advisor trains nothing of its own (it reads full FT's spectra, and every sweep trains full FT as the
baselines), so it is not a variant. Only the steps (and the pass) are timed; model building is not.

How it is timed. One untimed warm-up of each variant (3 steps; the pass once), then `--repeats` repeats of every
variant, interleaved with the order rotated each repeat (lora_sweep.timing), so that a drift of a shared machine hits
all. Each repeat gives the ratios AdaLoRA / uniform (seconds per step) and EVA pass / uniform (the pass against the
uniform run's training seconds: what EVA adds to a run).

How to read the output. One line per run as it finishes, then one line per variant (median seconds), then the two
ratios: the median of the per-repeat ratios with a distribution-free interval for it (min-max below 6 repeats, its
coverage printed). The figures only compare with figures of this same run; absolute seconds vary between machines.
AdaLoRA's schedule needs enough --steps to prune in (the run refuses fewer, naming the value).

    python benchmarks/allocators.py                         # defaults: 100 steps x 5 repeats, all cores (about 8 min on 2 cores)
    python benchmarks/allocators.py --steps 20 --repeats 2  # a quick check that it works
    python benchmarks/allocators.py method.r=16             # any Hydra override of the experiment
"""

from __future__ import annotations

import time
from typing import Callable

import common

from lora_sweep import experiment

ALLOCATORS = ("uniform", "adalora", "eva")  # conf/allocator/: the ones that train (the advisor reads full FT's runs)


def variants(benches: dict[str, common.Bench]) -> dict[str, Callable]:
    """The timed variants, each taking the batch plan it trains on; each returns its figures."""
    def training(name: str):
        bench = benches[name]
        return lambda plan: {"s": (result := common.run_checked(bench, plan)).seconds, **common.rates(result)}

    def eva_pass(plan) -> dict[str, float]:
        bench = benches["eva"]
        model = common.build_model(bench, bench.method("lora")).to(bench.device)
        start = time.perf_counter()
        experiment.eva_pass(bench.plan, model, bench.train_set, plan, bench.collate, bench.device)
        return {"s": time.perf_counter() - start}

    return {"uniform": training("uniform"), "AdaLoRA": training("adalora"), "EVA pass": eva_pass}


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.common_arguments(parser, steps=100, repeats=5)
    args = parser.parse_args()
    benches = {name: common.setup(args.steps, args.threads, [*args.overrides, f"+allocator={name}"]) for name in ALLOCATORS}
    uniform, adalora = benches["uniform"], benches["adalora"].method("lora")
    common.header(f"allocators' cost on top of uniform {uniform.label('lora')}: AdaLoRA (init_r {adalora.initial_r} -> "
                  f"{adalora.r}) and EVA's pass ({benches['eva'].method('lora').eva_examples} examples)", uniform, args)
    plan, warm = uniform.schedule(), uniform.schedule(steps=common.WARMUP_STEPS)
    start = time.perf_counter()
    timed = variants(benches)
    runs = common.warm_then_time([lambda run=run: run(warm) for run in timed.values()],
                                 {name: lambda run=run: run(plan) for name, run in timed.items()}, args.repeats,
                                 lambda r: f"{r['s']:.2f} s", start)
    print(f"\nresults ({args.steps} steps per run; medians over {args.repeats} repeats; wall time {common.elapsed(start)}):")
    for name, values in runs.items():
        print(f"  {name:<10s} {common.median(values, 's'):8.2f} s")
    print(f"  AdaLoRA / uniform, s per step: {common.ratio(runs, 'AdaLoRA', 'uniform', 's_per_step')}")
    print(f"  EVA pass / uniform run's training: {common.ratio(runs, 'EVA pass', 'uniform', 's')}")


if __name__ == "__main__":
    main()
