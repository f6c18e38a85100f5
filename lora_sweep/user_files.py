"""The user's own data, read through `datasets`: local CSV, TSV, JSON, JSON lines or Parquet files, or a hub dataset.

Shared by the families that take data in the user's layout (lora_sweep.text; lora_sweep.instruct with task.name
files). What is read is identified by content (each file's hash) or by the hub commit the revision resolved to, so a
file that changes between a LoRA run and its baseline gives them different identities: they are never paired.
Every problem is one line naming the file (or dataset) and what is wrong or allowed.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch

from lora_sweep.errors import UserError
from lora_sweep.hub import hub_commit, require_hub
from lora_sweep.identity import file_digest
from lora_sweep.settings import TaskSettings

FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}), ".jsonl": ("json", {}),
           ".parquet": ("parquet", {})}  # extension -> datasets' builder and its options


def _format(path: Path) -> tuple[str, dict]:
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"{path}: cannot tell the format from the extension {path.suffix or '(none)'!r}; "
                        f"use one of {', '.join(FORMATS)}")
    return FORMATS[path.suffix.lower()]


def _check_json(path: Path) -> None:
    """A .json file must be a list of objects, a .jsonl file one object per line: `datasets` would otherwise read a
    single object's keys as columns, or fail with a message about Arrow."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not _is_object(line):
                raise UserError(f"{path} line {line_no}: not a JSON object; a .jsonl file holds one object per line")
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); a .json file holds a list of objects "
                        f"(one object per line: name it .jsonl)") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{path} is not a list of JSON objects; a .json file holds a list of objects "
                        f"(one object per line: name it .jsonl)")


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def read_file(name: str, setting: str) -> datasets.Dataset:
    """The rows of one local file (`setting` names the key it came from, for the error line)."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"{setting}={name}: no such file")
    builder, options = _format(path)
    if path.stat().st_size == 0:
        raise UserError(f"{path} holds no rows")
    try:
        if builder == "json":
            _check_json(path)
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        if "corresponds to no data" in str(exc):  # datasets' word for a file with a header and no rows
            raise UserError(f"{path} holds no rows") from None
        cause = exc.__cause__ or exc
        raise UserError(f"{path}: cannot be read as {path.suffix} ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})") from None
    if len(rows) == 0:
        raise UserError(f"{path} holds no rows")
    return rows


def read_hub(task: TaskSettings, split: str) -> datasets.Dataset:
    """One split of the hub dataset the task names, at its revision."""
    require_hub(f"task.hub_dataset={task.hub_dataset}", "local files via task.train_file")
    try:
        rows = datasets.load_dataset(task.hub_dataset, task.hub_config, split=split, revision=task.hub_revision)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise UserError(f"task.hub_dataset={task.hub_dataset} (config {task.hub_config}, split {split}): "
                        f"{str(exc).splitlines()[0][:200]}") from None
    if len(rows) == 0:
        raise UserError(f"task.hub_dataset={task.hub_dataset} split {split} holds no rows")
    return rows


def check_columns(rows: datasets.Dataset, columns: dict[str, str | None], where: str) -> None:
    """Every named column exists (`columns`: setting -> column name); else say which columns there are."""
    for setting, column in columns.items():
        if column is not None and column not in rows.column_names:
            raise UserError(f"{where}: no column {column!r} ({setting}); its columns are {', '.join(rows.column_names)}")


def where(task: TaskSettings, split: str) -> str:
    """The file or hub split an error names."""
    carved = split == "eval" and not (task.eval_split if task.hub_dataset else task.eval_file)
    if task.hub_dataset:
        return (f"task.hub_dataset={task.hub_dataset} split {task.eval_split if split == 'eval' and not carved else task.train_split}"
                + (" (its carved eval rows)" if carved else ""))
    return f"{task.train_file} (its carved eval rows)" if carved else str(task.eval_file if split == "eval" else task.train_file)


def read_splits(task: TaskSettings, columns: dict[str, str | None] | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) rows with an `id` column (the row in its source, replacing any `id` column of the data), after
    checking the named `columns` (setting -> column) exist in both: the eval file or split where one is named, else
    the first task.heldout_examples of a permutation of train seeded by task.split_seed."""
    if task.hub_dataset:
        train = read_hub(task, task.train_split)
        evaluation = read_hub(task, task.eval_split) if task.eval_split else None
    else:
        train = read_file(task.train_file, "task.train_file")
        evaluation = read_file(task.eval_file, "task.eval_file") if task.eval_file else None
    for rows, split in ((train, "train"), (evaluation, "eval")):
        if rows is not None:
            check_columns(rows, columns or {}, where(task, split))
    train = _numbered(train)
    if evaluation is not None:
        return train, _numbered(evaluation)
    if len(train) <= task.heldout_examples:
        raise UserError(f"task.heldout_examples={task.heldout_examples} (the eval split carved from {where(task, 'train')}, "
                        f"which has no eval file) leaves no training examples of {len(train)}; use fewer, or name task.eval_file")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(task.split_seed)).tolist()
    return train.select(sorted(order[task.heldout_examples:])), train.select(sorted(order[:task.heldout_examples]))


def _numbered(rows: datasets.Dataset) -> datasets.Dataset:
    """`rows` with `id` = the row's position: what pairs two runs' outputs example by example."""
    if "id" in rows.column_names:
        rows = rows.remove_columns("id")
    return rows.add_column("id", list(range(len(rows))))


def data_identity(task: TaskSettings) -> dict:
    """What data a run reads: each file by content hash (by its role, train or eval: a renamed copy is the same data),
    or the hub dataset at the commit its revision resolves to."""
    if task.hub_dataset:
        require_hub(f"task.hub_dataset={task.hub_dataset}", "local files via task.train_file")
        try:
            commit = hub_commit(task.hub_dataset, "dataset", task.hub_revision)
        except Exception as exc:  # huggingface_hub's errors for a missing repository or revision share no base here
            raise UserError(f"task.hub_dataset={task.hub_dataset} (revision {task.hub_revision or 'main'}): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        return {"hub": task.hub_dataset, "config": task.hub_config, "revision": commit}
    files = {"train": task.train_file, **({"eval": task.eval_file} if task.eval_file else {})}
    for setting, name in files.items():
        if not Path(name).expanduser().is_file():
            raise UserError(f"task.{setting}_file={name}: no such file")
    return {"files": {split: file_digest(Path(name).expanduser()) for split, name in files.items()}}
