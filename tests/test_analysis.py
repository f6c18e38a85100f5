"""Analysis on fixture folders of records written by the project's own writer.

Every fixture record is a copy of a real record from a tiny run whose `identity` is changed the way a run with other
settings would have it (rank, learning rate, seed, dropout, device), with run_id, config_id and context_id recomputed
by lora_sweep.identity, and per-example outputs synthesised so that each run has a known metric on the tuning and
eval splits. Runs of the same seed share most of their per-example results (as runs of one seed do), which is what
the paired comparison with full fine-tuning measures.
"""

import copy
import re
import shutil
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from lora_sweep.analysis import curves, stats, tables
from lora_sweep.analysis.load import load_records
from lora_sweep import experiment, identity, records, reporting
from lora_sweep.errors import UserError
from lora_sweep.settings import compose

TINY = ["task.max_train_examples=32", "task.max_eval_examples=16", "task.tune_examples=16", "train.max_steps=2",
        "train.batch_size=8", "train.save_adapter=false", "train.threads=1"]
N = 1000  # eval (and tuning) examples of the synthetic outputs
LABELS = {split: np.random.default_rng(k).integers(0, 2, N) for k, split in enumerate(("dev", "tune"))}
SHARED_ACCURACY = 0.86  # what every configuration of one seed gets right, before its own differences
BASE_KEYS = ("schema_version", "run_id", "config_id", "context_id", "sweep", "status", "error", "diverged_at_step", "started_at",
             "model", "model_name_or_path", "task", "task_family", "data_source", "method", "r", "alpha", "alpha_policy", "scaling",
             "targets", "match_budget", "lr", "seed", "baseline_run_id", "baseline_status", "identity", "config", "environment",
             "finished_at")
EVAL_KEYS = ("metrics", "primary_metric", "primary_value", "tune_metrics", "tune_value", "examples", "artifact", "tune_curve")


@pytest.fixture(scope="module")
def templates(tiny_bert_dir, tmp_path_factory):
    """A real LoRA record (r=8 on query/value, the default lr) and its real baseline (full FT, lr 1e-4), from a tiny run."""
    folder = tmp_path_factory.mktemp("template")
    settings = compose(*TINY, f"model.name_or_path={tiny_bert_dir}", f"runs_dir={folder}", f"cache_dir={folder / 'cache'}")
    lora = experiment.run(settings)
    full = records.read_record(folder, lora["baseline_run_id"])
    assert lora["status"] == full["status"] == "done" and lora["params"]["adapter"] == 512 * 8  # 2 layers x 2 x (64 + 64) x r
    for record in (lora, full):  # two steps of a random tiny model may end above their start: not what these tests vary
        record["budget"] = dict(record["budget"], initial_loss=0.69, final_loss=0.6)
    return lora, full


def correct(seed: int, split: str, value: float, swaps: int, salt: int) -> np.ndarray:
    """Which examples a run gets right: exactly round(value x N) of them. The seed's shared pattern, moved to `value`,
    with `swaps` extra examples right and as many wrong that are the configuration's own (`salt`)."""
    base = np.zeros(N, bool)
    base[np.random.default_rng([seed, len(split)]).permutation(N)[:round(SHARED_ACCURACY * N)]] = True
    rng = np.random.default_rng([seed, len(split), salt])
    right, wrong = rng.permutation(np.flatnonzero(base)), rng.permutation(np.flatnonzero(~base))
    shift = round(value * N) - len(right)
    out = base.copy()
    out[wrong[:swaps + max(shift, 0)]] = True
    out[right[:swaps + max(-shift, 0)]] = False
    assert out.sum() == round(value * N)
    return out


def logits(labels: np.ndarray, right: np.ndarray) -> list[list[float]]:
    predicted = np.where(right, labels, 1 - labels)
    return [[0.7, -0.4] if p == 0 else [-0.3, 0.9] for p in predicted]


