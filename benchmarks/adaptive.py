"""What an adaptive rank sweep saves against the fixed grid at max_seeds seeds, and how often both give the same
answer: in simulation with the committed records' noise (lora_sweep/analysis/simulation.py), and on a real adaptive sweep when
its results folder holds one (adaptive_sweep.json beside the records).

Scenarios (ranks 1..64; every one simulated --sims times, the adaptive sweep and the grid on the same draws):
  committed            the committed records' Δ per rank taken as the truth, noise as the interval models it
  committed, split     the same Δs, the eval noise split by how it shrinks with seeds (the interval then runs wide)
  committed, redrawn   true Δs drawn around the committed ones with their own uncertainty, 20 draws
  r=8 at the margin    the committed Δs with r=8 at exactly −ε
  all equal            every rank as good as full FT (Δ = 0)
  monotone             Δ rising with rank from −4 to +0.5 points
The answer of a sweep is "r=<smallest qualifying rank>", "none" (every rank worse) or "open"; "same" counts equal
answers, "no contradiction" answers that are equal or where one of them is open. Costs: training runs (LoRA runs
and one full-FT baseline per seed used), optimizer steps (runs × the records' max_steps) and train time (each run
at its method's mean train_s in the records), as adaptive / grid. "grid vs grid" is how often two independent grids
agree: the ceiling any other procedure's agreement with one grid is measured against.

    python benchmarks/adaptive.py                      (--initial 3 --max 6 --sims 1000 --records results/runs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sweep.analysis import adaptive, simulation  # noqa: E402
from lora_sweep.analysis.load import load_records  # noqa: E402
from lora_sweep.analysis.simulation import Noise  # noqa: E402


def scenarios(measured: simulation.Measured, rng: np.random.Generator) -> dict[str, list[tuple[list[float], Noise]]]:
    """Each scenario's (true Δ per rank, noise) pairs: one, or several drawn."""
    ranks = sorted(measured.deltas)
    committed = [measured.deltas[r] for r in ranks]
    spread = np.sqrt(measured.interval.v_seed / measured.seeds + measured.interval.v_shared)
    return {
        "committed": [(committed, measured.interval)],
        "committed, split": [(committed, measured.split)],
        "committed, redrawn": [(list(rng.normal(committed, spread)), measured.interval) for _ in range(20)],
        "r=8 at the margin": [([-1.0 if r == 8 else d for r, d in zip(ranks, committed)], measured.interval)],
        "all equal": [([0.0] * len(ranks), measured.interval)],
        "monotone": [(list(np.linspace(-4, 0.5, len(ranks))), measured.interval)],
    }


def costs(records: str, measured: simulation.Measured) -> tuple[int, dict[str, float]]:
    """The records' optimizer steps per run and mean train seconds per method (what a run costs), printed with the noise."""
    df, _ = load_records(records)
    done = df[df["status"] == "done"]
    steps = int(done["max_steps"].iloc[0])
    seconds = {m: float(done.loc[done["method"] == m, "train_s"].mean()) for m in ("lora", "full")}
    print(f"noise from {records} ({measured.seeds} seeds): interval reading v_seed={measured.interval.v_seed:.3f}, "
          f"V_ex={measured.interval.v_shared:.3f}; split reading v_shared={measured.split.v_shared:.3f}, "
          f"v_flip={measured.split.v_flip:.3f} (points²); train s per run: LoRA {seconds['lora']:.0f}, full FT {seconds['full']:.0f}")
    return steps, seconds


def simulate(cases: list[tuple[list[float], Noise]], ranks: list[int], args: argparse.Namespace, seconds: dict[str, float],
             rng: np.random.Generator) -> dict[str, list]:
    """One scenario's sweeps, adaptive and grid on the same draws plus a second, independent grid: per sweep whether the
    answers agree, the runs trained and the train time as a fraction of the grid's."""
    out = {"same": [], "fine": [], "ceiling": [], "runs": [], "time": []}
    for means, noise in cases:
        sims = max(1, args.sims // len(cases))
        sweep = simulation.sweep(ranks, means, noise, args.margin, args.initial, args.max, sims, rng)
        other = simulation.sweep(ranks, means, noise, args.margin, args.initial, args.max, sims, rng).grid
        out["same"] += [a == g for a, g in zip(sweep.adaptive, sweep.grid)]
        out["fine"] += [a == g or "open" in (a, g) for a, g in zip(sweep.adaptive, sweep.grid)]
        out["ceiling"] += [g == h for g, h in zip(sweep.grid, other)]
        out["runs"] += list(sweep.runs())
        lora, baselines = sweep.seeds.sum(axis=1), sweep.seeds.max(axis=1)
        out["time"] += list((lora * seconds["lora"] + baselines * seconds["full"])
                            / (len(ranks) * args.max * seconds["lora"] + args.max * seconds["full"]))
    return out


def report_log(records: str) -> None:
    """The real adaptive sweep beside the records, if there is one: its runs against the grid's, and its answers."""
    log = adaptive.read_log(adaptive.log_path(records))
    if log:
        trained = len(log["run_ids"])
        points = {x["r"] for g in log["groups"] for x in g["ranks"]}
        grid = (len(points) + 1) * log["settings"]["max_seeds"]
        print(f"\nthe adaptive sweep in {adaptive.log_path(records)}: {trained} runs in {len(log['rounds'])} rounds "
              f"against the grid's {grid} ({trained / grid:.2f}); stopped: {log['stopped']}")
        for g in log["groups"]:
            print(f"  {g['label']}: {g['text']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default="results/runs")
    parser.add_argument("--initial", type=int, default=3)
    parser.add_argument("--max", type=int, default=6)
    parser.add_argument("--sims", type=int, default=1000)
    parser.add_argument("--margin", type=float, default=1.0)
    args = parser.parse_args()

    measured = simulation.measure(args.records)
    steps, seconds = costs(args.records, measured)
    print(f"adaptive: {args.initial} seeds, then up to {args.max}; grid: every rank at {args.max} seeds; margin {args.margin:g}; "
          f"{args.sims} sweeps per scenario\n")
    ranks = sorted(measured.deltas)
    rng = np.random.default_rng(0)
    header = f"{'scenario':20s} {'same':>6s} {'no contra.':>10s} {'grid vs grid':>12s} {'runs':>13s} {'steps':>17s} {'train time':>10s}"
    print(header + "\n" + "-" * len(header))
    totals = []
    grid_runs = (len(ranks) + 1) * args.max
    for name, cases in scenarios(measured, rng).items():
        r = simulate(cases, ranks, args, seconds, rng)
        runs, ratio = np.mean(r["runs"]), np.mean(r["runs"]) / grid_runs
        totals.append((np.mean(r["same"]), ratio))
        print(f"{name:20s} {np.mean(r['same']):6.1%} {np.mean(r['fine']):10.1%} {np.mean(r['ceiling']):12.1%} "
              f"{runs:5.1f}/{grid_runs} {ratio:4.2f} {runs * steps:7.0f}/{grid_runs * steps} {np.mean(r['time']):10.2f}")
    print(f"\nmean over scenarios: same answer {np.mean([t[0] for t in totals]):.1%}, runs {np.mean([t[1] for t in totals]):.2f} of the grid's")
    report_log(args.records)


if __name__ == "__main__":
    main()
