"""Paired comparison of two fine-tuning configurations (A: a LoRA configuration; B: full FT or another LoRA one).

Why paired: runs of the same seed share their training batches and every run is evaluated on the same examples,
so comparing A and B seed by seed and example by example cancels the noise they share.

Method (variance components with a Welch–Satterthwaite t interval). For S seeds and n eval examples:

- Δ_s = scale × (metric(A_s) − metric(B_s)) on all n examples, negated when lower is better, so that a positive Δ
  always means A is better; the estimate is Δ̄ = mean_s Δ_s.
- Training noise (between seeds): V_seed = var_s(Δ_s, ddof=1) / S, with S − 1 degrees of freedom.
- Eval-sampling noise (between examples): V_ex = the variance of the seed-averaged Δ̄ over B paired bootstrap
  resamples of the examples, where every seed and both configurations use the same resampled indices and the metric
  is recomputed on each resample (so F1, Matthews, Pearson, Spearman and a loss ratio are handled, not only means);
  B is large, so V_ex is counted as known (infinite degrees of freedom).
- Interval: Δ̄ ± t_{ν, (1+level)/2} × √(V_seed + V_ex), with ν = (V_seed + V_ex)² / (V_seed² / (S − 1))
  (Welch–Satterthwaite); the normal quantile when V_seed = 0.
- One seed: training noise cannot be estimated; the interval then holds eval-sampling noise only (normal quantile)
  and is flagged `seed_noise_known=False`, and no verdict or significance is drawn from it.

Measured coverage of the 95% interval (3 seeds × 800 examples, simulated accuracy with a known true Δ, see
tests/test_stats.py): 0.91-0.93 when training noise dominates (Welch–Satterthwaite with about 2 degrees of freedom
runs a little short), 0.93-0.97 in mixed settings, up to 0.99 when per-example-per-seed flips dominate, since that
part of the noise enters both components. An interval from eval-set noise alone covers 0.4-0.85 in the same settings.

Non-inferiority with margin ε > 0: A qualifies when the interval's low end is above −ε, is worse when its high end
is below −ε, and is otherwise inconclusive. For an inconclusive result, the seeds (at the current eval-set size,
V_seed ∝ 1/seeds) or eval examples (at the current seeds, V_ex ∝ 1/examples) that would bring the half-width down
to |Δ̄ + ε| are found with the same Welch–Satterthwaite quantile, taking the current estimates as the truth.

Sequential verdicts (an adaptive sweep looks at a rank after every round of seeds; `sequential_verdict`). Re-checking
a 95% interval at every look and stopping once it excludes −ε inflates its error. Each of the two claims ("qualifies":
Δ > −ε; "worse": Δ < −ε) keeps its one-sided error at α = 2.5% over all looks by error spending over a fixed maximum
of K = max_seeds − initial_seeds + 1 looks (Lan & DeMets 1983, "Discrete sequential boundaries for clinical trials",
Biometrika 70:659-663), with the O'Brien–Fleming-type spending function α(t) = 2 − 2Φ(z_{1−α/2} / √t) (O'Brien &
Fleming 1979, Biometrics 35:549-556; Jennison & Turnbull 2000, "Group Sequential Methods", ch. 7) at information
fraction t = seeds / max_seeds: the look at n seeds is tested at the one-sided level α(n/N) − α((n−1)/N), the first
(at the initial seeds) at α(initial/N). Those levels sum to α, so by Bonferroni over the looks each claim's error is
at most α whatever rule decides which ranks get more seeds — needed here, because with estimated variances the look
statistics do not follow the Brownian motion the textbook boundaries are computed for. A level this small with 2-5
degrees of freedom is past what the Welch–Satterthwaite quantile approximates (simulated: 2.9% error over looks when
training noise dominates), so each look's one-sided bound is Banerjee's conservative one (Banerjee 1961, Sankhyā A
23:359-378): Δ̄ ∓ √(t²_{S−1, 1−a} V_seed + z²_{1−a} V_ex) at level a. tests/test_adaptive.py simulates the error
rates with the committed records' variance components. A rank is "open" until a claim is made; a rank whose claim
could not be reached by max_seeds even if its current estimates held ("unresolvable": the same projection as the
seeds needed above, with V_ex shrinking as 1/seeds at best) cannot change what the sweep decides, and stopping it
makes no claim, so it costs no error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

_MAX_BLOCK = 1 << 22  # resampled entries per block: bounds memory on large eval sets (QQP: 40k examples)
_MAX_SEEDS = 10_000
_MAX_EXAMPLE_FACTOR = 10_000


def predictions(outputs) -> np.ndarray:
    """What a classification or regression metric scores: a 1-D array is taken as predictions already (labels or
    regression values), an (n, 1) array as a regression head's output, an (n, C) array as logits (their argmax).
    The loss's (n, 2) outputs are not predictions: `loss` reads them as they are."""
    outputs = np.asarray(outputs)
    if outputs.ndim == 1:
        return outputs
    return outputs[:, 0] if outputs.shape[1] == 1 else outputs.argmax(axis=1)


