"""The text task family: classification or regression on the user's own data (task=text/classification, text/regression).

Rows come from local files or a hub dataset (lora_sweep.user_files); the settings name the text column, an optional
second text column for pairs and the label column. Classification labels may be integers or strings: the label set is
the training split's, in sorted order (so the same data always gives the same class indices), and is part of the run's
identity; an eval label the training split never has is refused. Regression targets must be numbers. The model, the
head and the metrics are GLUE's (lora_sweep.glue): a GLUE task given as a user file trains and scores the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
from numbers import Number

import datasets
import numpy as np
import torch

from lora_sweep import data, glue, user_files
from lora_sweep.errors import UserError
from lora_sweep.glue import batch_outputs, collator  # noqa: F401  the same head and padding as GLUE (the family contract)
from lora_sweep.metrics import glue_metrics
from lora_sweep.settings import Settings, TaskSettings

TASK_TYPE = "SEQ_CLS"


def resolve_source(task: TaskSettings) -> str:
    return "hub" if task.hub_dataset else "local"


def _columns(task: TaskSettings) -> dict[str, str | None]:
    return {"task.text_column": task.text_column, "task.text_pair_column": task.text_pair_column,
            "task.label_column": task.label_column}


_READ: dict[str, tuple[datasets.Dataset, datasets.Dataset]] = {}  # rows read in this process, by task and data version


def _rows(task: TaskSettings) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) rows with their columns checked; read once per process for each task and content of its data."""
    key = json.dumps([dataclasses.asdict(task), user_files.data_identity(task)], sort_keys=True)
    if key not in _READ:
        _READ[key] = user_files.read_splits(task, _columns(task))
    return _READ[key]


def _label_set(task: TaskSettings, train: datasets.Dataset) -> list:
    """The classes in the training split, sorted: integers or strings, never both."""
    values = set(train[task.label_column])
    kinds = {type(v) for v in values}
    if None in values or not (kinds <= {int} or kinds <= {str}):
        raise UserError(f"{user_files.where(task, 'train')}: column {task.label_column!r} (task.label_column) holds "
                        f"{', '.join(sorted(k.__name__ for k in kinds))} values; classification labels are integers or strings")
    if len(values) < 2:
        raise UserError(f"{user_files.where(task, 'train')}: column {task.label_column!r} has {len(values)} class "
                        f"({', '.join(map(str, values))}); classification needs at least two")
    if task.primary_metric == "f1" and len(values) != 2:
        raise UserError(f"task.metric=f1 is the F1 of the second of two classes; {user_files.where(task, 'train')} has "
                        f"{len(values)}: use accuracy or matthews")
    return sorted(values)


def _targets(task: TaskSettings, rows: datasets.Dataset, split: str) -> list[float]:
    """Regression targets as floats (a CSV column holding any word is read as text: its numbers still count)."""
    targets = []
    for row, value in zip(rows["id"], rows[task.label_column]):
        number = _number(value)
        if number is None:
            raise UserError(f"{user_files.where(task, split)} data row {row + 1}: {task.label_column!r} is {value!r}; "
                            f"a regression target is a finite number")
        targets.append(number)
    return targets


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (Number, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def labels(task: TaskSettings) -> list | None:
    """The classification label set (None for regression), from the training split."""
    train, _ = _rows(task)
    return _label_set(task, train) if task.problem == "classification" else None


def data_identity(task: TaskSettings, source: str) -> dict:
    """The data read (lora_sweep.user_files) and, for classification, the label set in its index order."""
    identity = user_files.data_identity(task)
    if task.problem == "classification":
        train, _ = _rows(task)
        identity["labels"] = _label_set(task, train)
    return identity


def load_splits(task: TaskSettings, seed: int) -> datasets.DatasetDict:
    """Train, tune and eval splits with columns id, text_a, [text_b,] label (see data.split)."""
    train, evaluation = _rows(task)
    classes = _label_set(task, train) if task.problem == "classification" else None

    def encoded(rows: datasets.Dataset, split: str) -> datasets.Dataset:
        if classes is None:
            label, kind = _targets(task, rows, split), datasets.Value("float32")
        else:
            unknown = sorted(set(rows[task.label_column]) - set(classes), key=str)
            if unknown:
                raise UserError(f"{user_files.where(task, split)}: label {unknown[0]!r} is not one of the training split's "
                                f"classes ({', '.join(map(str, classes))})")
            index = {c: i for i, c in enumerate(classes)}
            label, kind = [index[v] for v in rows[task.label_column]], datasets.Value("int64")
        columns = {"id": rows["id"], "text_a": [_text(v) for v in rows[task.text_column]], "label": label}
        if task.text_pair_column:
            columns["text_b"] = [_text(v) for v in rows[task.text_pair_column]]
        features = {"id": datasets.Value("int64"), "text_a": datasets.Value("string"), "label": kind}
        if task.text_pair_column:
            features["text_b"] = datasets.Value("string")
        return datasets.Dataset.from_dict(columns, features=datasets.Features(features))

    return data.split(encoded(train, "train"), encoded(evaluation, "eval"), task, seed)


def _text(value) -> str:
    return "" if value is None else str(value)


def load_model(path: str, settings: Settings, meta: bool = False) -> torch.nn.Module:
    """The model with a fresh head: one output per class, or one for regression."""
    classes = labels(settings.task)
    return glue.classifier(path, settings, len(classes) if classes else 1, meta)


def build(settings: Settings, source: str, tokenizer) -> datasets.DatasetDict:
    """Tokenized train/tune/dev splits; padding is left to the collator (dynamic)."""
    return glue.tokenize(load_splits(settings.task, settings.train.seed), settings, tokenizer)


def split_metrics(outputs: np.ndarray, labels_: np.ndarray, settings: Settings) -> tuple[dict[str, float], str]:
    """The chosen metric (and, for classification, accuracy beside it) from per-example outputs."""
    primary = settings.task.primary_metric
    names = tuple(dict.fromkeys((primary, "accuracy" if settings.task.problem == "classification" else primary)))
    return glue_metrics(names, outputs, labels_), primary


def extra_metrics(accelerator, model, tokenizer, dev: datasets.Dataset, settings: Settings) -> dict[str, float]:
    return {}
