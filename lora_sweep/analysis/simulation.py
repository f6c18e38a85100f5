"""Simulated rank sweeps with the harness's own noise: the error rates of the sequential verdicts
(tests/test_adaptive.py) and what an adaptive sweep saves against the fixed grid (benchmarks/adaptive.py).

One rank's paired per-seed differences from full FT (display units) are drawn as Δ_s = μ + c + b_s: c ~ N(0,
v_shared) is the eval set's draw, the same at every seed and every look; b_s ~ N(0, v_seed) is the seed's. What the
harness estimates at n seeds (lora_sweep/analysis/stats.py) is then V_seed = var_s(Δ_s) / n and V_ex = v_shared + v_flip / n
(its bootstrap over examples, v_flip being the part of the example noise that changes with the seed). Every verdict
is the harness's own: stats.sequential_status for the adaptive sweep, the 95 % interval for the fixed grid, and
adaptive.answer for what a sweep concludes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_sweep.analysis import adaptive, stats


@dataclass(frozen=True)
class Noise:
    """The noise of one rank's paired difference from full FT, display units squared."""

    v_seed: float  # one seed's Δ around the rank's mean (between seeds)
    v_shared: float  # the eval set's draw, shared by every seed
    v_flip: float = 0.0  # the seed-dependent part of the example noise (also inside v_seed): V_ex = v_shared + v_flip / n


@dataclass(frozen=True)
class Measured:
    """What the committed records say: each rank's Δ, and the noise read two ways. `interval`: as the interval
    models it (V_seed is all training noise, V_ex all the eval set's); `split`: V_ex split by how it shrinks from one
    seed to all of them (v_flip, then counted twice by the interval, which makes it conservative)."""

    deltas: dict[int, float]
    seeds: int
    interval: Noise
    split: Noise


def measure(records_dir: str | Path) -> Measured:
    """Read each rank's paired result against full FT from the records (analysis.tables), and the variance
    components pooled over ranks: v_seed from the per-seed differences, V_ex at all seeds and at each single seed."""
    from lora_sweep.analysis import tables
    from lora_sweep.analysis.load import load_records

    df, _ = load_records(records_dir)
    agg = tables.aggregate(df)
    ranks = tables.compare_ranks(df, agg)
    ranks = ranks[ranks["delta"].notna() & ~ranks["targets"].str.contains("rank_pattern")]
    deltas, per_seed_var, v_all, v_one, seeds = {}, [], [], [], 0
    for _, row in ranks.iterrows():
        full = agg[agg["config_id"] == row["full_config_id"]].iloc[0]
        result = tables.compare(df, row, full)
        deltas[int(row["r"])] = result.delta
        seeds = result.n_seeds
        per_seed_var.append(np.var(result.per_seed, ddof=1))
        v_all.append(result.var_examples)
        v_one += [tables.compare(df[df["seed"] == seed], row, full).var_examples for seed in row["seeds"]]
    v_seed, v_all, v_one = float(np.mean(per_seed_var)), float(np.mean(v_all)), float(np.mean(v_one))
    v_flip = (v_one - v_all) * seeds / (seeds - 1)  # V_ex(1) − V_ex(S) = v_flip (1 − 1/S)
    return Measured(deltas, seeds, Noise(v_seed, v_all), Noise(v_seed, v_one - v_flip, v_flip))


def draw(means, noise: Noise, sims: int, max_seeds: int, rng: np.random.Generator) -> np.ndarray:
    """Per-seed differences, shape (sims, ranks, max_seeds)."""
    means = np.asarray(means, dtype=float)
    shared = rng.normal(0, np.sqrt(noise.v_shared), (sims, len(means), 1))
    return means[None, :, None] + shared + rng.normal(0, np.sqrt(noise.v_seed), (sims, len(means), max_seeds))


