"""lora_sweep.analysis.stats: the vectorised metrics against scikit-learn and scipy, the paired interval's coverage of a known
difference on simulated runs, and the non-inferiority verdicts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats as st
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lora_sweep.analysis import stats
from lora_sweep.analysis.stats import differs, non_inferiority, paired_difference

N = 300


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, N)
    logits = rng.normal(size=(N, 2)) + 0.8 * np.eye(2)[labels]
    target = rng.normal(size=N).round(1)  # rounded: ties, which Spearman must average
    regression = (target + rng.normal(size=N)).round(1)
    idx = np.vstack([np.arange(N), rng.integers(0, N, size=(6, N))])  # identity, then random resamples
    return labels, logits, target, regression, idx


def reference(name, outputs, labels, rows):
    pred = stats.predictions(outputs)
    score = {"accuracy": lambda p, y: accuracy_score(y, p), "f1": lambda p, y: f1_score(y, p),
             "matthews": lambda p, y: matthews_corrcoef(y, p), "pearson": lambda p, y: st.pearsonr(p, y)[0],
             "spearman": lambda p, y: st.spearmanr(p, y)[0]}[name]
    return np.array([score(pred[r], np.asarray(labels)[r]) for r in rows])


@pytest.mark.parametrize("name", ["accuracy", "f1", "matthews"])
def test_classification_metrics_equal_sklearn(data, name):
    labels, logits, *_, idx = data
    for outputs in (logits, logits.argmax(axis=1)):  # logits or predicted labels
        np.testing.assert_allclose(stats.METRICS[name](outputs, labels, idx), reference(name, outputs, labels, idx),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["pearson", "spearman"])
def test_correlations_equal_scipy(data, name):
    _, _, target, regression, idx = data
    for outputs in (regression, regression[:, None]):  # predictions or a regression head's (n, 1) output
        np.testing.assert_allclose(stats.METRICS[name](outputs, target, idx), reference(name, outputs, target, idx),
                                   rtol=1e-10)


def test_degenerate_binary_resamples_score_zero_like_sklearn():
    labels, pred = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    idx = np.array([[0, 0, 0, 0], [0, 1, 0, 1], [0, 2, 0, 2]])  # one class only; all predicted 0, or all wrong
    for name in ("f1", "matthews"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns that these are ill-defined, then returns 0
            expected = reference(name, pred, labels, idx)
        np.testing.assert_array_equal(stats.METRICS[name](pred, labels, idx), expected)
    with pytest.raises(ValueError, match="binary"):
        stats.f1(np.array([0, 2]), np.array([0, 1]), np.array([[0, 1]]))


def test_loss_is_a_ratio_of_sums(data):
    *_, idx = data
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 200, N)
    outputs = np.column_stack([tokens * rng.uniform(1, 3, N), tokens])
    expected = [outputs[r, 0].sum() / outputs[r, 1].sum() for r in idx]
    np.testing.assert_allclose(stats.loss(outputs, None, idx), expected, rtol=1e-12)
    assert stats.loss(outputs, None, idx[:1])[0] != pytest.approx((outputs[:, 0] / outputs[:, 1]).mean())


def wrong_at(labels, wrong):
    """Predicted labels that are wrong exactly at the `wrong` indices."""
    pred = labels.copy()
    pred[wrong] = 1 - pred[wrong]
    return pred


def test_paired_difference_orientation_scale_and_paired_bootstrap():
    rng = np.random.default_rng(3)
    n = 1000
    labels = rng.integers(0, 2, n)
    b = [wrong_at(labels, rng.choice(n, 150, replace=False)) for _ in range(3)]
    a = [wrong_at(labels, np.flatnonzero(p != labels)[:140]) for p in b]  # A fixes 10 of B's errors at every seed
    r = paired_difference(a, b, labels, "accuracy")
    assert r.per_seed == pytest.approx((1.0, 1.0, 1.0)) and r.delta == pytest.approx(1.0)
    assert r.var_seed == 0 and r.df == np.inf and r.seed_noise_known
    # Paired: for a mean, the bootstrap variance is that of the mean of the seed-averaged per-example differences.
    per_example = np.mean([(x == labels).astype(float) - (y == labels) for x, y in zip(a, b)], axis=0)
    assert r.var_examples == pytest.approx(1e4 * per_example.var() / n, rel=0.1)
    assert r.low == pytest.approx(1 - 1.96 * np.sqrt(r.var_examples), rel=1e-3) and differs(r)

    loss_a = [np.column_stack([np.full(n, 1.0), np.full(n, 2)])]  # 0.5 nats/token against 0.6: A is better
    loss_b = [np.column_stack([np.full(n, 1.2), np.full(n, 2)])]
    r = paired_difference(loss_a, loss_b, None, "loss", higher_is_better=False, scale=1.0)
    assert r.delta == pytest.approx(0.1) and not r.seed_noise_known


def test_bootstrap_runs_in_blocks_of_resamples(monkeypatch):
    """Large eval sets are resampled in blocks; every block counts, and a metric can be any callable."""
    rows = []

    def count(outputs, labels, idx):
        rows.append(idx.shape[0])
        return np.asarray(outputs, float)[idx].mean(axis=1)

    monkeypatch.setattr(stats, "_MAX_BLOCK", 50 * 7)
    r = paired_difference([np.arange(50.0)], [np.zeros(50)], None, count, n_boot=20, scale=1.0)
    assert sum(rows) == 2 * (1 + 20) and max(rows) == 7
    assert r.var_examples > 0


def simulate(rng, *, seeds, n=800, mu_a=2.6, mu_b=2.68, sd_seed=0.1, sd_noise=0.5, sd_lean=0.5, sd_ease=2.0,
             sd_shared=0.3):
    """Predicted labels of A and B over seeds, the labels, and the true population Δ* in accuracy points.

    Method m answers example i correctly at seed s when ease_i + lean_mi + μ_m + c_s + a_ms + e_msi > 0: ease_i
    (shared by both methods: what pairing cancels), lean_mi (an example's lasting lean toward one method),
    c_s (a shift both methods share at a seed: the same batches), a_ms (the method's own training noise) and
    e_msi (per-example-per-seed noise) are independent normals. Over population examples and seeds the sum is
    N(μ_m, σ²), so the expected accuracy is Φ(μ_m / σ) and Δ* = 100 (Φ(μ_A / σ) − Φ(μ_B / σ))."""
    ease, labels = rng.normal(0, sd_ease, n), rng.integers(0, 2, n)
    shared = rng.normal(0, sd_shared, (seeds, 1))
    runs = []
    for mu in (mu_a, mu_b):
        z = (ease + rng.normal(0, sd_lean, n) + mu + shared + rng.normal(0, sd_seed, (seeds, 1))
             + rng.normal(0, sd_noise, (seeds, n)))
        runs.append([np.where(row > 0, labels, 1 - labels) for row in z])
    sigma = np.sqrt(sd_ease**2 + sd_lean**2 + sd_shared**2 + sd_seed**2 + sd_noise**2)
    return runs[0], runs[1], labels, 100 * (st.norm.cdf(mu_a / sigma) - st.norm.cdf(mu_b / sigma))


@pytest.mark.slow
@pytest.mark.parametrize("sd_seed, naive_below", [(0.1, 0.90), (0.15, 0.80)])
def test_interval_covers_the_true_difference(sd_seed, naive_below):
    """3 seeds × 800 examples, 400 simulations: the 95% interval covers Δ* in 90-99% of them, while an interval
    from eval-set noise alone falls short, the more so as training noise grows."""
    rng = np.random.default_rng(0)
    z = st.norm.ppf(0.975)
    covered = naive = 0
    reps = 400
    for rep in range(reps):
        a, b, labels, true = simulate(rng, seeds=3, sd_seed=sd_seed)
        r = paired_difference(a, b, labels, "accuracy", n_boot=300, rng_seed=rep)
        covered += r.low <= true <= r.high
        naive += abs(r.delta - true) <= z * np.sqrt(r.var_examples)
    assert 0.90 <= covered / reps <= 0.99
    assert naive / reps < naive_below


def seed_runs(labels, b_wrong, a_extra):
    """Per seed: B wrong on `b_wrong` random examples; A wrong on the same ones plus a_extra[s] more (fewer if < 0)."""
    rng = np.random.default_rng(5)
    a, b = [], []
    for extra in a_extra:
        wrong = rng.permutation(len(labels))
        b.append(wrong_at(labels, wrong[:b_wrong]))
        a.append(wrong_at(labels, wrong[:b_wrong + extra]))
    return a, b


def test_verdicts():
    n, margin = 1000, 1.0
    labels = np.random.default_rng(4).integers(0, 2, n)

    a, b = seed_runs(labels, 100, [2, 9, -3])  # Δ_s = -0.2, -0.9, +0.3: each seed alone is within the margin
    r = paired_difference(a, b, labels, "accuracy")
    assert min(r.per_seed) > -margin
    v = non_inferiority(r, margin)
    assert v.status == "inconclusive" and r.low < -margin < r.high and v.seeds_needed > 3
    assert v.text.startswith("inconclusive: Δ = -0.27 points [") and "straddles -1;" in v.text
    assert f"about {v.seeds_needed} seeds" in v.text

    a, b = seed_runs(labels, 100, [30, 32, 29])
    v = non_inferiority(paired_difference(a, b, labels, "accuracy"), margin)
    assert v.status == "worse" and v.text.startswith("worse: Δ = -3.03 points [") and "entirely below -1" in v.text

    a, b = seed_runs(labels, 100, [1, -1, 2])
    v = non_inferiority(paired_difference(a, b, labels, "accuracy"), margin)
    assert v.status == "qualifies" and v.text.startswith("qualifies: Δ = -0.07 points [") and v.text.endswith("> -1")
    assert v.seeds_needed is None and v.examples_needed is None


def test_one_seed_never_decides():
    n = 1000
    labels = np.random.default_rng(4).integers(0, 2, n)
    for extra, margin in [(0, 1.0), (-30, 1.0), (80, 1.0), (2, 1.0)]:  # clearly fine, better, far worse, close
        a, b = seed_runs(labels, 100, [extra])
        r = paired_difference(a, b, labels, "accuracy")
        assert not r.seed_noise_known and np.isnan(r.var_seed)
        v = non_inferiority(r, margin)
        assert v.status == "inconclusive" and "one seed" in v.text and not differs(r)
    assert r.low < r.delta < r.high  # eval-set noise alone is still shown


def test_planning_reaches_its_target_on_the_estimates():
    """With the estimated components, the predicted seeds (or examples) reach the half-width |Δ + ε|; one fewer
    does not."""
    def result(var_seed, var_examples):  # delta -0.6, interval wide enough to straddle any margin used here
        return stats.PairedResult(delta=-0.6, low=-3.0, high=1.8, n_seeds=3, n_examples=872, var_seed=var_seed,
                                  var_examples=var_examples, df=3.0, seed_noise_known=True, per_seed=(0.0, -0.6, -1.2))

    target = 0.9  # margin 1.5
    v = non_inferiority(result(0.5, 0.05), 1.5)  # training noise dominates: only more seeds help
    half = lambda k: stats._half_width(0.5 * 3 / k, 0.05, k, 0.95)[0]  # noqa: E731
    assert v.examples_needed is None and half(v.seeds_needed) <= target < half(v.seeds_needed - 1)
    assert f"about {v.seeds_needed} seeds would resolve it" in v.text

    v = non_inferiority(result(0.02, 0.5), 1.5)  # eval-set noise dominates: only more examples help
    half = lambda m: stats._half_width(0.02, 0.5 * 872 / m, 3, 0.95)[0]  # noqa: E731
    assert v.seeds_needed is None and half(v.examples_needed) <= target < half(0.99 * v.examples_needed)
    assert "eval examples at 3 seeds would resolve it" in v.text

    v = non_inferiority(result(0.5, 0.05), 0.6)
    assert v.status == "inconclusive" and v.seeds_needed is None and "no amount of data" in v.text


@pytest.mark.slow
def test_predicted_seeds_give_the_target_half_width():
    """Pilot runs of 5 seeds predict how many seeds resolve an inconclusive verdict; running that many gives a
    half-width near the target |Δ + ε| (the median over pilots: each pilot's seed variance is itself noisy).
    Predicting from the per-run instead of the per-seed variance (5 times too few seeds) gives a median near 1.5."""
    rng = np.random.default_rng(0)
    setting = dict(mu_b=2.64, sd_seed=0.5)
    margin, ratios = 3.0, []
    for rep in range(40):
        a, b, labels, _ = simulate(rng, seeds=5, **setting)
        pilot = paired_difference(a, b, labels, "accuracy", n_boot=300, rng_seed=rep)
        v = non_inferiority(pilot, margin)
        if v.status != "inconclusive" or v.seeds_needed is None:
            continue
        a, b, labels, _ = simulate(rng, seeds=v.seeds_needed, **setting)
        r = paired_difference(a, b, labels, "accuracy", n_boot=300, rng_seed=rep)
        ratios.append((r.high - r.low) / 2 / abs(pilot.delta + margin))
    assert len(ratios) >= 15
    assert 0.65 <= np.median(ratios) <= 1.25