def variant(template: dict, seed: int, dev: float | None = None, tune: float | None = None, *, r=None, lr=None, swaps=3,
            dropout=None, device=None, batching=None, status="done", curve: dict[int, float] | None = None, **fields) -> dict:
    """A copy of `template` as the run with these settings would be recorded, with accuracies `dev` and `tune`, and
    its tuning split's learning curve: `curve` (step -> accuracy at the checkpoints before the end), then `tune`."""
    record = copy.deepcopy(template)
    ident, config = record["identity"], record["config"]
    ident["seed"] = record["seed"] = config["train"]["seed"] = seed
    if lr is not None:
        ident["config"]["method"]["lr"] = record["lr"] = config["method"]["lr"] = lr
    if r is not None:
        ident["config"]["method"]["r"] = record["r"] = config["method"]["r"] = r
        record["params"] = dict(record["params"], adapter=512 * r, trainable=record["params"]["head"] + 512 * r)
    if dropout is not None:
        ident["config"]["method"]["dropout"] = config["method"]["dropout"] = dropout
    if batching is not None:
        ident["config"]["train"]["batching"] = config["train"]["batching"] = batching
        if batching != "sorted":
            ident["config"]["train"].pop("min_micro_batch", None)
    if device is not None:
        ident["config"]["device"] = {"type": device, "precision": "bf16 autocast" if device == "cuda" else "fp32"}
        config["train"]["device"] = record["memory"]["device"] = record["environment"]["device"] = device
    record.update(run_id=identity.run_id(ident), config_id=identity.config_id(ident), context_id=identity.context_id(ident))
    if record["method"] == "lora":  # the full-FT run experiment.baseline_settings makes of these settings
        baseline = copy.deepcopy(ident)
        baseline["config"]["method"] = baseline["config"].pop("baseline")
        record["baseline_run_id"] = identity.run_id(baseline)
    salt = zlib.crc32(record["config_id"].encode())
    splits = {}
    for split, value in (("dev", dev), ("tune", dev if tune is None else tune)):
        if value is None:
            continue
        right = correct(seed, split, value, swaps, salt)
        splits[split] = {"ids": list(range(N)), "labels": LABELS[split].tolist(), "outputs": logits(LABELS[split], right)}
    if splits:
        tune_value = dev if tune is None else tune
        record.update(metrics={"accuracy": dev}, primary_value=dev, tune_metrics={"accuracy": tune_value}, tune_value=tune_value,
                      examples=splits, eval_examples=N, tune_examples=N)
        record["tune_curve"] = [*({"step": step, "metrics": {"accuracy": value},
                                   "outputs": logits(LABELS["tune"], correct(seed, f"tune{step}", value, swaps, salt))}
                                  for step, value in sorted((curve or {}).items())),
                                {"step": record["time"]["steps"], "metrics": {"accuracy": tune_value}, "outputs": splits["tune"]["outputs"]}]
    record["status"] = status
    if status != "done":  # what experiment writes for a run that failed before training, or ran away while training
        keep = BASE_KEYS if status == "failed" else [k for k in record if k not in EVAL_KEYS]
        record = {k: record[k] for k in keep}
        if "tokens" in record:
            record["tokens"] = {"train": record["tokens"]["train"]}
    record.update(fields)
    return record


def write(folder, templates, lora: dict, full: list[float], lr=None, **kw) -> None:
    """LoRA records at ranks -> dev accuracy per seed (tune = dev), and full-FT records, one per seed, all through
    records.write_record."""
    lora_t, full_t = templates
    for seed, value in enumerate(full):
        records.write_record(folder, variant(full_t, seed, value))
    for r, values in lora.items():
        for seed, value in enumerate(values):
            records.write_record(folder, variant(lora_t, seed, value, r=r, lr=lr, **kw))


def analyse(folder, margin=None):
    df, _ = load_records(folder)
    agg = tables.aggregate(df)
    ranks = tables.compare_ranks(df, agg, margin)
    return df, agg, ranks, tables.recommend(ranks)


def row_at(ranks: pd.DataFrame, r: int) -> pd.Series:
    rows = ranks[ranks["r"] == r]
    assert len(rows) == 1
    return rows.iloc[0]


def test_fixture_records_are_what_the_writer_and_identity_would_produce(tmp_path, templates):
    lora_t, full_t = templates
    same = variant(lora_t, 0, 0.8)
    assert same["run_id"] == lora_t["run_id"] and same["config_id"] == lora_t["config_id"]  # no change: the real ids
    assert same["baseline_run_id"] == lora_t["baseline_run_id"] == full_t["run_id"]
    assert variant(full_t, 0, 0.8)["run_id"] == full_t["run_id"]
    seed1 = variant(lora_t, 1, 0.8)
    assert seed1["run_id"] != lora_t["run_id"] and seed1["config_id"] == lora_t["config_id"]
    assert seed1["baseline_run_id"] == variant(full_t, 1, 0.8)["run_id"]
    assert variant(lora_t, 0, 0.8, r=4)["context_id"] == variant(full_t, 0, 0.8, lr=3e-4)["context_id"] == lora_t["context_id"]
    records.write_record(tmp_path, variant(lora_t, 0, 0.812, tune=0.9))
    df, _ = load_records(tmp_path)
    assert df.loc[0, "primary_value"] == 0.812 and df.loc[0, "tune_value"] == 0.9
    assert np.mean(np.argmax(df.loc[0, "examples"]["outputs"], axis=1) == LABELS["dev"]) == pytest.approx(0.812)


@pytest.mark.slow
def test_aggregates_and_the_paired_difference_match_hand_computed_values(tmp_path, templates):
    write(tmp_path, templates, {4: [0.80, 0.82, 0.84]}, [0.85, 0.86, 0.87])
    df, agg, ranks, _ = analyse(tmp_path)
    assert len(df) == 6 and len(agg) == 2
    row = agg[agg["method"] == "lora"].iloc[0]
    assert row["primary_value_mean"] == pytest.approx(0.82)
    assert row["primary_value_std"] == pytest.approx(0.02)
    assert row["primary_value_ci95"] == pytest.approx(4.302653 * 0.02 / np.sqrt(3), rel=1e-5)
    assert row["primary_value_n"] == 3 and row["seeds"] == [0, 1, 2] and len(row["run_ids"]) == 3

    rank = row_at(ranks, 4)
    assert rank["full_mean"] == pytest.approx(0.86) and rank["full_seeds"] == [0, 1, 2]
    assert rank["delta"] == pytest.approx(-4.0) and rank["paired_seeds"] == 3  # mean of -5, -4, -3 points
    assert rank["param_ratio"] == pytest.approx((4290 + 512 * 4) / templates[1]["params"]["trainable"])
    # the interval is the paired test's on these very outputs, seed by seed and example by example
    by_seed = {m: [df[(df["method"] == m) & (df["seed"] == s)].iloc[0]["examples"]["outputs"] for s in range(3)] for m in ("lora", "full")}
    expected = stats.paired_difference(by_seed["lora"], by_seed["full"], LABELS["dev"], "accuracy")
    assert (rank["delta_low"], rank["delta_high"]) == pytest.approx((expected.low, expected.high))
    assert rank["delta_low"] < -4.0 < rank["delta_high"]

    reporting.write(tmp_path)
    table = pd.read_csv(tmp_path.parent / "tables" / f"sst2_{df['model'][0]}.csv", dtype=str)
    assert table.loc[0, "% of full"] == f"{100 * 0.82 / 0.86:.1f}"
    assert table.loc[0, "eval (± 95% CI over seeds)"] == f"82.00 ± {100 * row['primary_value_ci95']:.2f}"


