"""The real embedded model on a few real SST-2 batches: a complete record, and the same seed gives the same run."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lora_sweep import experiment, glue, identity, records
from lora_sweep.hub import resolve_model
from lora_sweep.settings import compose as compose_settings
from tests.conftest import SHARED_DATA

FEW = ["train.max_steps=4", "train.batch_size=8", "train.log_every=2", "task.max_train_examples=64", "task.max_eval_examples=48",
       "task.tune_examples=40", "train.threads=1", "train.forgetting_examples=32"]


def settings_for(tmp_path, *overrides):
    return compose_settings(*FEW, f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", *overrides)


@pytest.mark.slow
def test_one_lora_run_writes_a_complete_record_with_its_baseline(tmp_path):
    record = experiment.run(settings_for(tmp_path, "method.r=4"))
    on_disk = json.loads(records.record_path(tmp_path / "runs", record["run_id"]).read_text())
    assert on_disk == json.loads(json.dumps(record, default=str))
    assert record["status"] == "done" and record["error"] is None
    assert (record["model"], record["task"], record["method"], record["r"], record["alpha"], record["targets"], record["seed"]) == \
        ("minilm_l6", "sst2", "lora", 4, 16.0, "qv", 0)
    # 6 layers x (query + value) x (384 + 384) x r, plus pooler and classifier
    assert record["params"]["adapter"] == 6 * 2 * (384 + 384) * 4
    assert record["params"]["head"] == (384 * 384 + 384) + (384 * 2 + 2)
    assert record["params"]["trainable"] == record["params"]["adapter"] + record["params"]["head"]
    assert record["params"]["total"] == 22_713_986
    assert record["primary_metric"] == "accuracy" and 0 <= record["metrics"]["accuracy"] <= 1
    assert [step for step, _ in record["loss_curve"]] == [2, 4]
    memory = record["memory"]
    assert memory["device"] == "cpu" and memory["peak_bytes"] == sum(memory["split_bytes"].values())
    assert memory["split_bytes"]["optimizer"] == pytest.approx(8 * record["params"]["trainable"], rel=0.02)
    times = record["time"]
    assert times["steps"] == 4 and times["train_s"] > 0 and times["samples_per_s"] > 0 and times["tokens_per_s"] > times["samples_per_s"]
    assert record["artifact"]["bytes"] >= 4 * record["params"]["trainable"]
    assert record["environment"]["packages"]["peft"] and record["eval_examples"] == 48
    assert (record["train_examples"], record["tune_examples"]) == (64, 40)
    assert record["run_id"] == identity.run_id(record["identity"]) and record["config_id"] == identity.config_id(record["identity"])
    assert record["context_id"] == identity.context_id(record["identity"]) and record["identity"]["seed"] == 0

    # per-example outputs: the metrics are recomputed from them, on the real dev examples in file order
    dev = glue.read_tsv(glue.TASKS["sst2"], SHARED_DATA / "glue" / "SST-2" / "dev.tsv").select(range(48))
    examples = record["examples"]["dev"]
    outputs = np.asarray(examples["outputs"])
    assert examples["ids"] == list(range(48)) and examples["labels"] == list(dev["label"]) and outputs.shape == (48, 2)
    assert record["metrics"]["accuracy"] == pytest.approx(np.mean(outputs.argmax(axis=1) == np.asarray(dev["label"])))
    tune = record["examples"]["tune"]
    assert len(tune["ids"]) == len(set(tune["ids"])) == 40
    assert record["tune_value"] == record["tune_metrics"]["accuracy"] == pytest.approx(
        np.mean(np.argmax(tune["outputs"], axis=1) == np.asarray(tune["labels"])))
    # token counts: every dev token counted once; training computes padding but far less than it reads
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(record["model_name_or_path"], tmp_path / "cache"))
    lengths = [len(ids) for ids in tokenizer(list(dev["text_a"]), truncation=True, max_length=64)["input_ids"]]
    assert record["tokens"]["dev"]["real_tokens"] == sum(lengths)
    for split in ("train", "tune", "dev"):
        counts = record["tokens"][split]
        assert counts["computed_tokens"] >= counts["real_tokens"] > 0
        assert counts["padding_fraction"] == pytest.approx(1 - counts["real_tokens"] / counts["computed_tokens"])
    assert times["tokens_per_s"] == pytest.approx(record["tokens"]["train"]["real_tokens"] / times["train_s"])
    budget = record["budget"]
    assert budget["tail_steps"] == 1 and budget["still_improving"] is None  # 4 steps: too few to fit a trend
    assert budget["initial_loss"] > 0 and budget["final_loss"] == pytest.approx(np.mean([loss for _, loss in record["loss_curve"]]))

    baseline = records.read_record(tmp_path / "runs", record["baseline_run_id"])
    assert baseline["status"] == "done" and baseline["method"] == "full" and record["baseline_status"] == "done"
    assert baseline["params"]["trainable"] == baseline["params"]["total"]
    assert baseline["memory"]["peak_bytes"] > memory["peak_bytes"]
    assert baseline["context_id"] == record["context_id"] and baseline["config_id"] != record["config_id"]
    assert baseline["identity"]["config"]["method"] == record["identity"]["config"]["baseline"]
    assert baseline["examples"]["dev"]["ids"] == examples["ids"] and baseline["examples"]["tune"]["ids"] == tune["ids"]  # paired
    assert baseline["tokens"]["train"] == record["tokens"]["train"]  # the same batches in the same order
    # forgetting: one base-model value, computed once (by the baseline, which ran first) and reused
    lost, base_lost = record["forgetting"], baseline["forgetting"]
    assert lost["probe"] == "stsb_zero_shot_spearman" and lost["examples"] == 32 and lost["data"]["file"] == "STS-B/dev.tsv"
    assert lost["before"] == base_lost["before"] and 70 < lost["before"] < 95  # MiniLM's own job: ~86 points zero-shot
    assert lost["before_from_cache"] and not base_lost["before_from_cache"]
    assert lost["forgetting"] == pytest.approx(lost["before"] - lost["after"]) and lost["forgetting"] != 0


@pytest.mark.slow
def test_same_seed_twice_gives_identical_results_and_the_second_is_skipped(tmp_path):
    overrides = ("pair_baseline=false", "train.save_adapter=false", "train.memory_probe=false")
    first = experiment.run(settings_for(tmp_path, *overrides))
    again = experiment.run(settings_for(tmp_path, *overrides, "rerun=true"))
    assert again["run_id"] == first["run_id"]
    assert again["metrics"] == first["metrics"] and again["loss_curve"] == first["loss_curve"]
    assert again["examples"] == first["examples"] and again["tune_metrics"] == first["tune_metrics"]
    assert len(list((tmp_path / "runs" / "history").glob("*.json"))) == 1  # the replaced record is kept
    skipped = experiment.run(settings_for(tmp_path, *overrides))
    assert skipped["started_at"] == again["started_at"]
    other_seed = experiment.run(settings_for(tmp_path, *overrides, "train.seed=1"))
    assert other_seed["run_id"] != first["run_id"] and other_seed["loss_curve"] != first["loss_curve"]
    assert other_seed["config_id"] == first["config_id"] and other_seed["context_id"] == first["context_id"]
    assert other_seed["examples"]["dev"]["ids"] == first["examples"]["dev"]["ids"]  # eval and tuning examples do not depend on the seed
    assert other_seed["examples"]["tune"]["ids"] == first["examples"]["tune"]["ids"]


@pytest.mark.slow
@pytest.mark.parametrize("lr,reason", [("1e30", "loss became NaN or infinite at step {step}"),
                                       ("1e4", "training loss ran away at step {step}: mean of the last ")])
def test_a_diverging_run_is_recorded_as_diverged_with_its_step(tmp_path, tiny_bert_dir, lr, reason):
    record = experiment.run(compose_settings(
        *FEW, f"model.name_or_path={tiny_bert_dir}", "method=full", f"method.lr={lr}", "train.warmup_ratio=0",
        "train.max_steps=20", f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"))
    assert record["status"] == "diverged" and record["error"].startswith(reason.format(step=record["diverged_at_step"]))
    assert 1 < record["diverged_at_step"] < 20 and record["time"]["steps"] == record["diverged_at_step"] - 1
    assert "metrics" not in record and "examples" not in record and "tune_value" not in record
    assert records.read_record(tmp_path / "runs", record["run_id"])["status"] == "diverged"
    assert record["budget"]["initial_loss"] > 0 and record["config_id"] == identity.config_id(record["identity"])


@pytest.mark.slow
def test_wandb_logger_works_offline_inside_the_results_folder(tmp_path, tiny_bert_dir, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    record = experiment.run(compose_settings(
        *FEW, f"model.name_or_path={tiny_bert_dir}", "logger=wandb", "pair_baseline=false",
        f"runs_dir={tmp_path / 'results' / 'runs'}", f"cache_dir={tmp_path / 'cache'}"))
    assert record["status"] == "done"
    runs = list((tmp_path / "results" / "runs" / "wandb").glob("wandb/offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_the_checkpoint_read_once_per_process_gives_from_pretrained_exactly(tmp_path):
    from transformers import AutoModelForSequenceClassification, set_seed

    from lora_sweep import glue
    from lora_sweep.hub import _checkpoint, resolve_model

    settings = compose_settings()
    path = resolve_model(settings.model.name_or_path, tmp_path)
    _checkpoint.cache_clear()
    models = []
    for _ in range(2):
        set_seed(3)
        models.append(glue.load_model(path, settings))
    set_seed(3)
    reference = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    assert _checkpoint.cache_info().misses == 1 and _checkpoint.cache_info().hits == 1
    for model in models:  # same tensors, the random head included, and none shared with the cache or each other
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert models[0].bert.embeddings.word_embeddings.weight.data_ptr() != models[1].bert.embeddings.word_embeddings.weight.data_ptr()
