"""Adaptive sweeps: the sequential test keeps its error over all looks (simulated with the committed records' noise),
the decision logic, the sweeper's settings and grid, a tiny adaptive sweep end to end (resumed: same decisions, no
run trained twice), bad input, and the report's "How the sweep decided"."""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_sweep.analysis import adaptive, simulation, stats
from lora_sweep.analysis.simulation import Noise
from hydra_plugins.lora_sweep_adaptive.sweeper import AdaptiveSettings
from lora_sweep.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from test_sweep import OWN_PROCESS, grid, load, refused_sweep, sweep, values  # noqa: E402

RECORDS = Path(__file__).resolve().parents[1] / "results" / "runs"
SIMS = 4000
BOUND = stats.SEQUENTIAL_ALPHA + 2 * np.sqrt(stats.SEQUENTIAL_ALPHA * (1 - stats.SEQUENTIAL_ALPHA) / SIMS)  # + 2 MC s.e.


def test_spending_gives_each_look_its_increment_and_all_of_alpha_by_the_last():
    levels = stats.look_alpha(np.arange(1, 9), 3, 6)
    assert levels[[0, 1, 6, 7]].tolist() == [0, 0, 0, 0]  # no look below the initial seeds or beyond max_seeds
    assert np.round(levels[2:6], 5).tolist() == [0.00153, 0.00452, 0.00803, 0.01092]  # O'Brien–Fleming: late looks get most
    assert levels.sum() == pytest.approx(0.025)
    assert float(stats.spent_alpha(1.0)) == pytest.approx(0.025)


def test_a_look_uses_banerjee_bound_at_its_own_level():
    result = stats.PairedResult(delta=0.0, low=0, high=0, n_seeds=4, n_examples=800, var_seed=0.02, var_examples=0.01,
                                df=9.0, seed_noise_known=True, per_seed=(0.0,) * 4)
    verdict = stats.sequential_verdict(result, 1.0, initial_seeds=3, max_seeds=6)
    half = np.sqrt(6.0529**2 * 0.02 + 2.6103**2 * 0.01)  # t_{3, 1-a} and z_{1-a} at look 2's a = 0.00452
    assert verdict.status == "qualifies" and verdict.look == 2 and verdict.alpha == pytest.approx(0.0045231, rel=1e-4)
    assert verdict.low == pytest.approx(-half, abs=1e-3) and verdict.high == pytest.approx(half, abs=1e-3)
    wide = stats.sequential_verdict(dataclasses.replace(result, var_seed=0.1), 1.0, 3, 6)
    assert wide.status == "open" and wide.resolvable  # at 6 seeds the same estimates would decide it
    near = stats.sequential_verdict(dataclasses.replace(result, delta=-0.9), 1.0, 3, 6)
    assert near.status == "open" and not near.resolvable  # 0.1 from the margin: not by 6 seeds


@pytest.mark.parametrize("verdicts,resolvable,expected", [
    ({1: "worse", 2: "qualifies", 4: "open"}, None, (2, True, ())),  # r=4 cannot change the answer
    ({1: "open", 2: "qualifies", 4: "open"}, None, (2, False, (1,))),  # r=1 could still qualify
    ({1: "worse", 2: "worse"}, None, (None, True, ())),  # none: every rank worse
    ({1: "open", 2: "worse", 4: "open"}, {4: False}, (None, False, (1,))),  # r=4 open, but more seeds cannot settle it
    ({1: "qualifies", 2: "open"}, None, (1, True, ())),
])
def test_only_open_ranks_that_can_change_the_answer_continue(verdicts, resolvable, expected):
    result = adaptive.answer(verdicts, resolvable)
    assert (result.rank, result.decided, result.to_continue) == expected


@pytest.fixture(scope="module")
def measured() -> simulation.Measured:
    return simulation.measure(RECORDS)


def test_the_committed_records_give_the_variance_components(measured):
    assert sorted(measured.deltas) == [1, 4, 16, 64] and measured.seeds >= 2  # the main job's ranks (conf/sweep/rank.yaml)
    assert 0.05 < measured.interval.v_seed < 10 and 0.05 < measured.interval.v_shared < 10  # points², SST-2 dev: ~1 and ~0.6
    assert measured.split.v_shared + measured.split.v_flip / 3 == pytest.approx(measured.interval.v_shared)


def _claims(noise: Noise, naive: bool, seed: int) -> tuple[float, float]:
    """Rates of calling a rank at Δ = −ε non-inferior and worse over all looks (3 seeds, then up to 6), the rank
    always given the next seed until a claim is made."""
    per_seed = simulation.draw([-1.0], noise, SIMS, 6, np.random.default_rng(seed))
    status = (simulation.naive_looks(per_seed, noise, 1.0, 3, 6) if naive else
              simulation.sequential_looks(per_seed, noise, 1.0, 3, 6)[0])
    first = simulation.first_claim(status)[:, 0]
    return float((first == 1).mean()), float((first == -1).mean())