def test_records_of_different_identities_are_never_pooled(tmp_path, templates):
    lora_t, full_t = templates
    for record in (variant(lora_t, 0, 0.80), variant(lora_t, 1, 0.82),  # one configuration, two seeds
                   variant(lora_t, 0, 0.70, dropout=0.1),  # r=8 seed 0 again, but with dropout
                   variant(lora_t, 0, 0.60, device="cuda"),  # r=8 seed 0 again, but on another device
                   variant(full_t, 0, 0.86), variant(full_t, 1, 0.86)):
        records.write_record(tmp_path, record)
    df, agg, ranks, _ = analyse(tmp_path)
    lora = agg[agg["method"] == "lora"].set_index("config_id")
    assert len(lora) == 3 and all(lora["r"] == 8)
    assert sorted(map(tuple, lora["seeds"])) == [(0,), (0,), (0, 1)]  # never seeds [0, 0]
    assert sorted(lora["primary_value_mean"].round(3)) == [0.60, 0.70, 0.81]
    assert lora["primary_value_n"].max() == 2
    # the CUDA run is in a context of its own: no full-FT configuration to be compared with there
    cuda = lora[lora["device"] == "cuda"]
    assert len(cuda) == 1 and cuda.iloc[0]["context_id"] != lora_t["context_id"]
    cuda_rank = ranks[ranks["context_id"] == cuda.iloc[0]["context_id"]].iloc[0]
    assert pd.isna(cuda_rank.get("full_config_id")) and pd.isna(cuda_rank.get("verdict"))
    # on the CPU context the dropout configuration competes with the plain one on the tuning split, and loses
    cpu = ranks[ranks["context_id"] == lora_t["context_id"]]
    assert len(cpu) == 1 and cpu.iloc[0]["config_id"] == lora_t["config_id"] and cpu.iloc[0]["paired_seeds"] == 2


@pytest.mark.slow
def test_learning_rates_are_chosen_on_the_tuning_split(tmp_path, templates):
    lora_t, full_t = templates
    for seed in range(3):
        for record in (variant(lora_t, seed, 0.83, 0.88, r=4, lr=1e-3),  # best on tune, worse on eval
                       variant(lora_t, seed, 0.86, 0.85, r=4, lr=5e-4),
                       variant(full_t, seed, 0.86, 0.87, lr=1e-4),  # best on tune
                       variant(full_t, seed, 0.87, 0.84, lr=5e-5)):  # best on eval
            records.write_record(tmp_path, record)
    df, agg, ranks, rec = analyse(tmp_path)
    assert len(agg) == 4
    rank = row_at(ranks, 4)
    assert rank["lr"] == pytest.approx(1e-3) and rank["primary_value_mean"] == pytest.approx(0.83)
    assert rank["tune_value_mean"] == pytest.approx(0.88)
    assert rank["full_lr"] == pytest.approx(1e-4) and rank["full_mean"] == pytest.approx(0.86)
    assert rank["delta"] == pytest.approx(-3.0)
    reporting.write(tmp_path)
    table = pd.read_csv(tmp_path.parent / "tables" / f"sst2_{df['model'][0]}.csv", dtype=str)
    assert table.loc[0, "lr (tuned)"] == "0.001" and table.loc[0, "tune"] == "88.00"


def test_tuning_ties_go_to_the_lower_learning_rate(tmp_path, templates):
    write(tmp_path, templates, {4: [0.86, 0.86]}, [0.86, 0.86], lr=1e-3)
    write(tmp_path, templates, {4: [0.86, 0.86]}, [], lr=3e-4)
    _, _, ranks, _ = analyse(tmp_path)
    assert row_at(ranks, 4)["lr"] == pytest.approx(3e-4)


def test_recommendation_takes_the_smallest_rank_that_qualifies(tmp_path, templates):
    write(tmp_path, templates, {1: [0.80, 0.801, 0.799], 4: [0.854, 0.855, 0.856], 16: [0.86, 0.861, 0.859]}, [0.86, 0.86, 0.86])
    _, _, ranks, rec = analyse(tmp_path)
    assert list(ranks.sort_values("r")["verdict"]) == ["worse", "qualifies", "qualifies"]
    best = rec.iloc[0]
    assert best["r"] == 4 and best["delta"] == pytest.approx(-0.5) and best["delta_low"] > -1.0 and best["seeds"] == 3
    assert best["recommendation"].startswith("r=4 (lr=0.005, chosen on the tuning split): Δ = -0.50 [")
    assert "against full FT (lr=0.0002), above −1, over 3 paired seeds" in best["recommendation"]
    _, _, _, wide = analyse(tmp_path, margin=7.0)
    assert wide.iloc[0]["r"] == 1  # 6 points worse, but within a 7-point margin


