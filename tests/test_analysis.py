"""Analysis on a fixture folder of records written by the project's own writer."""

import copy
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from analysis import report, tables
from analysis.load import load_records
from lora_sweep import experiment, records
from lora_sweep.errors import UserError
from lora_sweep.settings import compose

TINY = ["task.max_train_examples=32", "task.max_eval_examples=16", "train.max_steps=2", "train.batch_size=8", "train.save_adapter=false"]


@pytest.fixture(scope="module")
def templates(tiny_bert_dir, tmp_path_factory):
    """A real LoRA record and its real baseline, from a tiny run: the shapes every fixture record copies."""
    folder = tmp_path_factory.mktemp("template")
    settings = compose(*TINY, f"model.name_or_path={tiny_bert_dir}", f"results_dir={folder}", f"cache_dir={folder / 'cache'}")
    lora = experiment.run(settings)
    return lora, records.read_record(folder, lora["baseline_run_id"])


def variant(template: dict, **changes) -> dict:
    record = copy.deepcopy(template)
    record.update(changes)
    record["metrics"] = {record["primary_metric"]: record["primary_value"]}
    record["run_id"] = records.run_id({k: record[k] for k in ("method", "r", "seed", "lr", "targets", "scaling", "task")})
    return record


def write_fixture(folder, templates, lora_values: dict[int, list[float]], full_values: list[float], lr=5e-4):
    """LoRA records at ranks -> one value per seed, and full-FT baselines, one per seed."""
    lora_t, full_t = templates
    baselines = []
    for seed, value in enumerate(full_values):
        baselines.append(variant(full_t, seed=seed, primary_value=value))
        records.write_record(folder, baselines[-1])
    for r, seed_values in lora_values.items():
        for seed, value in enumerate(seed_values):
            params = dict(lora_t["params"], trainable=lora_t["params"]["head"] + 100 * r)
            records.write_record(folder, variant(lora_t, r=r, seed=seed, lr=lr, primary_value=value, params=params,
                                                 baseline_run_id=baselines[seed]["run_id"]))
    return baselines


def paired_table(folder):
    df, _ = load_records(folder)
    agg = tables.aggregate(df)
    return df, agg, tables.pair_with_baselines(df, agg)


def test_aggregates_match_hand_computed_mean_and_ci(tmp_path, templates):
    write_fixture(tmp_path, templates, {4: [0.80, 0.82, 0.84]}, [0.85, 0.86, 0.87])
    df, agg, paired = paired_table(tmp_path)
    row = paired.iloc[0]
    assert row["primary_value_mean"] == pytest.approx(0.82)
    assert row["primary_value_std"] == pytest.approx(0.02)
    assert row["primary_value_ci95"] == pytest.approx(4.302653 * 0.02 / np.sqrt(3), rel=1e-5)
    assert row["primary_value_n"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["full_mean"] == pytest.approx(0.86) and row["full_n"] == 3
    assert row["delta"] == pytest.approx(-4.0)
    assert row["pct_of_full"] == pytest.approx(100 * 0.82 / 0.86)
    assert row["param_ratio"] == pytest.approx(row["params_trainable_mean"] / templates[1]["params"]["trainable"])
    assert len(df) == 6 and len(agg) == 2


def test_recommendation_takes_the_smallest_rank_within_tolerance(tmp_path, templates):
    write_fixture(tmp_path, templates, {1: [0.80], 4: [0.855], 16: [0.86]}, [0.86])
    _, _, paired = paired_table(tmp_path)
    rec = tables.recommend(paired, tolerance=1.0).iloc[0]
    assert rec["r"] == 4 and rec["delta"] == pytest.approx(-0.5)
    assert tables.recommend(paired, tolerance=7.0).iloc[0]["r"] == 1


def test_recommendation_when_none_qualifies(tmp_path, templates):
    write_fixture(tmp_path, templates, {1: [0.70], 8: [0.75]}, [0.86])
    _, _, paired = paired_table(tmp_path)
    rec = tables.recommend(paired).iloc[0]
    assert rec["recommendation"].startswith("none within tolerance (best: r=8, -11.00 points")
    assert pd.isna(rec.get("r"))


def test_recommendation_with_seeds_uses_the_confidence_interval(tmp_path, templates):
    # r=2 has the right mean (0.855) but a wide interval; r=8 is tight and qualifies
    write_fixture(tmp_path, templates, {2: [0.80, 0.855, 0.91], 8: [0.854, 0.855, 0.856]}, [0.86, 0.86, 0.86])
    _, _, paired = paired_table(tmp_path)
    assert tables.recommend(paired).iloc[0]["r"] == 8


def test_recommendation_ties_go_to_the_lower_learning_rate(tmp_path, templates):
    write_fixture(tmp_path, templates, {4: [0.86]}, [0.86], lr=1e-3)
    lora_t, _ = templates
    baseline = next(r for r in load_records(tmp_path)[0].itertuples() if r.method == "full").run_id
    records.write_record(tmp_path, variant(lora_t, r=4, seed=0, lr=3e-4, primary_value=0.86, baseline_run_id=baseline))
    _, _, paired = paired_table(tmp_path)
    assert tables.recommend(paired).iloc[0]["lr"] == pytest.approx(3e-4)


def test_report_lists_every_run_and_draws_the_plots(tmp_path, templates):
    runs = tmp_path / "runs"
    write_fixture(runs, templates, {1: [0.80, 0.81], 4: [0.84, 0.85]}, [0.86, 0.87])
    failed = variant(templates[0], r=64, seed=0, primary_value=None, status="failed", error="RuntimeError: out of memory")
    records.write_record(runs, failed)
    old = dict(variant(templates[0], r=32, seed=0, primary_value=0.5), schema_version=0)
    records.write_record(runs, old)
    path = report.write(runs)
    text = path.read_text()
    df, skipped = load_records(runs)
    assert all(rid in text for rid in df["run_id"])
    assert "out of memory" in text and "schema version 0, this analysis reads version 1" in text
    assert (tmp_path / "runs.parquet").is_file() and len(pd.read_parquet(tmp_path / "runs.parquet")) == len(df)
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


def test_a_missing_baseline_is_stated(tmp_path, templates):
    runs = tmp_path / "runs"
    baselines = write_fixture(runs, templates, {4: [0.84]}, [0.86])
    records.record_path(runs, baselines[0]["run_id"]).unlink()
    text = report.write(runs).read_text()
    assert "No full fine-tuning baseline finished" in text and "1 of 1 baseline run(s) missing" in text


def test_empty_or_missing_folder_gives_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no results folder"):
        load_records(tmp_path / "nowhere")
    (tmp_path / "runs").mkdir()
    result = subprocess.run([sys.executable, "-m", "analysis.cli", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: no readable run records in {tmp_path / 'runs'}"]