@pytest.mark.parametrize("reading", ["interval", "split", "training noise dominates"])
def test_sequential_verdicts_keep_their_error_over_all_looks(measured, reading):
    """The committed records' noise read as the interval models it, split by how the eval noise shrinks with seeds,
    and with a tenth of the eval noise (where the Welch–Satterthwaite quantile would reach 2.9 %)."""
    noise = {"interval": measured.interval, "split": measured.split,
             "training noise dominates": Noise(measured.interval.v_seed, measured.interval.v_shared / 10)}[reading]
    qualifies, worse = _claims(noise, naive=False, seed=1)
    assert qualifies <= BOUND and worse <= BOUND, (qualifies, worse)


@pytest.mark.parametrize("reading", ["interval", "training noise dominates"])
def test_a_95_interval_rechecked_at_every_look_exceeds_that_error(measured, reading):
    noise = {"interval": measured.interval,
             "training noise dominates": Noise(measured.interval.v_seed, measured.interval.v_shared / 10)}[reading]
    qualifies, worse = _claims(noise, naive=True, seed=1)
    assert qualifies > BOUND and worse > BOUND, (qualifies, worse)


def test_on_the_committed_ranks_the_adaptive_sweep_spends_less_for_the_same_answer(measured):
    ranks = sorted(measured.deltas)
    outcome = simulation.sweep(ranks, [measured.deltas[r] for r in ranks], measured.interval, 1.0, 3, 6, 400,
                               np.random.default_rng(2))
    same = np.mean([a == g for a, g in zip(outcome.adaptive, outcome.grid)])
    # 94.7 % on the committed records (benchmarks/adaptive.py, 1000 sweeps): ranks measured near the margin (r=16 at -1.15,
    # r=64 at -0.69) split the two more often than the records before them did (>= 95 %); 400 sweeps here
    assert same >= 0.90 and outcome.runs().mean() < 0.75 * outcome.grid_runs() and outcome.grid_runs() == (len(ranks) + 1) * 6


@pytest.mark.parametrize("values_,message", [
    ({"initial_seeds": 1}, "hydra.sweeper.initial_seeds=1 must be at least 2"),
    ({"max_seeds": 2}, "hydra.sweeper.max_seeds=2 must be at least hydra.sweeper.initial_seeds=3"),
    ({"margin": 0}, "hydra.sweeper.margin=0 must be a number above 0"),
    ({"margin": -1.5}, "hydra.sweeper.margin=-1.5 must be a number above 0"),
    ({"max_seeds": "six"}, "hydra.sweeper.max_seeds='six' must be a whole number"),
    ({"seeds": 3}, "hydra.sweeper.seeds is not a setting of the adaptive sweeper"),
])
def test_bad_settings_are_one_line_naming_the_value(values_, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("+", r"\+")):
        AdaptiveSettings.from_config(values_)


def test_the_rank_preset_runs_its_first_round_or_the_fixed_grid():
    first = grid("+sweep=rank")
    assert len(first) == 4 * 3 and values(first, "train.seed") == ["0", "1", "2"]
    assert values(grid("+sweep=rank", "train.seed=10"), "train.seed") == ["10", "11", "12"]
    fixed = grid("+sweep=rank", "hydra.sweeper.adaptive=false")
    assert len(fixed) == 4 * 6 and values(fixed, "train.seed") == ["0", "1", "2", "3", "4", "5"]
    with pytest.raises(UserError, match="train.seed is swept: an adaptive sweep chooses the seeds itself"):
        grid("+sweep=[rank,seeds]")


TINY_ADAPTIVE = ["+sweep=rank", "method.r=1,8", "hydra.sweeper.initial_seeds=2", "hydra.sweeper.max_seeds=3",
                 "hydra.sweeper.margin=28", "analyze=false", "deploy=false", "train.forgetting_examples=0",
                 "task.tune_examples=16", "train.threads=1"]  # the preset's joblib launcher, two jobs at a time