def test_one_seed_never_qualifies_even_when_its_point_value_would(tmp_path, templates):
    write(tmp_path, templates, {4: [0.858], 8: [0.859]}, [0.86])
    _, _, ranks, rec = analyse(tmp_path)
    assert (ranks["delta"] > -1.0).all()  # the point values are within the 1-point margin...
    assert list(ranks["verdict"]) == ["inconclusive", "inconclusive"]  # ...but one seed says nothing of training noise
    assert "one seed: training noise unknown" in ranks.iloc[0]["verdict_text"]
    text = rec.iloc[0]["recommendation"]
    assert text.startswith("none yet: the evidence is too weak at r=4, r=8") and "closest: r=8" in text
    assert pd.isna(rec.iloc[0].get("r"))


def test_a_wide_interval_is_inconclusive_and_a_tight_one_qualifies(tmp_path, templates):
    # r=2's mean is as close to full FT as r=8's, but its seeds disagree by ±5 points
    write(tmp_path, templates, {2: [0.80, 0.855, 0.91], 8: [0.854, 0.855, 0.856]}, [0.86, 0.86, 0.86])
    _, _, ranks, rec = analyse(tmp_path)
    r2 = row_at(ranks, 2)
    assert r2["delta"] == pytest.approx(-0.5) and r2["verdict"] == "inconclusive"
    assert r2["delta_low"] < -1.0 < r2["delta_high"] and "straddles -1" in r2["verdict_text"]
    assert row_at(ranks, 8)["verdict"] == "qualifies" and rec.iloc[0]["r"] == 8


def test_recommendation_when_lora_is_significantly_worse_at_every_rank(tmp_path, templates):
    write(tmp_path, templates, {1: [0.70, 0.702, 0.698], 8: [0.75, 0.751, 0.749]}, [0.86, 0.86, 0.86])
    _, _, ranks, rec = analyse(tmp_path)
    assert list(ranks["verdict"]) == ["worse", "worse"] and (ranks["delta_high"] < -1.0).all()
    assert rec.iloc[0]["recommendation"] == ("none: LoRA is significantly worse than full FT by more than 1 points at every "
                                             "rank tried (best: r=8, Δ = -11.00)")
    assert pd.isna(rec.iloc[0].get("r"))


def test_inconclusive_ranks_name_the_ones_significantly_worse(tmp_path, templates):
    write(tmp_path, templates, {1: [0.70, 0.702, 0.698], 8: [0.80, 0.855, 0.91]}, [0.86, 0.86, 0.86])
    _, _, _, rec = analyse(tmp_path)
    text = rec.iloc[0]["recommendation"]
    assert text.startswith("none yet: the evidence is too weak at r=8 (significantly worse at r=1); closest: r=8, inconclusive")


@pytest.mark.slow
def test_diverged_runs_are_never_recommended(tmp_path, templates):
    lora_t, _ = templates
    write(tmp_path, templates, {4: [0.855, 0.856, 0.854]}, [0.86, 0.86, 0.86])
    for seed in range(3):  # r=1 ran away at every seed: its records hold no metric
        records.write_record(tmp_path, variant(lora_t, seed, r=1, status="diverged", diverged_at_step=7,
                                               error="training loss ran away at step 7: ..."))
    df, agg, ranks, rec = analyse(tmp_path)
    assert (df["status"] == "diverged").sum() == 3 and df[df["status"] == "diverged"]["primary_value"].isna().all()
    assert 1 not in set(agg["r"].dropna()) and 1 not in set(ranks["r"])
    assert rec.iloc[0]["r"] == 4
    text = reporting.write(tmp_path).read_text()
    assert text.count("| diverged |") == 3


def test_a_learning_rate_that_diverged_at_some_seed_is_not_chosen(tmp_path, templates):
    """lr=4e-3 looks best on the tuning split at the two seeds where it did not run away; a learning rate that
    diverges at one seed in three is not a setting to recommend, and its surviving seeds are not a fair sample."""
    lora_t, _ = templates
    write(tmp_path, templates, {4: [0.855, 0.856, 0.854]}, [0.86, 0.86, 0.86], lr=1e-3)
    for seed in range(2):
        records.write_record(tmp_path, variant(lora_t, seed, 0.86, 0.90, r=4, lr=4e-3))
    records.write_record(tmp_path, variant(lora_t, 2, r=4, lr=4e-3, status="diverged", diverged_at_step=5,
                                           error="training loss ran away at step 5: ..."))
    _, _, ranks, rec = analyse(tmp_path)
    assert row_at(ranks, 4)["lr"] == pytest.approx(1e-3)


