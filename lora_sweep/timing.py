"""Timings that can be compared: variants interleaved over repeats, each figure summarised by its median, a
distribution-free interval for that median (order statistics) and the min-max range.

Timings are only comparable within one process: variants are interleaved (the order rotates every repeat, so a
slow drift of the machine hits each variant equally) and every ratio is taken within a repeat, then summarised
over repeats. Used by `lora-deploy` (lora_sweep.deploy) and the benchmarks.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable


def interleaved(variants: dict[str, Callable[[], dict[str, float]]], repeats: int,
                show: Callable[[dict[str, float]], str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Run every variant once per repeat, the order rotated each repeat (A B C, B C A, C A B, ...); with `show`, print
    one line per run."""
    names = list(variants)
    out: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for k in range(repeats):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            out[name].append(variants[name]())
            if show:
                print(f"  repeat {k + 1}/{repeats}  {name:<28s} {show(out[name][-1])}", flush=True)
    return out


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free interval for the median of repeats: order statistics x_(k) and x_(n+1-k), with the largest k
    whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least `level` (k = 1, the min-max range, below 6 repeats:
    its coverage 1 - 2^(1-n) is then less: 75 % for 3 repeats, 94 % for 5). Returns (low, high, coverage).

    Exact for any distribution of the timings (unlike a bootstrap, which is unreliable with a handful of repeats);
    from 9 repeats on it leaves out the most extreme repeat on each side, so one disturbed repeat does not widen it."""
    x = sorted(values)
    n = len(x)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k + 1 <= n // 2 and coverage(k + 1) >= level:
        k += 1
    return x[k - 1], x[n - k], coverage(k)


def spread(values: list[float], fmt: str = ".3f") -> str:
    """'median  [C % interval a-b (+-h %); min-max a-b; n repeats]' for a figure measured once per repeat."""
    n = len(values)
    median = statistics.median(values)
    text = f"{median:{fmt}}"
    if n < 2:
        return f"{text}  [1 repeat: no spread]"
    lo, hi, cover = median_interval(values)
    half = 100 * (hi - lo) / 2 / median if median else float("nan")
    return (f"{text}  [{100 * cover:.0f} % interval for the median {lo:{fmt}}-{hi:{fmt}} (+-{half:.1f} %); "
            f"min-max {min(values):{fmt}}-{max(values):{fmt}}; {n} repeats]")


def ratios(num: list[dict[str, float]], den: list[dict[str, float]], key: str) -> list[float]:
    """Per-repeat ratios num[key] / den[key] (runs of the same repeat paired)."""
    return [a[key] / b[key] for a, b in zip(num, den)]


def summary(values: list[float]) -> dict[str, float]:
    """A figure measured once per repeat as a record keeps it: median, the interval of `median_interval`, min, max, n."""
    low, high, cover = median_interval(values) if len(values) > 1 else (values[0], values[0], 0.0)
    return {"median": statistics.median(values), "low": low, "high": high, "coverage": cover,
            "min": min(values), "max": max(values), "n": len(values)}
