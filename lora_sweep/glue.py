"""The GLUE task family: where the data lives, how to read it, the model head, and the official metrics.

It implements the task-family contract (lora_sweep.task_family.TaskFamily), as lora_sweep.instruct and
lora_sweep.text do.

Local files are read in the original GLUE download layout (`<glue_dir>/<TASK>/{train,dev}.tsv`).
They are parsed by hand rather than with `datasets`' csv loader because the GLUE files need
QUOTE_NONE, a BOM-tolerant encoding and a headerless variant, and because a malformed file must
be reported with its path and line number.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoConfig, DataCollatorWithPadding

from lora_sweep import data
from lora_sweep.errors import UserError
from lora_sweep.hub import hub_commit, load_pretrained, require_hub
from lora_sweep.identity import file_digest
from lora_sweep.metrics import glue_metrics
from lora_sweep.settings import Settings, TaskSettings

TASK_TYPE = "SEQ_CLS"  # PEFT's task type: the classification head is trained beside the adapter

SHARED_GLUE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


@dataclass(frozen=True)
class GlueTask:
    folder: str  # folder name in the GLUE download
    hub_config: str  # config name of `nyu-mll/glue`
    hub_eval_split: str
    dev_file: str | None  # None: no fixed local layout (MNLI's dev files vary in width), hub only
    header: bool
    columns: int  # tab-separated columns per line of the local files
    text_a: int  # column indices in the local files
    text_b: int | None
    label: int
    hub_text: tuple[str, ...]  # text columns of the hub dataset
    labels: tuple[str, ...] | None  # local label strings in hub order; None: integer labels or a float score
    num_labels: int  # 1 = regression
    metrics: tuple[str, ...]
    primary: str


TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("SST-2", "sst2", "validation", "dev.tsv", True, 2, 0, None, 1, ("sentence",), None, 2, ("accuracy",), "accuracy"),
    "mrpc": GlueTask("MRPC", "mrpc", "validation", "dev.tsv", True, 5, 3, 4, 0, ("sentence1", "sentence2"), None, 2, ("f1", "accuracy"), "f1"),
    "cola": GlueTask("CoLA", "cola", "validation", "dev.tsv", False, 4, 3, None, 1, ("sentence",), None, 2, ("matthews",), "matthews"),
    "rte": GlueTask("RTE", "rte", "validation", "dev.tsv", True, 4, 1, 2, 3, ("sentence1", "sentence2"), ("entailment", "not_entailment"), 2, ("accuracy",), "accuracy"),
    "stsb": GlueTask("STS-B", "stsb", "validation", "dev.tsv", True, 10, 7, 8, 9, ("sentence1", "sentence2"), None, 1, ("pearson", "spearman"), "pearson"),
    "qnli": GlueTask("QNLI", "qnli", "validation", "dev.tsv", True, 4, 1, 2, 3, ("question", "sentence"), ("entailment", "not_entailment"), 2, ("accuracy",), "accuracy"),
    "qqp": GlueTask("QQP", "qqp", "validation", "dev.tsv", True, 6, 3, 4, 5, ("question1", "question2"), None, 2, ("f1", "accuracy"), "f1"),
    "mnli": GlueTask("MNLI", "mnli", "validation_matched", None, True, 0, 0, 0, 0, ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), 3, ("accuracy",), "accuracy"),
}


def task_spec(name: str) -> GlueTask:
    if name not in TASKS:
        raise UserError(f"GLUE task {name!r} is unknown; use one of {', '.join(TASKS)}")
    return TASKS[name]


def glue_dir(task: TaskSettings) -> Path:
    """The local GLUE folder: task.data_dir, else $GLUE_DIR, else ../shared/data/glue beside the project."""
    return Path(task.data_dir or os.environ.get("GLUE_DIR") or SHARED_GLUE_DIR).expanduser()


def resolve_source(task: TaskSettings) -> str:
    """'local' or 'hub', deciding `auto` by whether the local train file exists; a folder the user named
    (task.data_dir) must hold the task: it is never passed over for the hub."""
    spec = task_spec(task.name)
    if spec.dev_file is None and task.source == "local":
        raise UserError(f"GLUE task {task.name} is read from the hub only; use task.source=auto or hub")
    if task.source == "hub" or spec.dev_file is None:
        return "hub"
    folder = glue_dir(task) / spec.folder
    if (folder / "train.tsv").is_file():
        return "local"
    if task.source == "local" or task.data_dir:
        named = f"task.data_dir={task.data_dir}" if task.data_dir else "$GLUE_DIR" if os.environ.get("GLUE_DIR") else "the default data folder"
        advice = "point task.data_dir at" if task.data_dir else "set task.data_dir or GLUE_DIR to"
        raise UserError(f"no GLUE {spec.folder}/train.tsv in {folder} (from {named}); {advice} a folder holding "
                        f"{spec.folder}/, or use task.source=hub")
    return "hub"


def _parse_label(spec: GlueTask, raw: str, where: str) -> int | float:
    try:
        if spec.num_labels == 1:
            return float(raw)
        if spec.labels is not None:
            return spec.labels.index(raw)
        value = int(raw)
        if not 0 <= value < spec.num_labels:
            raise ValueError
        return value
    except ValueError:
        allowed = "a number" if spec.num_labels == 1 else ", ".join(spec.labels or map(str, range(spec.num_labels)))
        raise UserError(f"{where}: label {raw!r} cannot be parsed; allowed: {allowed}") from None


def read_tsv(spec: GlueTask, path: Path) -> datasets.Dataset:
    """One local GLUE split as columns text_a, [text_b,] label."""
    if not path.is_file():
        raise UserError(f"GLUE file {path} not found; set task.data_dir or GLUE_DIR to a folder holding {spec.folder}/, or use task.source=hub")
    columns: dict[str, list] = {"text_a": [], "label": []}
    if spec.text_b is not None:
        columns["text_b"] = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            for line_no, row in enumerate(reader, start=1):
                if spec.header and line_no == 1:
                    continue
                where = f"{path} line {line_no}"
                if len(row) != spec.columns:
                    raise UserError(f"{where}: expected {spec.columns} tab-separated columns, found {len(row)}")
                columns["text_a"].append(row[spec.text_a])
                if spec.text_b is not None:
                    columns["text_b"].append(row[spec.text_b])
                columns["label"].append(_parse_label(spec, row[spec.label], where))
        except UnicodeDecodeError as exc:  # decoded ahead in blocks: find the line in the bytes
            raise UserError(f"{path} line {_undecodable_line(path)}: not UTF-8 text ({exc.reason}); "
                            f"a GLUE file is tab-separated text") from None
        except csv.Error as exc:  # e.g. a "line" longer than csv allows: a binary file
            raise UserError(f"{path} line {reader.line_num}: {exc}; a GLUE file is tab-separated text") from None
    if not columns["label"]:
        raise UserError(f"GLUE file {path} has no data rows")
    label_type = datasets.Value("float32" if spec.num_labels == 1 else "int64")
    features = datasets.Features({**{k: datasets.Value("string") for k in columns if k != "label"}, "label": label_type})
    return datasets.Dataset.from_dict(columns, features=features)


def _undecodable_line(path: Path) -> int:
    """The number of the first line of `path` that is not UTF-8."""
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return line_no
    return 0


def _load_hub(spec: GlueTask) -> datasets.DatasetDict:
    _require_hub(spec)
    raw = datasets.load_dataset("nyu-mll/glue", spec.hub_config)
    rename = {spec.hub_text[0]: "text_a", **({spec.hub_text[1]: "text_b"} if len(spec.hub_text) > 1 else {})}
    keep = [*rename, "label"]
    splits = {"train": raw["train"], "dev": raw[spec.hub_eval_split]}
    out = datasets.DatasetDict({k: v.select_columns(keep).rename_columns(rename) for k, v in splits.items()})
    return out.cast_column("label", datasets.Value("float32")) if spec.num_labels == 1 else out


def load_splits(task: TaskSettings, seed: int, source: str) -> datasets.DatasetDict:
    """Train, tune and dev splits with columns id, text_a, [text_b,] label (see data.split)."""
    spec = task_spec(task.name)
    if source == "local":
        folder = glue_dir(task) / spec.folder
        raw = {"train": read_tsv(spec, folder / "train.tsv"), "dev": read_tsv(spec, folder / spec.dev_file)}
    else:
        raw = _load_hub(spec)
    return data.split(raw["train"], raw["dev"], task, seed)


def load_model(path: str, settings: Settings, meta: bool = False) -> torch.nn.Module:
    """The model with a fresh head for the task; on the meta device (no weights) to check a run cheaply."""
    return classifier(path, settings, task_spec(settings.task.name).num_labels, meta)


def classifier(path: str, settings: Settings, num_labels: int, meta: bool = False) -> torch.nn.Module:
    """A sequence classifier with a fresh head of `num_labels` outputs (1: regression); shared by the text family."""
    head = {"num_labels": num_labels, "problem_type": "regression" if num_labels == 1 else "single_label_classification"}
    config = AutoConfig.from_pretrained(path, revision=settings.model.revision, **head)
    return load_pretrained(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, path, config, settings.model.revision, meta)


def _require_hub(spec: GlueTask) -> None:
    require_hub(f"GLUE task {spec.hub_config} (nyu-mll/glue)", "a local GLUE folder via task.data_dir or GLUE_DIR (SST-2, MRPC, CoLA, RTE and STS-B are in ../shared/data/glue)")


def data_identity(task: TaskSettings, source: str) -> dict:
    """What data a run reads: the local files by content hash, or the hub dataset at its commit."""
    spec = task_spec(task.name)
    if source == "hub":
        _require_hub(spec)
        return {"hub": "nyu-mll/glue", "config": spec.hub_config, "revision": hub_commit("nyu-mll/glue", "dataset", None)}
    folder = glue_dir(task) / spec.folder
    return {"files": {f"{spec.folder}/{name}": file_digest(folder / name) for name in ("train.tsv", spec.dev_file)}}


def build(settings: Settings, source: str, tokenizer) -> datasets.DatasetDict:
    """Tokenized train/tune/dev splits; padding is left to the collator (dynamic)."""
    return tokenize(load_splits(settings.task, settings.train.seed, source), settings, tokenizer)


def tokenize(splits: datasets.DatasetDict, settings: Settings, tokenizer) -> datasets.DatasetDict:
    """Splits of text_a, [text_b,] label tokenized for a classifier; shared by the text family."""
    two = "text_b" in splits["train"].column_names

    def encode(batch: dict) -> dict:
        return tokenizer(batch["text_a"], batch["text_b"] if two else None, truncation=True, max_length=settings.train.max_seq_len)

    text_columns = ["text_a", "text_b"] if two else ["text_a"]
    return splits.map(encode, batched=True, remove_columns=text_columns)


def collator(tokenizer):
    """Pads to the batch's longest example; the example ids stay out of the model's inputs."""
    pad = DataCollatorWithPadding(tokenizer)
    return lambda features: pad([{k: v for k, v in f.items() if k != "id"} for f in features])


def batch_outputs(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-example outputs kept in the record: the logits (one column for regression)."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


def split_metrics(outputs: np.ndarray, labels: np.ndarray, settings: Settings) -> tuple[dict[str, float], str]:
    """The task's official metrics from per-example outputs, and the name of the primary one."""
    spec = task_spec(settings.task.name)
    return glue_metrics(spec.metrics, outputs, labels), spec.primary


def extra_metrics(accelerator, model, tokenizer, dev: datasets.Dataset, settings: Settings) -> dict[str, float]:
    return {}