@pytest.mark.slow
def test_suspicious_done_runs_are_flagged(tmp_path, templates):
    lora_t, full_t = templates
    majority = max(LABELS["dev"].mean(), 1 - LABELS["dev"].mean())
    write(tmp_path, templates, {4: [0.85, 0.85]}, [0.86, 0.86])
    chance = variant(lora_t, 0, float(majority), r=16)  # a constant predictor would score the same
    rising = variant(lora_t, 0, 0.84, r=32, budget=dict(lora_t["budget"], initial_loss=0.69, final_loss=0.93))
    falling = variant(lora_t, 0, 0.84, r=64, budget=dict(lora_t["budget"], initial_loss=0.69, final_loss=0.31, still_improving=True,
                                                           slope_per_100_steps=-0.2, slope_se=0.01))
    for record in (chance, rising, falling):
        records.write_record(tmp_path, record)
    reporting.write(tmp_path)
    flags = pd.read_csv(tmp_path.parent / "tables" / "flags.csv").set_index("run_id")
    assert set(flags.index) == {chance["run_id"], rising["run_id"], falling["run_id"]}
    assert f"accuracy {majority:.3f} at chance level ({majority:.3f}, a constant predictor)" in flags.loc[chance["run_id"], "flags"]
    assert flags.loc[rising["run_id"], "flags"] == "final training loss 0.93 above the initial 0.69"
    assert flags.loc[falling["run_id"], "flags"] == "loss still falling at the end (-0.200 ± 0.010 per 100 steps)"
    assert "## Runs to look at" in (tmp_path.parent / "report.md").read_text()


@pytest.mark.slow
def test_report_lists_every_run_and_draws_the_plots(tmp_path, templates):
    runs = tmp_path / "runs"
    write(runs, templates, {1: [0.80, 0.81], 4: [0.84, 0.85]}, [0.86, 0.87])
    failed = variant(templates[0], 0, r=64, status="failed", error="RuntimeError: out of memory")
    records.write_record(runs, failed)
    old = dict(variant(templates[0], 0, 0.5, r=32), schema_version=records.SCHEMA_VERSION - 1)
    records.write_record(runs, old)
    path = reporting.write(runs)
    text = path.read_text()
    df, skipped = load_records(runs)
    assert len(df) == 7 and all(rid in text for rid in df["run_id"])
    assert "out of memory" in text
    assert f"schema version {records.SCHEMA_VERSION - 1}, this analysis reads version {records.SCHEMA_VERSION}" in text
    assert "runs: 7 (6 done, 1 failed) in 3 configurations" in text
    assert (tmp_path / "runs.parquet").is_file() and len(pd.read_parquet(tmp_path / "runs.parquet")) == len(df)
    assert "examples" not in pd.read_parquet(tmp_path / "runs.parquet").columns
    slug = f"{df['task'][0]}_{df['model'][0]}"
    svg = (tmp_path / "plots" / f"{slug}_metric_vs_params.svg").read_text()
    assert "trainable parameters (log scale)" in svg and "full FT" in svg and "Pareto frontier" in svg and "r=4" in svg
    assert "peak tensor memory on CPU (MiB)" in (tmp_path / "plots" / f"{slug}_metric_vs_memory.svg").read_text()
    split = (tmp_path / "plots" / f"{slug}_memory_split.svg").read_text()
    assert all(part in split for part in ("weights", "optimizer", "activations", "full FT"))
    assert "optimizer step (log scale)" in (tmp_path / "plots" / f"{slug}_loss.svg").read_text()
    assert "alpha=16" in (tmp_path / "plots" / f"{slug}_metric_vs_rank.svg").read_text()
    assert not (tmp_path / "plots" / f"{slug}_metric_vs_lr.svg").exists()  # no learning-rate grid here
    assert (tmp_path / "tables" / "recommendation.csv").is_file()
    assert "no update analyses" in text  # these records' artifacts are elsewhere: one line, no crash
    assert "learning against forgetting" in (tmp_path / "plots" / f"{slug}_forgetting.svg").read_text()


@pytest.mark.slow
def test_update_analyses_come_from_the_saved_artifacts_and_then_from_their_cached_tables(tmp_path, tiny_bert_dir):
    runs = tmp_path / "runs"
    experiment.run(compose(*TINY, "train.save_adapter=true", "train.forgetting_examples=16", f"model.name_or_path={tiny_bert_dir}",
                           f"runs_dir={runs}", f"cache_dir={tmp_path / 'cache'}"))
    text = reporting.write(runs).read_text()
    assert "measured from the saved artifacts of 2 runs" in text
    ranks = pd.read_csv(tmp_path / "tables" / "update_ranks.csv")
    assert set(ranks["method"]) == {"lora", "full"} and (ranks.loc[ranks["method"] == "lora", "rank90"] <= 8).all()
    pattern = yaml.safe_load(next((tmp_path / "tables").glob("rank_pattern_*.yaml")).read_text())
    assert sum(pattern.values()) == 8 * len(pattern) == 8 * 4  # tiny BERT, qv: one shape, so the same total rank as r=8
    shutil.rmtree(runs / "artifacts")
    again = reporting.write(runs).read_text()
    assert "read from the cached tables" in again and "Rank advisor" in again


@pytest.mark.slow
def test_phi_is_read_whole_from_its_cache_when_a_run_it_pairs_has_lost_its_artifact(tmp_path, tiny_bert_dir):
    """A run added after the artifacts of the runs φ pairs are gone (a clean clone, then one more run) must not shrink
    φ to what the new artifact alone can pair: φ is measured whole or read whole from the cache."""
    runs = tmp_path / "runs"

    def run(*overrides):
        experiment.run(compose(*TINY, "train.save_adapter=true", "train.forgetting_examples=16", f"model.name_or_path={tiny_bert_dir}",
                               f"runs_dir={runs}", f"cache_dir={tmp_path / 'cache'}", *overrides))

    run("train.seed=0")
    run("train.seed=1")
    reporting.write(runs)
    phi = pd.read_parquet(tmp_path / "tables" / "phi.parquet")
    assert set(phi["comparison"]) == {"r=8: seed vs seed"}
    shutil.rmtree(runs / "artifacts")
    run("train.seed=0", "method.r=4")
    text = reporting.write(runs).read_text()
    assert "φ read from the cached tables" in text
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "tables" / "phi.parquet"), phi)