@pytest.mark.slow
def test_a_tiny_adaptive_sweep_decides_in_rounds_and_resumes_to_the_same_decisions(tmp_path, tiny_bert_dir):
    """The tiny random model predicts one class at seeds 0 and 1 (LoRA +6.25 points over full FT on 32 examples,
    the eval set's noise alone): with ε = 28 both ranks are open at look 1 (±44.4) and could be settled by 3 seeds
    (±29.9 projected), so both get seed 2 in round 2, after which both qualify and r=1 is the answer."""
    result = sweep(tmp_path, tiny_bert_dir, *TINY_ADAPTIVE)
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((tmp_path / adaptive.LOG_NAME).read_text())
    assert [r["seeds"] for r in log["rounds"]] == [[0, 1], [2]]
    assert [r["ran"] for r in log["rounds"]] == ["r=1, r=8 and full FT"] * 2
    assert log["stopped"] == "the answer is decided" and log["groups"][0]["answer"]["rank"] == 1
    assert [(x["status"], x["look"], x["seeds"]) for x in log["groups"][0]["ranks"]] == [("qualifies", 2, 3)] * 2
    found = load(tmp_path / "runs")
    assert len(found) == 9 and sorted(log["run_ids"]) == sorted(found)  # 2 ranks x 3 seeds and 3 baselines
    assert "[sweep] round 2: 2 runs, seed(s) 2" in result.stdout and "run 6 of 6 finished" in result.stdout

    again = sweep(tmp_path, tiny_bert_dir, *TINY_ADAPTIVE)
    assert again.returncode == 0 and " starting" not in again.stdout  # every run reused by its id
    relog = json.loads((tmp_path / adaptive.LOG_NAME).read_text())
    assert [(r["seeds"], r["ran"], r["after"]) for r in relog["rounds"]] == [(r["seeds"], r["ran"], r["after"]) for r in log["rounds"]]
    assert relog["groups"] == log["groups"] and load(tmp_path / "runs") == found
    assert not (tmp_path / "runs" / "history").exists()


@pytest.mark.parametrize("overrides,message", [
    (["hydra.sweeper.initial_seeds=1"], "hydra.sweeper.initial_seeds=1 must be at least 2"),
    (["hydra.sweeper.max_seeds=2"], "hydra.sweeper.max_seeds=2 must be at least hydra.sweeper.initial_seeds=3"),
    (["hydra.sweeper.margin=0"], "hydra.sweeper.margin=0 must be a number above 0"),
    (["pair_baseline=false"], "pair_baseline=false: an adaptive sweep decides by the paired test"),
    (["hydra.sweeper.params=null"], "an adaptive sweep needs a rank axis"),
])
@OWN_PROCESS
def test_bad_adaptive_sweeps_stop_before_any_job(tmp_path, tiny_bert_dir, overrides, message, own_process, capsys, monkeypatch):
    result = refused_sweep(tmp_path, tiny_bert_dir, "+sweep=rank", *overrides, own_process=own_process, capsys=capsys,
                           monkeypatch=monkeypatch)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_the_report_explains_how_the_sweep_decided(tmp_path):
    rows = [{"r": 1, "status": "worse", "seeds": 4, "look": 2, "delta": -3.1, "low": -5.0, "high": -1.2, "resolvable": False},
            {"r": 8, "status": "open", "seeds": 3, "look": 1, "delta": -1.5, "low": -6.0, "high": 3.0, "resolvable": False,
             "one_look": "inconclusive", "seeds_needed": None, "examples_needed": 3500}]
    verdicts = {x["r"]: x["status"] for x in rows}
    result = adaptive.answer(verdicts, {x["r"]: x["resolvable"] for x in rows})
    log = {"settings": {"initial_seeds": 3, "max_seeds": 6, "alpha": 0.025, "margin": None},
           "stopped": "no rank left open could be settled by max_seeds",
           "rounds": [{"round": 1, "seeds": [0, 1, 2], "ran": "r=1, r=8 and full FT", "why": "first round",
                       "after": {"sst2 · m · qv": "r=1 open; r=8 open, cannot be settled"}},
                      {"round": 2, "seeds": [3], "ran": "r=1 and full FT", "why": "open ranks that can still change the answer: r=1",
                       "after": {"sst2 · m · qv": "r=1 worse (look 2); r=8 open, cannot be settled"}}],
           "groups": [{"label": "sst2 · m · qv", "ranks": rows, "text": adaptive.answer_text(rows, result, 1.0, "points", 6)}]}
    (tmp_path / "runs").mkdir()
    adaptive.write_log(adaptive.log_path(tmp_path / "runs"), log)
    lines = adaptive.section(tmp_path / "runs")
    assert lines[0] == "## How the sweep decided"
    assert "| 2 | 3 | r=1 and full FT | open ranks that can still change the answer: r=1 | r=1 worse (look 2); r=8 open, cannot be settled |" in lines
    assert "| r=1 | worse | 2 (4) | -3.10 [-5.00, -1.20] | - |" in lines
    assert "| r=8 | open | 1 (3) | -1.50 [-6.00, +3.00] | not by 6 seeds |" in lines
    assert ("**sst2 · m · qv**: undecided: no rank is shown within 1 points of full FT; still open: r=8 (Δ = -1.50 "
            "[-6.00, +3.00] at look 1 (3 seeds); would take 3,500 eval examples)") in lines
    assert adaptive.section(tmp_path / "elsewhere" / "runs") == []
