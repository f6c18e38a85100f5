"""Tokenized task data, prepared once per (task, source, tokenizer, max length, caps) and reused.

A sweep trains many runs on the same tokens; `datasets.save_to_disk` under the cache folder
makes every run after the first load them instead of re-reading and re-tokenizing the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import datasets

from lora_sweep.files import follow_umask
from lora_sweep.settings import Settings


def tokenizer_id(settings: Settings) -> str:
    """The tokenizer as the cache key names it: the model it comes with."""
    return f"{settings.model.name_or_path}@{settings.model.revision}"


def cache_key(family, settings: Settings, source: str, tokenizer_id: str) -> str:
    task = dataclasses.asdict(settings.task)
    task.pop("data_dir")
    seed = settings.train.seed if settings.task.max_train_examples else None  # the seed only picks a capped subset
    parts = {"task": task, "source": family.fingerprint(settings, source), "tokenizer": tokenizer_id,
             "max_len": settings.train.max_seq_len, "seed": seed, "datasets": datasets.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def prepare(family, settings: Settings, source: str, tokenizer, tokenizer_id: str) -> tuple[datasets.DatasetDict, bool]:
    """Tokenized train/dev splits from the task family's `build`, and whether they came from the cache."""
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