@pytest.mark.slow
def test_a_missing_baseline_is_stated(tmp_path, templates):
    runs = tmp_path / "runs"
    write(runs, templates, {4: [0.84]}, [0.86])
    lora = load_records(runs)[0].query("method == 'lora'").iloc[0]
    records.record_path(runs, lora["baseline_run_id"]).unlink()
    text = reporting.write(runs).read_text()
    assert "No full fine-tuning baseline finished" in text
    assert "no paired full-FT baseline with per-example outputs: nothing to compare with" in text


@pytest.mark.slow
def test_a_context_without_a_baseline_is_stated_beside_one_with(tmp_path, templates):
    lora_t, _ = templates
    write(tmp_path, templates, {4: [0.855, 0.856, 0.854]}, [0.86, 0.86, 0.86])
    for seed in range(3):  # the same rank on another device: a context with no full-FT run
        records.write_record(tmp_path, variant(lora_t, seed, 0.85, r=4, device="cuda"))
    _, _, ranks, rec = analyse(tmp_path)
    assert len(ranks) == 2 and ranks["verdict"].isna().sum() == 1
    rec = rec.set_index("context_id")
    assert rec.loc[lora_t["context_id"], "r"] == 4
    cuda = next(c for c in rec.index if c != lora_t["context_id"])
    assert rec.loc[cuda, "recommendation"] == "no paired full-FT baseline with per-example outputs: nothing to compare with"
    reporting.write(tmp_path)  # the report is written for both


@pytest.mark.slow
def test_runs_without_a_memory_probe_are_reported(tmp_path, templates):
    lora_t, full_t = templates
    unprobed = {"peak_bytes": None, "split_bytes": None, "grad_bytes_after_backward": None}
    for seed in range(2):
        records.write_record(tmp_path, variant(full_t, seed, 0.86, memory=dict(full_t["memory"], **unprobed)))
        records.write_record(tmp_path, variant(lora_t, seed, 0.85, r=4, memory=dict(lora_t["memory"], **unprobed)))
    assert "r=4" in reporting.write(tmp_path).read_text()


@pytest.fixture(scope="module")
def loss_templates(tiny_llama_dir, tmp_path_factory):
    """A real instruction-tuning LoRA record and its baseline, from a tiny Llama run (loss: lower is better)."""
    folder = tmp_path_factory.mktemp("loss-template")
    lora = experiment.run(compose(
        f"model.name_or_path={tiny_llama_dir}", "model.name=tiny_llama", "task=instruct/alpaca", "task.heldout_examples=4",
        "task.tune_examples=4", "task.max_train_examples=8", "train.max_steps=2", "train.batch_size=4", "train.max_seq_len=48",
        "train.eval_batch_size=4", "train.save_adapter=false", "train.threads=1",
        f"runs_dir={folder}", f"cache_dir={folder / 'cache'}"))
    return lora, records.read_record(folder, lora["baseline_run_id"])


def loss_variant(template: dict, seed: int, loss: float, noise: float) -> dict:
    """`template` at `seed` with per-example (summed loss, response tokens) giving exactly `loss` per token."""
    record = variant(template, seed)
    tokens = np.random.default_rng(seed).integers(5, 60, N).astype(float)
    shared = np.random.default_rng(seed).normal(0, 0.3, N)  # what the seed's runs find hard or easy alike
    own = np.random.default_rng([seed, zlib.crc32(record["config_id"].encode())]).normal(0, noise, N)
    per_token = loss + shared + own
    per_token += loss - (per_token * tokens).sum() / tokens.sum()  # exactly `loss` over all tokens
    outputs = np.stack([per_token * tokens, tokens], axis=1).tolist()
    metrics = {"loss": loss, "perplexity": float(np.exp(loss)), "eval_tokens": float(tokens.sum())}
    record.update(metrics=metrics, primary_value=loss, tune_metrics=metrics, tune_value=loss,
                  examples={"dev": {"ids": list(range(N)), "labels": None, "outputs": outputs}})
    return record


@pytest.mark.slow
def test_a_loss_metric_is_compared_lower_is_better_and_has_no_share_of_full(tmp_path, loss_templates):
    lora_t, full_t = loss_templates
    assert lora_t["primary_metric"] == "loss" and lora_t["examples"]["dev"]["labels"] is None
    for seed, (lora_loss, full_loss) in enumerate([(1.83, 1.80), (1.81, 1.79), (1.82, 1.81)]):
        records.write_record(tmp_path, loss_variant(lora_t, seed, lora_loss, 0.02))
        records.write_record(tmp_path, loss_variant(full_t, seed, full_loss, 0.02))
    df, _, ranks, rec = analyse(tmp_path)
    rank = ranks.iloc[0]
    assert rank["margin"] == 0.02 and rank["primary_unit"] == "nats/token"
    assert rank["delta"] == pytest.approx(-0.02)  # LoRA's loss is higher: negative is worse, as for a score
    reporting.write(tmp_path)
    table = pd.read_csv(tmp_path.parent / "tables" / "alpaca_tiny_llama.csv", dtype=str)
    assert "% of full" not in table.columns  # a share of full FT's loss means nothing
    assert table.loc[0, "eval (± 95% CI over seeds)"].startswith("1.82 ± ")
    assert "Δ vs full FT, nats/token [95% CI]" in table.columns and table.loc[0, "Δ vs full FT, nats/token [95% CI]"].startswith("-0.02 [")
    assert run_flag_free(tmp_path)