def accuracy(outputs, labels, idx) -> np.ndarray:
    """Fraction correct on each resample (row of `idx`)."""
    return (predictions(outputs) == np.asarray(labels))[idx].mean(axis=1)


def _confusion(outputs, labels, idx) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tp, fp, fn, tn) per resample as floats (their products overflow integers on large eval sets)."""
    pred, labels = predictions(outputs), np.asarray(labels)
    if not (np.isin(pred, (0, 1)).all() and np.isin(labels, (0, 1)).all()):
        raise ValueError("f1 and matthews are binary metrics: predictions and labels must be 0 or 1")
    cell = (2 * labels + pred).astype(np.int64)[idx]  # 0 tn, 1 fp, 2 fn, 3 tp
    rows = idx.shape[0]
    counts = np.bincount((cell + 4 * np.arange(rows)[:, None]).ravel(), minlength=4 * rows).reshape(rows, 4)
    tn, fp, fn, tp = counts.T.astype(float)
    return tp, fp, fn, tn


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (sklearn's convention for an undefined F1 or Matthews)."""
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def f1(outputs, labels, idx) -> np.ndarray:
    """Binary F1 of class 1 on each resample."""
    tp, fp, fn, _ = _confusion(outputs, labels, idx)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def matthews(outputs, labels, idx) -> np.ndarray:
    """Binary Matthews correlation on each resample."""
    tp, fp, fn, tn = _confusion(outputs, labels, idx)
    return _ratio(tp * tn - fp * fn, np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation; NaN for a constant row, as scipy."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(axis=1) / np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))


def pearson(outputs, labels, idx) -> np.ndarray:
    """Pearson correlation of predictions and labels on each resample."""
    return _corr(predictions(outputs).astype(float)[idx], np.asarray(labels, dtype=float)[idx])


def _ranks(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank, as scipy's rankdata) of values[idx] within each resample, by
    counting how often each distinct value is drawn: no sort per resample, and a resample is full of ties."""
    levels, level = np.unique(values, return_inverse=True)
    drawn = level.reshape(-1)[idx]
    rows, n_levels = idx.shape[0], len(levels)
    counts = np.bincount((drawn + n_levels * np.arange(rows)[:, None]).ravel(),
                         minlength=rows * n_levels).reshape(rows, n_levels)
    level_rank = np.cumsum(counts, axis=1) - counts + (counts + 1) / 2
    return np.take_along_axis(level_rank, drawn, axis=1)


def spearman(outputs, labels, idx) -> np.ndarray:
    """Spearman correlation (Pearson on average ranks) of predictions and labels on each resample."""
    return _corr(_ranks(predictions(outputs), idx), _ranks(np.asarray(labels), idx))


def loss(outputs, labels, idx) -> np.ndarray:
    """Loss per response token on each resample: Σ loss_sum / Σ tokens over its examples (a ratio, so long responses
    weigh more, as in the run's own held-out loss). `outputs` is (n, 2): summed response loss, response token count;
    `labels` is unused."""
    outputs = np.asarray(outputs, dtype=float)
    return outputs[:, 0][idx].sum(axis=1) / outputs[:, 1][idx].sum(axis=1)


METRICS: dict[str, Metric] = {
    "accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman, "loss": loss,
}


@dataclass(frozen=True)
class PairedResult:
    """Δ = metric(A) − metric(B) in display units, positive when A is better, with its interval at `level`;
    var_seed and var_examples are the two variance components of Δ (display units squared). var_seed is NaN with one
    seed (unknown); df is infinite when the normal quantile was used."""

    delta: float
    low: float
    high: float
    n_seeds: int
    n_examples: int
    var_seed: float
    var_examples: float
    df: float
    seed_noise_known: bool
    per_seed: tuple[float, ...]
    level: float = 0.95


def _half_width(var_seed, var_examples, n_seeds, level: float):
    """Welch–Satterthwaite half-width (elementwise over arrays); the normal quantile where var_seed is 0."""
    var_seed, var_examples = np.asarray(var_seed, float), np.asarray(var_examples, float)
    total = var_seed + var_examples
    with np.errstate(invalid="ignore", divide="ignore"):
        df = np.where(var_seed > 0, total**2 / (var_seed**2 / (np.asarray(n_seeds) - 1)), np.inf)
    return stats.t.ppf((1 + level) / 2, df) * np.sqrt(total), df


def paired_difference(a: Sequence, b: Sequence, labels, metric: str | Metric, *, higher_is_better: bool = True,
                      scale: float = 100.0, n_boot: int = 2000, level: float = 0.95, rng_seed: int = 0) -> PairedResult:
    """Compare configuration A with B: `a` and `b` hold one array of per-example outputs per seed (the same seeds in
    the same order, every array on the same examples), `labels` the examples' labels (None for the loss)."""
    fn = METRICS[metric] if isinstance(metric, str) else metric
    if len(a) != len(b) or not len(a):
        raise ValueError(f"a and b need the same seeds, at least one: got {len(a)} and {len(b)}")
    n = len(a[0])
    if any(len(x) != n for x in (*a, *b)) or (labels is not None and len(labels) != n):
        raise ValueError("every seed's outputs and the labels must cover the same examples")
    sign = scale if higher_is_better else -scale
    n_seeds = len(a)

    def deltas(idx):  # (resamples, seeds)
        return np.stack([sign * (fn(x, labels, idx) - fn(y, labels, idx)) for x, y in zip(a, b)], axis=1)

    per_seed = deltas(np.arange(n)[None])[0]
    rng = np.random.default_rng(rng_seed)
    block = max(1, _MAX_BLOCK // n)
    boot = np.concatenate([deltas(rng.integers(0, n, size=(min(block, n_boot - start), n)))
                           for start in range(0, n_boot, block)])
    var_examples = float(boot.mean(axis=1).var(ddof=1))
    delta = float(per_seed.mean())
    if n_seeds == 1:
        var_seed, df = math.nan, math.inf
        half = stats.norm.ppf((1 + level) / 2) * math.sqrt(var_examples)
    else:
        var_seed = float(per_seed.var(ddof=1) / n_seeds)
        half, df = map(float, _half_width(var_seed, var_examples, n_seeds, level))
    return PairedResult(delta, delta - half, delta + half, n_seeds, n, var_seed, var_examples, df,
                        n_seeds > 1, tuple(map(float, per_seed)), level)


def differs(result: PairedResult) -> bool:
    """Whether the interval excludes 0 (A and B differ significantly); never with one seed, whose interval
    leaves training noise out."""
    return result.seed_noise_known and (result.low > 0 or result.high < 0)


@dataclass(frozen=True)
class Verdict:
    """Non-inferiority of A against B at `margin` (display units); for an inconclusive result, roughly how many
    seeds (at the current eval-set size) or eval examples (at the current seeds) would resolve it, None if those
    alone cannot."""

    status: str  # "qualifies" | "worse" | "inconclusive"
    margin: float
    seeds_needed: int | None
    examples_needed: int | None
    text: str


def _seeds_needed(r: PairedResult, target: float) -> int | None:
    """Fewest seeds whose half-width reaches `target`, with the per-seed variance and V_ex as estimated now."""
    per_seed_var = r.var_seed * r.n_seeds
    if per_seed_var == 0:
        return None
    seeds = np.arange(r.n_seeds + 1, _MAX_SEEDS + 1)
    half, _ = _half_width(per_seed_var / seeds, r.var_examples, seeds, r.level)
    ok = np.flatnonzero(half <= target)
    return int(seeds[ok[0]]) if len(ok) else None


def _examples_needed(r: PairedResult, target: float) -> int | None:
    """Fewest eval examples whose half-width reaches `target` at the current seeds, taking V_ex ∝ 1 / examples."""
    if r.var_examples == 0:
        return None
    examples = np.unique(np.ceil(r.n_examples * np.geomspace(1, _MAX_EXAMPLE_FACTOR, 2000)[1:]).astype(np.int64))
    half, _ = _half_width(r.var_seed, r.var_examples * r.n_examples / examples, r.n_seeds, r.level)
    ok = np.flatnonzero(half <= target)
    return int(examples[ok[0]]) if len(ok) else None


def _about(count: int) -> str:
    """A count rounded up to two significant figures: an estimate, not a promise."""
    step = 10 ** max(0, len(str(count)) - 2)
    return f"{-(-count // step) * step:,}"


def non_inferiority(result: PairedResult, margin: float, *, unit: str = "points") -> Verdict:
    """Is A no worse than B by more than `margin` (> 0, display units)? Needs at least two seeds to say yes or no."""
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    digits = max(2, 1 - math.floor(math.log10(margin)))  # a margin of 0.02 nats/token needs 3 decimals

    def num(v: float) -> str:
        return f"{v:+.{digits}f}"

    shown = f"Δ = {num(result.delta)}{' ' + unit if unit else ''} [{num(result.low)}, {num(result.high)}]"
    bound = f"{-margin:g}"
    if not result.seed_noise_known:
        return Verdict("inconclusive", margin, None, None,
                       f"inconclusive (one seed: training noise unknown): {shown} holds eval-set noise only; "
                       "run more seeds")
    if result.low > -margin:
        return Verdict("qualifies", margin, None, None, f"qualifies: {shown} > {bound}")
    if result.high < -margin:
        return Verdict("worse", margin, None, None, f"worse: {shown} entirely below {bound}")
    target = abs(result.delta + margin)
    if target == 0:
        return Verdict("inconclusive", margin, None, None,
                       f"inconclusive: {shown} straddles {bound}; the estimate sits on the margin, so no amount of "
                       "data alone resolves it")
    seeds, examples = _seeds_needed(result, target), _examples_needed(result, target)
    options = ([f"about {_about(seeds)} seeds"] if seeds else []) + (
        [f"{_about(examples)} eval examples at {result.n_seeds} seeds"] if examples else [])
    advice = (" or ".join(options) + " would resolve it") if options else \
        "neither more seeds nor more eval examples alone would resolve it"
    return Verdict("inconclusive", margin, seeds, examples, f"inconclusive: {shown} straddles {bound}; {advice}")


SEQUENTIAL_ALPHA = 0.025  # one-sided error of each claim over all looks


def spent_alpha(fraction, alpha: float = SEQUENTIAL_ALPHA):
    """Lan–DeMets O'Brien–Fleming-type spending: the error spent by information fraction `fraction` (0 at 0, α at 1)."""
    fraction = np.asarray(fraction, dtype=float)
    with np.errstate(divide="ignore"):
        return 2 - 2 * stats.norm.cdf(stats.norm.ppf(1 - alpha / 2) / np.sqrt(fraction))


def look_alpha(n_seeds, initial_seeds: int, max_seeds: int, alpha: float = SEQUENTIAL_ALPHA):
    """One-sided level of the look at `n_seeds` paired seeds (elementwise): what the spending function adds from
    n − 1 to n seeds, all it has spent up to the first look at the initial seeds; 0 (no look) below the initial
    seeds or beyond max_seeds."""
    n = np.asarray(n_seeds, dtype=float)
    before = np.where(n > initial_seeds, n - 1, 0) / max_seeds
    level = spent_alpha(n / max_seeds, alpha) - spent_alpha(before, alpha)
    return np.where((n >= initial_seeds) & (n <= max_seeds), level, 0.0)


def sequential_half_width(var_seed, var_examples, n_seeds, level):
    """Banerjee's conservative one-sided half-width at `level` (elementwise): √(t²_{S−1} V_seed + z² V_ex); infinite
    where the level is 0 (no look) or training noise is unknown (one seed)."""
    var_seed, var_examples, n = (np.asarray(x, dtype=float) for x in (var_seed, var_examples, n_seeds))
    level = np.asarray(level, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = stats.t.ppf(1 - level, n - 1)
        z = stats.norm.ppf(1 - level)
        half = np.sqrt(t**2 * var_seed + z**2 * var_examples)
    return np.where((level > 0) & (n >= 2) & np.isfinite(half), half, np.inf)


def sequential_status(delta, var_seed, var_examples, n_seeds, margin: float, initial_seeds: int, max_seeds: int,
                      alpha: float = SEQUENTIAL_ALPHA):
    """Elementwise: (status code, low, high, resolvable) at the look at `n_seeds`; status 1 qualifies, −1 worse,
    0 open. `resolvable`: an open verdict could still be reached by max_seeds if the current estimates held."""
    delta, n = np.asarray(delta, dtype=float), np.asarray(n_seeds)
    half = sequential_half_width(var_seed, var_examples, n, look_alpha(n, initial_seeds, max_seeds, alpha))
    low, high = delta - half, delta + half
    status = np.where(low > -margin, 1, np.where(high < -margin, -1, 0))
    per_seed = np.asarray(var_seed, dtype=float) * n
    last = look_alpha(max_seeds, initial_seeds, max_seeds, alpha)
    at_max = sequential_half_width(per_seed / max_seeds, np.asarray(var_examples, dtype=float) * n / max_seeds,
                                   max_seeds, last)
    resolvable = (status == 0) & (n < max_seeds) & (at_max < np.abs(delta + margin))
    return status, low, high, resolvable


@dataclass(frozen=True)
class SequentialVerdict:
    """A rank's verdict at one look of an adaptive sweep: `low`, `high` are the (1 − 2·alpha) interval of this look,
    `look` its index (1 at the initial seeds), `resolvable` whether more seeds up to max_seeds could still settle
    an open verdict."""

    status: str  # "qualifies" | "worse" | "open"
    n_seeds: int
    look: int
    alpha: float
    low: float
    high: float
    resolvable: bool


def sequential_verdict(result: PairedResult, margin: float, initial_seeds: int, max_seeds: int,
                       alpha: float = SEQUENTIAL_ALPHA) -> SequentialVerdict:
    """Non-inferiority at margin ε of a paired result reached at one look of an adaptive sweep (module docstring)."""
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    code, low, high, resolvable = sequential_status(result.delta, result.var_seed, result.var_examples, result.n_seeds,
                                                    margin, initial_seeds, max_seeds, alpha)
    return SequentialVerdict({1: "qualifies", -1: "worse", 0: "open"}[int(code)], result.n_seeds,
                             result.n_seeds - initial_seeds + 1,
                             float(look_alpha(result.n_seeds, initial_seeds, max_seeds, alpha)),
                             float(low), float(high), bool(resolvable))
