"""Task data shared by both task families: the train / tune / eval splits, and the token cache.

Every family reads its raw train and eval examples, then `split` carves the tuning split out of train
(a permutation seeded by task.tune_seed, the same for every run seed, so all runs are tuned on the same
examples) and applies the caps. Examples keep an `id`: their row in the source split, so the per-example
outputs of any two runs can be matched after the fact.

A sweep trains many runs on the same tokens; `datasets.save_to_disk` under the cache folder makes every
run after the first load them instead of re-reading and re-tokenizing the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import datasets
import torch

from lora_sweep.errors import UserError
from lora_sweep.files import follow_umask
from lora_sweep.identity import task_identity
from lora_sweep.settings import Settings, TaskSettings


def split(train: datasets.Dataset, dev: datasets.Dataset, task: TaskSettings, seed: int) -> datasets.DatasetDict:
    """train / tune / dev with an `id` column (row in the source split); the tuning split never overlaps training,
    the eval split is only capped."""
    if "id" not in train.column_names:  # else the family numbered the examples in its source already
        train, dev = (d.add_column("id", list(range(len(d)))) for d in (train, dev))
    if task.tune_examples >= len(train):
        raise UserError(f"task.tune_examples={task.tune_examples} leaves no training examples of {len(train)}; use fewer")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(task.tune_seed)).tolist()
    tune = train.select(sorted(order[:task.tune_examples]))
    train = train.select(sorted(order[task.tune_examples:]))
    if task.max_train_examples:
        train = train.shuffle(seed=seed).select(range(min(task.max_train_examples, len(train))))
    if task.max_eval_examples:
        dev = dev.select(range(min(task.max_eval_examples, len(dev))))
    return datasets.DatasetDict({"train": train, "tune": tune, "dev": dev})


def tokenizer_id(settings: Settings) -> str:
    """The tokenizer as the cache key names it: the model it comes with."""
    return f"{settings.model.name_or_path}@{settings.model.revision}"


def cache_key(family, settings: Settings, source: str, tokenizer_id: str) -> str:
    seed = settings.train.seed if settings.task.max_train_examples else None  # the seed only picks a capped subset
    parts = {"task": task_identity(settings.task, family.data_identity(settings.task, source)), "tokenizer": tokenizer_id,
             "max_len": settings.train.max_seq_len, "seed": seed, "datasets": datasets.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def prepare(family, settings: Settings, source: str, tokenizer, tokenizer_id: str) -> tuple[datasets.DatasetDict, bool]:
    """Tokenized train/tune/dev splits from the task family's `build`, and whether they came from the cache."""
    folder = Path(settings.cache_dir) / "tokenized" / cache_key(family, settings, source, tokenizer_id)
    if folder.is_dir():
        return datasets.load_from_disk(str(folder)), True
    tokenized = family.build(settings, source, tokenizer)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-")
    follow_umask(tmp)
    tokenized.save_to_disk(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached the same data first
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenized, False