def run_flag_free(folder) -> bool:
    """No loss-metric run is ever called 'at chance level' (a loss has no constant-predictor level)."""
    flags = pd.read_csv(folder.parent / "tables" / "flags.csv")
    return not flags["flags"].fillna("").str.contains("chance level").any()


@pytest.mark.parametrize("own_process", [pytest.param(True, marks=pytest.mark.slow, id="process"),
                                         pytest.param(False, id="in-process")])
def test_empty_or_missing_folder_gives_one_clear_error(tmp_path, capsys, own_process):
    """`python -m lora_sweep.reporting` in a process of its own, and lora-analyze's entry point in this process."""
    with pytest.raises(UserError, match="no results folder"):
        load_records(tmp_path / "nowhere")
    (tmp_path / "runs").mkdir()
    if own_process:
        result = subprocess.run([sys.executable, "-m", "lora_sweep.reporting", str(tmp_path)], capture_output=True, text=True)
    else:
        with pytest.raises(SystemExit) as exit_info:
            reporting.main([str(tmp_path)])
        result = SimpleNamespace(returncode=exit_info.value.code, stderr=capsys.readouterr().err)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: no readable run records in {tmp_path / 'runs'}"]


@pytest.mark.slow
def test_the_report_estimates_the_recommended_rank_on_a_target_model(tmp_path, templates):
    runs = tmp_path / "runs"
    write(runs, templates, {1: [0.80, 0.801, 0.799], 4: [0.854, 0.855, 0.856]}, [0.86, 0.86, 0.86])
    text = reporting.write(runs, target_model="qwen2_5_0_5b").read_text()
    section = text.split("## At your scale: qwen2_5_0_5b")[1].split("\n## ")[0]
    assert "r=4 on qv (the recommended rank)" in section
    assert "| LoRA r=4 qv " in section and "| full FT " in section
    plot = (tmp_path / "plots" / "estimate_qwen2_5_0_5b_sst2_minilm_l6_qv.svg").read_text()
    assert all(part in plot for part in ("r=1", "r=4", "full FT", "device memory (80 GiB)"))
    assert "## At your scale" not in reporting.write(runs).read_text()  # no target model, no section
    lora_t = copy.deepcopy(templates[0])  # a per-layer rank pattern beside the uniform ranks: the swept model's own
    pattern = {"bert.encoder.layer.0.attention.self.query": 6}
    lora_t["identity"]["config"]["method"]["rank_pattern"] = pattern
    for seed, value in enumerate([0.85, 0.851, 0.852]):
        records.write_record(runs, variant(lora_t, seed, value, r=4, rank_pattern=pattern, rank_pattern_source="advised"))
    section = reporting.write(runs, target_model="qwen2_5_0_5b").read_text().split("## At your scale: qwen2_5_0_5b")[1].split("\n## ")[0]
    assert "rank_pattern" not in section and "### " not in section and "r=4 on qv (the recommended rank)" in section


@pytest.mark.slow
def test_each_context_of_a_sweep_is_estimated_at_its_own_rank_and_budget(tmp_path, templates):
    runs = tmp_path / "runs"
    write(runs, templates, {1: [0.80, 0.801, 0.799], 4: [0.854, 0.855, 0.856]}, [0.86, 0.86, 0.86])
    other = []
    for template in templates:  # the same task at batch 16: another context
        template = copy.deepcopy(template)
        template["identity"]["config"]["train"]["batch_size"] = template["config"]["train"]["batch_size"] = 16
        other.append(template)
    write(runs, other, {1: [0.858, 0.86, 0.859], 4: [0.85, 0.849, 0.851]}, [0.86, 0.86, 0.86])
    section = reporting.write(runs, target_model="qwen2_5_0_5b").read_text().split("## At your scale: qwen2_5_0_5b")[1].split("\n## ")[0]
    parts = section.split("\n### ")[1:]
    assert len(parts) == 2
    batch = {int(re.search(r"\(batch (\d+),", part).group(1)): part for part in parts}
    assert "r=4 on qv (the recommended rank)" in batch[8] and "r=1 on qv (the recommended rank)" in batch[16]


@pytest.mark.slow
def test_forgetting_of_one_seed_is_reported_without_an_interval(tmp_path, templates):
    runs = tmp_path / "runs"
    assert templates[0]["forgetting"]["forgetting"] is not None  # the template runs measured it
    write(runs, templates, {4: [0.85]}, [0.86])
    line = next(x for x in reporting.write(runs).read_text().splitlines() if x.startswith("sst2 · minilm_l6: forgetting"))
    assert line.count("(one seed: no interval)") == 2 and "±" not in line.split("):", 1)[1]
    assert "cannot say which method forgot more" in line
    write(runs, templates, {4: [0.85, 0.84]}, [0.86, 0.85])  # a second seed: intervals
    line = next(x for x in reporting.write(runs).read_text().splitlines() if x.startswith("sst2 · minilm_l6: forgetting"))
    assert "one seed" not in line and line.split("):", 1)[1].count(" ± ") == 2


