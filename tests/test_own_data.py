"""Your own classification and regression data (task=text/classification, text/regression): real GLUE rows from
../shared/data written in other layouts, trained end to end on a tiny model, and every bad input as one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from lora_sweep import experiment, glue, text
from lora_sweep.errors import UserError
from lora_sweep.settings import compose

from tests.conftest import SHARED_DATA, tiny_bert
from tests.test_bad_input import lora_sweep, refuse_training

GLUE = SHARED_DATA / "glue"
H, LAYERS = 64, 2  # tiny_bert's sizes
RUN = ["train.max_steps=2", "train.batch_size=8", "train.max_seq_len=32", "train.save_adapter=false", "pair_baseline=false",
       "train.memory_probe=false", "train.forgetting_examples=0", "task.tune_examples=16", "task.heldout_examples=24",
       "model.name=tiny", "method.r=2"]


def glue_rows(name: str, count: int) -> pd.DataFrame:
    """The first `count` training rows of a local GLUE task, as the GLUE family parses them."""
    spec = glue.TASKS[name]
    return glue.read_tsv(spec, GLUE / spec.folder / "train.tsv").select(range(count)).to_pandas()


def sst2_as_csv(folder: Path, count: int = 120) -> Path:
    """SST-2 with renamed columns and string labels, as a spreadsheet export would have it."""
    rows = glue_rows("sst2", count)
    path = folder / "tickets.csv"
    pd.DataFrame({"body": rows["text_a"], "category": rows["label"].map({0: "negative", 1: "positive"})}).to_csv(path, index=False)
    return path


def own(folder: Path, model: Path, *overrides: str):
    return compose(*RUN, f"model.name_or_path={model}", f"runs_dir={folder / 'runs'}", f"cache_dir={folder / 'cache'}", *overrides)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["csv", "jsonl", "parquet"])
def test_a_classification_file_in_any_layout_trains_end_to_end(tmp_path, tiny_bert_dir, one_thread, layout):
    frame = pd.read_csv(sst2_as_csv(tmp_path))
    path = tmp_path / f"tickets.{layout}"
    {"csv": lambda: frame.to_csv(path, index=False), "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "parquet": lambda: frame.to_parquet(path)}[layout]()
    record = experiment.run(own(tmp_path, tiny_bert_dir, "task=text/classification", f"task.train_file={path}",
                                "task.text_column=body", "task.label_column=category"))
    assert record["status"] == "done" and record["primary_metric"] == "accuracy"
    assert record["params"]["adapter"] == LAYERS * 2 * (H + H) * 2  # qv, r=2: (d+k)·r per matrix
    assert record["params"]["head"] == (H * H + H) + (H * 2 + 2)  # pooler and a two-class classifier
    assert record["identity"]["config"]["task"]["data"]["labels"] == ["negative", "positive"]
    assert (record["eval_examples"], record["tune_examples"], record["train_examples"]) == (24, 16, 120 - 24 - 16)
    dev = record["examples"]["dev"]
    labels = frame["category"].map({"negative": 0, "positive": 1})
    assert dev["labels"] == [labels[i] for i in dev["ids"]]  # ids are rows of the file: outputs pair example by example
    assert not set(dev["ids"]) & set(record["examples"]["tune"]["ids"])
    assert 0 <= record["primary_value"] <= 1


@pytest.fixture(scope="module")
def tiny_regressor_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT with a one-output head: a checkpoint's head must match the task's (a mismatch is an error)."""
    folder = tmp_path_factory.mktemp("tiny-regressor")
    tiny_bert(num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_pair_task_and_a_regression_task_train_end_to_end(tmp_path, tiny_bert_dir, tiny_regressor_dir, one_thread):
    rte = glue_rows("rte", 100)
    pairs = tmp_path / "entailment.jsonl"
    pd.DataFrame({"premise": rte["text_a"], "claim": rte["text_b"],
                  "verdict": rte["label"].map(dict(enumerate(glue.TASKS["rte"].labels)))}).to_json(pairs, orient="records", lines=True)
    record = experiment.run(own(tmp_path, tiny_bert_dir, "task=text/classification", f"task.train_file={pairs}",
                                "task.text_column=premise", "task.text_pair_column=claim", "task.label_column=verdict",
                                "task.metric=matthews"))
    assert record["status"] == "done" and set(record["metrics"]) == {"matthews", "accuracy"}
    assert record["identity"]["config"]["task"]["data"]["labels"] == ["entailment", "not_entailment"]

    stsb = glue_rows("stsb", 100)
    scores = tmp_path / "similarity.parquet"
    pd.DataFrame({"a": stsb["text_a"], "b": stsb["text_b"], "score": stsb["label"]}).to_parquet(scores)
    record = experiment.run(own(tmp_path, tiny_regressor_dir, "task=text/regression", f"task.train_file={scores}",
                                "task.text_column=a", "task.text_pair_column=b", "task.label_column=score"))
    assert record["status"] == "done" and record["primary_metric"] == "pearson"
    assert record["params"]["head"] == (H * H + H) + (H + 1)  # one output
    assert record["examples"]["dev"]["labels"] == pytest.approx([float(stsb["label"][i]) for i in record["examples"]["dev"]["ids"]])


@pytest.mark.slow
def test_a_glue_preset_and_the_same_rows_as_a_user_file_give_the_same_metrics(tmp_path, tiny_bert_dir, one_thread):
    """GLUE's SST-2 preset on a small copy of its files, and those rows written as CSV files: the same run."""
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for split, count in (("train", 80), ("dev", 24)):
        with open(GLUE / "SST-2" / f"{split}.tsv") as source:
            (folder / f"{split}.tsv").write_text("".join(next(source) for _ in range(count + 1)))
        rows = glue.read_tsv(glue.TASKS["sst2"], folder / f"{split}.tsv").to_pandas()
        rows.rename(columns={"text_a": "sentence"}).to_csv(tmp_path / f"{split}.csv", index=False, quoting=csv.QUOTE_ALL)
    preset = experiment.run(own(tmp_path, tiny_bert_dir, "task=glue/sst2", f"task.data_dir={tmp_path / 'glue'}"))
    files = experiment.run(own(tmp_path, tiny_bert_dir, "task=text/classification", f"task.train_file={tmp_path / 'train.csv'}",
                               f"task.eval_file={tmp_path / 'dev.csv'}", "task.text_column=sentence"))
    assert preset["examples"]["dev"]["ids"] == files["examples"]["dev"]["ids"]
    assert np.allclose(preset["examples"]["dev"]["outputs"], files["examples"]["dev"]["outputs"], atol=1e-6)
    assert preset["metrics"] == pytest.approx(files["metrics"])


def test_the_label_set_is_sorted_and_the_same_whatever_the_row_order_or_layout(tmp_path):
    path = sst2_as_csv(tmp_path, 60)
    shuffled = tmp_path / "shuffled.jsonl"
    pd.read_csv(path).sample(frac=1.0, random_state=0).to_json(shuffled, orient="records", lines=True)
    found = [text.labels(compose("task=text/classification", f"task.train_file={p}", "task.text_column=body",
                                 "task.label_column=category", "task.heldout_examples=20").task) for p in (path, shuffled)]
    assert found == [["negative", "positive"]] * 2
    numbers = tmp_path / "numbers.csv"
    pd.DataFrame({"text": ["a", "b", "c", "d"] * 10, "label": [10, 2, 2, 10] * 10}).to_csv(numbers, index=False)
    assert text.labels(compose("task=text/classification", f"task.train_file={numbers}", "task.heldout_examples=10").task) == [2, 10]


def test_a_changed_file_changes_the_run_id(tmp_path, tiny_bert_dir):
    path = sst2_as_csv(tmp_path, 60)
    first = experiment.plan(own(tmp_path, tiny_bert_dir, "task=text/classification", f"task.train_file={path}",
                                "task.text_column=body", "task.label_column=category"))
    again = experiment.plan(own(tmp_path, tiny_bert_dir, "task=text/classification", f"task.train_file={path}",
                                "task.text_column=body", "task.label_column=category"))
    path.write_text(path.read_text().replace("negative", "positive", 1))
    changed = experiment.plan(own(tmp_path, tiny_bert_dir, "task=text/classification", f"task.train_file={path}",
                                  "task.text_column=body", "task.label_column=category"))
    assert first.run_id == again.run_id != changed.run_id
    assert str(tmp_path) not in json.dumps(first.identity)  # the file by its content, never by this machine's folder


def bad_files(folder: Path) -> dict[str, Path]:
    """One file per problem, each otherwise a valid classification file."""
    good = pd.DataFrame({"text": [f"example {i}" for i in range(40)], "label": ["a", "b"] * 20})
    files = {name: folder / name for name in ("ok.csv", "data.xlsx", "one_class.csv", "header_only.csv", "object.json",
                                              "not_lines.jsonl", "scores.csv", "unseen.csv", "mixed.csv")}
    good.to_csv(files["ok.csv"], index=False)
    good.to_csv(files["data.xlsx"], index=False)
    good.assign(label="a").to_csv(files["one_class.csv"], index=False)
    files["header_only.csv"].write_text("text,label\n")
    files["object.json"].write_text(json.dumps({"text": "x", "label": "a"}))
    files["not_lines.jsonl"].write_text(good.to_json(orient="records"))  # a JSON list, named as JSON lines
    good.assign(label=["0.5", "high"] * 20).to_csv(files["scores.csv"], index=False)
    good.assign(label=["a", "c"] * 20).to_csv(files["unseen.csv"], index=False)
    pd.DataFrame({"text": ["x", "y"] * 20, "label": [1, "b"] * 20}).to_json(files["mixed.csv"].with_suffix(".jsonl"), orient="records", lines=True)
    return files


CASES = [  # (overrides, the error line's text, with {name} for the folder's files)
    (["task.train_file={dir}/missing.csv"], "task.train_file={dir}/missing.csv: no such file"),
    (["task.train_file={dir}/data.xlsx"], "{dir}/data.xlsx: cannot tell the format from the extension '.xlsx'; use one of .csv, .tsv, .json, .jsonl, .parquet"),
    (["task.train_file={dir}/ok.csv", "task.label_column=category"], "{dir}/ok.csv: no column 'category' (task.label_column); its columns are text, label"),
    (["task.train_file={dir}/header_only.csv"], "{dir}/header_only.csv holds no rows"),
    (["task.train_file={dir}/one_class.csv"], "{dir}/one_class.csv: column 'label' has 1 class (a); classification needs at least two"),
    (["task.train_file={dir}/object.json"], "{dir}/object.json is not a list of JSON objects; a .json file holds a list of objects (one object per line: name it .jsonl)"),
    (["task.train_file={dir}/not_lines.jsonl"], "{dir}/not_lines.jsonl line 1: not a JSON object; a .jsonl file holds one object per line"),
    (["task=text/regression", "task.train_file={dir}/scores.csv"], "{dir}/scores.csv data row 4: 'label' is 'high'; a regression target is a finite number"),
    (["task.train_file={dir}/ok.csv", "task.eval_file={dir}/unseen.csv"], "{dir}/unseen.csv: label 'c' is not one of the training split's classes (a, b)"),
    (["task.train_file={dir}/mixed.jsonl"], "{dir}/mixed.jsonl: column 'label' (task.label_column) holds int, str values; classification labels are integers or strings"),
    (["task.train_file={dir}/ok.csv", "task.metric=pearson"], "task.metric='pearson' is not a classification metric; use one of accuracy, f1, matthews"),
    (["task.train_file={dir}/ok.csv", "task.hub_dataset=someone/tickets"], "your own data needs exactly one of task.train_file (a local file) and task.hub_dataset (a hub dataset id)"),
    (["task.hub_dataset=someone/tickets"], "task.hub_dataset=someone/tickets needs the Hugging Face hub, which cannot be reached"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[c[1].split(":")[0].split(" ")[0].rsplit("/", 1)[-1] for c in CASES])
def test_bad_own_data_is_one_line_before_any_run(tmp_path, capsys, monkeypatch, tiny_bert_dir, overrides, message):
    bad_files(tmp_path)
    refuse_training(monkeypatch)
    result = lora_sweep(tmp_path, "task=text/classification", f"model.name_or_path={tiny_bert_dir}", "task.heldout_examples=10",
                        "task.tune_examples=10",
                        *[o.format(dir=tmp_path) for o in overrides], capsys=capsys, monkeypatch=monkeypatch)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message.format(dir=tmp_path) in lines[0]
    assert not list((tmp_path / "runs").glob("*.json"))  # nothing recorded


def test_a_bad_eval_file_is_refused_by_the_family_too(tmp_path):
    files = bad_files(tmp_path)
    task = compose("task=text/classification", f"task.train_file={files['ok.csv']}", f"task.eval_file={files['unseen.csv']}",
                   "task.tune_examples=10").task
    with pytest.raises(UserError, match="label 'c' is not one of the training split's classes"):
        text.load_splits(task, 0)