def estimates(per_seed: np.ndarray, noise: Noise, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Δ̄, V_seed, V_ex) the harness would estimate from the first n seeds."""
    first = per_seed[..., :n]
    return first.mean(axis=-1), first.var(axis=-1, ddof=1) / n, np.full(first.shape[:-1], noise.v_shared + noise.v_flip / n)


def sequential_looks(per_seed: np.ndarray, noise: Noise, margin: float, initial_seeds: int,
                     max_seeds: int) -> tuple[np.ndarray, np.ndarray]:
    """Status (1 qualifies, −1 worse, 0 open) and resolvable at every look, shape (..., looks)."""
    found = [stats.sequential_status(*estimates(per_seed, noise, n), n, margin, initial_seeds, max_seeds)
             for n in range(initial_seeds, max_seeds + 1)]
    return np.stack([f[0] for f in found], axis=-1), np.stack([f[3] for f in found], axis=-1)


def naive_looks(per_seed: np.ndarray, noise: Noise, margin: float, initial_seeds: int, max_seeds: int) -> np.ndarray:
    """Status at every look from the one-look 95 % interval (what the report's tables show), re-checked each time."""
    found = []
    for n in range(initial_seeds, max_seeds + 1):
        delta, var_seed, var_examples = estimates(per_seed, noise, n)
        half, _ = stats._half_width(var_seed, var_examples, n, 0.95)
        found.append(np.where(delta - half > -margin, 1, np.where(delta + half < -margin, -1, 0)))
    return np.stack(found, axis=-1)


def first_claim(status: np.ndarray) -> np.ndarray:
    """The first claim made over the looks (a rank always given the next seed until one is made), 0 if none."""
    decided = status != 0
    return np.where(decided.any(axis=-1), np.take_along_axis(status, decided.argmax(axis=-1)[..., None], -1)[..., 0], 0)


CODES = {1: adaptive.QUALIFIES, -1: adaptive.WORSE, 0: adaptive.OPEN}


def _label(result: adaptive.Answer) -> str:
    return f"r={result.rank}" if result.rank is not None else ("none" if result.decided else "open")


@dataclass(frozen=True)
class Outcome:
    """Simulated sweeps of one scenario: each sweep's answer ("r=4", "none": every rank worse, "open") for the
    adaptive sweep and the fixed grid on the same draws, and the seeds each rank got."""

    adaptive: list[str]
    grid: list[str]
    seeds: np.ndarray  # (sims, ranks): the adaptive sweep's seeds per rank
    max_seeds: int

    def runs(self) -> np.ndarray:
        """Training runs per adaptive sweep: its LoRA runs and one full-FT baseline per seed used."""
        return self.seeds.sum(axis=1) + self.seeds.max(axis=1)

    def grid_runs(self) -> int:
        return (self.seeds.shape[1] + 1) * self.max_seeds


def sweep(ranks: list[int], means, noise: Noise, margin: float, initial_seeds: int, max_seeds: int, sims: int,
          rng: np.random.Generator) -> Outcome:
    """Adaptive sweeps (analysis.adaptive deciding round by round) and the fixed grid at max_seeds, on the same draws."""
    per_seed = draw(means, noise, sims, max_seeds, rng)
    status, resolvable = sequential_looks(per_seed, noise, margin, initial_seeds, max_seeds)
    grid_status = naive_looks(per_seed, noise, margin, max_seeds, max_seeds)[..., 0]
    answers, grid, used = [], [], np.full((sims, len(ranks)), initial_seeds)
    for s in range(sims):
        n = dict.fromkeys(range(len(ranks)), initial_seeds)
        while True:
            look = {i: n[i] - initial_seeds for i in n}
            result = adaptive.answer({ranks[i]: CODES[int(status[s, i, look[i]])] for i in n},
                                     {ranks[i]: bool(resolvable[s, i, look[i]]) for i in n})
            if result.decided or not result.to_continue or max(n.values()) >= max_seeds:
                break
            for i in n:
                if ranks[i] in result.to_continue:
                    n[i] += 1
        answers.append(_label(result))
        used[s] = [n[i] for i in range(len(ranks))]
        grid.append(_label(adaptive.answer({r: CODES[int(c)] for r, c in zip(ranks, grid_status[s])})))
    return Outcome(answers, grid, used, max_seeds)