@pytest.mark.slow
@pytest.mark.parametrize("lora_mid,word", [(0.70, "closing"), (0.795, "widening"), (0.80, "steady")])
def test_learning_curves_give_the_paired_gap_at_each_checkpoint_and_its_trend(tmp_path, templates, lora_mid, word):
    """Full FT at 0.80 then 0.86 on the tuning split; LoRA r=4 at `lora_mid` then 0.85 (a seed-dependent wiggle for the
    trend's interval): the gap at each checkpoint is the paired difference of these accuracies, and its move from the
    middle to the end says closing, widening or steady."""
    lora_t, full_t = templates
    for seed, wiggle in enumerate((0.0, 0.001, -0.001)):
        records.write_record(tmp_path, variant(full_t, seed, 0.86, curve={1: 0.80}))
        mid = lora_mid if word != "steady" else 0.81 + [0.0, 0.03, -0.03][seed]
        records.write_record(tmp_path, variant(lora_t, seed, 0.85, r=4, curve={1: mid + wiggle}))
    df, _, ranks, _ = analyse(tmp_path)
    gaps = curves.gaps(df, ranks).set_index("step")
    assert list(gaps.index) == [1, 2] and gaps["fraction"].tolist() == [0.5, 1.0]
    expected_mid = 100 * (np.mean([(lora_mid if word != "steady" else 0.81 + d) + w for d, w in
                                   zip([0.0, 0.03, -0.03], (0.0, 0.001, -0.001))]) - 0.80)
    assert gaps.loc[1, "delta"] == pytest.approx(expected_mid, abs=0.051)  # accuracies are whole examples of 1,000
    assert gaps.loc[2, "delta"] == pytest.approx(-1.0, abs=0.051)
    assert gaps.loc[1, "delta_low"] < gaps.loc[1, "delta"] < gaps.loc[1, "delta_high"]
    moved = curves.trend(gaps.reset_index())
    assert moved["word"] == word
    late = curves.still_improving(df, row_at(ranks, 4)["config_id"], "accuracy")
    assert late["change"] == pytest.approx(100 * 0.85 - np.mean([gaps.loc[1, "lora"]]), abs=0.051)
    reporting.write(tmp_path)
    text = (tmp_path.parent / "report.md").read_text()
    assert f"**The gap to full FT was {word}**" in text and "### Learning curves (tuning split)" in text


@pytest.mark.slow
def test_batching_comparison_pairs_each_batching_with_random_batches(tmp_path, templates):
    """LoRA r=4 at 0.85 on every seed with random and sorted batches (each its own examples right), and at 0.83 with
    grouped batches: sorted does not differ from random, grouped is 2 points worse and says so."""
    lora_t, _ = templates
    for seed in range(3):
        for batching, value in (("random", 0.85), ("sorted", 0.85), ("grouped", 0.83)):
            records.write_record(tmp_path, variant(lora_t, seed, value, r=4, batching=batching))
    df, agg, _, _ = analyse(tmp_path)
    compared = tables.compare_batching(df, agg).set_index("batching")
    assert set(compared.index) == {"random", "sorted", "grouped"}
    assert compared.loc["sorted", "delta"] == pytest.approx(0.0, abs=1e-9) and not compared.loc["sorted", "differs"]
    assert compared.loc["grouped", "delta"] == pytest.approx(-2.0, abs=1e-9) and compared.loc["grouped", "differs"]
    assert compared.loc["grouped", "delta_high"] < 0 < compared.loc["sorted", "delta_high"]
    assert compared["paired_seeds"].dropna().tolist() == [3, 3]
    reporting.write(tmp_path)
    assert "## Batching: does the way batches are drawn move the result?" in (tmp_path.parent / "report.md").read_text()


def test_a_folder_where_every_run_failed_is_analysed_and_reported(tmp_path, templates):
    """Nothing finished: no configuration, no rank, no recommendation, and the report still lists every run."""
    lora_t, full_t = templates
    for seed in (0, 1):
        records.write_record(tmp_path, variant(full_t, seed, status="failed", error="RuntimeError: boom"))
        records.write_record(tmp_path, variant(lora_t, seed, status="failed", error="RuntimeError: boom"))
    from lora_sweep.analysis import analyse as analyse_runs

    result = analyse_runs(*load_records(tmp_path))
    assert len(result.runs) == 4 and result.agg.empty and result.ranks.empty and result.recommendation.empty
    text = reporting.write(tmp_path).read_text()
    assert "No LoRA configuration finished." in text and text.count("RuntimeError: boom") == 4


def test_a_lora_run_whose_baseline_read_other_data_is_flagged_not_paired(tmp_path, templates):
    """The data file changed between a LoRA run and its baseline: their contexts differ, the report says why."""
    lora_t, full_t = templates
    lora = variant(lora_t, 0, 0.80)
    other = variant(full_t, 0, 0.82)
    other["identity"]["config"]["task"]["data"] = {"files": {"train": "0" * 16}}
    other.update(run_id=identity.run_id(other["identity"]), context_id=identity.context_id(other["identity"]))
    lora["baseline_run_id"] = other["run_id"]
    for record in (lora, other):
        records.write_record(tmp_path, record)
    flags = tables.run_flags(load_records(tmp_path)[0])
    flagged = flags.set_index("run_id")["flags"]
    assert f"its full-FT baseline {other['run_id']} read other data" in flagged[lora["run_id"]]
    assert "read other data" not in flagged.get(other["run_id"], "")
