"""Forgetting: what fine-tuning did to what the base model could already do, on data the run never trained on.

Measured before training (on the base weights) and after it, with the same probe; positive forgetting = worse after.
- Encoder (GLUE and text families): zero-shot STS-B Spearman correlation (in points) between the cosine similarity of
  mean-pooled last-layer embeddings and the gold scores: a sentence encoder's own job. forgetting = before − after.
  (With task=glue/stsb the probe is the task's own dev data: it then measures a change, not forgetting.)
- Decoder (instruction family): per-token cross-entropy (nats) on held-out general text. forgetting = after − before.
  Default text: the sentences of the same STS-B dev file: news headlines, image captions and forum posts, plain
  English of several genres, not instruction-formatted, not trained on by any task here, and already on disk
  offline; or a plain-text file of the user's (one document per line) via `train.forgetting_file`.

Both probes use a fixed seeded subset of `train.forgetting_examples` pairs or texts, so every run measures the
same thing. "Before" depends only on the base weights and the probe: it is computed once per process and reused.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lora_sweep import glue, instruct
from lora_sweep.errors import UserError
from lora_sweep.identity import file_digest
from lora_sweep.metrics import glue_metrics
from lora_sweep.settings import Settings

SUBSET_SEED = 0  # the same pairs or texts for every run
BATCH = 64
DEFAULT_FILE = "STS-B/dev.tsv"  # in $GLUE_DIR or ../shared/data/glue


def _probe_file(settings: Settings) -> Path | None:
    """The user's file (which must exist), else STS-B dev in the default GLUE folder (None when it is not there)."""
    if settings.train.forgetting_file:
        path = Path(settings.train.forgetting_file).expanduser()
        if not path.is_file():
            raise UserError(f"train.forgetting_file={settings.train.forgetting_file} is not a file; give a file or null for the default ({DEFAULT_FILE})")
        return path
    path = Path(os.environ.get("GLUE_DIR") or glue.SHARED_GLUE_DIR).expanduser() / DEFAULT_FILE
    return path if path.is_file() else None


def _subset(count: int, n: int) -> np.ndarray:
    return np.sort(np.random.default_rng(SUBSET_SEED).permutation(count)[:n])


def _stsb_pairs(path: Path, n: int) -> tuple[list[str], list[str], np.ndarray]:
    rows = glue.read_tsv(glue.task_spec("stsb"), path)
    rows = rows.select(_subset(len(rows), n))
    return rows["text_a"], rows["text_b"], np.asarray(rows["label"])


def _texts(path: Path, n: int, user_file: bool) -> list[str]:
    if user_file:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise UserError(f"train.forgetting_file={path} holds no text")
    else:
        rows = glue.read_tsv(glue.task_spec("stsb"), path)
        lines = list(dict.fromkeys([*rows["text_a"], *rows["text_b"]]))  # each sentence once
    return [lines[i] for i in _subset(len(lines), n)]


def _batches(texts: list[str]):
    """Length-sorted batches (little padding) as index arrays."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]


@torch.no_grad()
def _embeddings(model, tokenizer, texts: list[str], max_len: int, device) -> torch.Tensor:
    out = torch.empty(len(texts), model.config.hidden_size)
    for idx in _batches(texts):
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out[torch.as_tensor(idx)] = ((hidden * mask).sum(1) / mask.sum(1)).cpu()
    return out


def _stsb_spearman(model, tokenizer, probe: tuple, max_len: int, device) -> float:
    a, b, scores = probe
    similarity = F.cosine_similarity(_embeddings(model, tokenizer, a, max_len, device), _embeddings(model, tokenizer, b, max_len, device))
    return 100 * glue_metrics(("spearman",), similarity.numpy()[:, None], scores)["spearman"]


@torch.no_grad()
def _cross_entropy(model, tokenizer, texts: list[str], max_len: int, device) -> float:
    """Per-token cross-entropy of every token after the first, by the instruct family's own per-example loss."""
    collate = instruct.collator(tokenizer)
    total, count = 0.0, 0
    for idx in _batches(texts):
        ids = [tokenizer(texts[i], truncation=True, max_length=max_len)["input_ids"] for i in idx]
        batch = {k: v.to(device) for k, v in collate([{"input_ids": x, "attention_mask": [1] * len(x), "labels": x} for x in ids]).items()}
        loss_sum, tokens = instruct.batch_outputs(model, batch).sum(dim=0).tolist()
        total, count = total + loss_sum, count + int(tokens)
    return total / count


class Probe:
    """One run's forgetting probe: `before(model)` on the base weights, then `measure(model)` after training."""

    def __init__(self, settings: Settings, weights: dict[str, Any], device: str):
        self.settings, self.device = settings, device
        self.n = settings.train.forgetting_examples
        self.path = _probe_file(settings) if self.n else None
        self.encoder = settings.task.family != "instruct"  # a classifier or regressor (GLUE, your own text task)
        self.kind = "stsb_zero_shot_spearman" if self.encoder else "heldout_cross_entropy"
        self.key = json.dumps([weights, self.kind, self.n, self.path and file_digest(self.path), settings.train.max_seq_len, device],
                              sort_keys=True, default=str)
        self._before: float | None = None
        self._cached = False

    @property
    def active(self) -> bool:
        return self.path is not None

    def _value(self, model, tokenizer) -> float:
        was_training = model.training
        model.eval()
        try:
            max_len = self.settings.train.max_seq_len
            if self.encoder:
                return _stsb_spearman(model, tokenizer, _stsb_pairs(self.path, self.n), max_len, self.device)
            user_file = bool(self.settings.train.forgetting_file)
            return _cross_entropy(model, tokenizer, _texts(self.path, self.n, user_file), max_len, self.device)
        finally:
            model.train(was_training)

    def before(self, model, tokenizer) -> None:
        if self.active:
            self._cached = self.key in _BEFORE
            if not self._cached:
                _BEFORE[self.key] = self._value(model, tokenizer)
            self._before = _BEFORE[self.key]

    def measure(self, model, tokenizer) -> dict[str, Any]:
        """The record's `forgetting` field."""
        if not self.n:
            return {"probe": None, "skipped": "train.forgetting_examples=0"}
        if not self.active:
            return {"probe": self.kind, "skipped": f"no {DEFAULT_FILE} in the GLUE folder ($GLUE_DIR or ../shared/data/glue); "
                                                   "set train.forgetting_file"}
        start = time.perf_counter()
        after = self._value(model, tokenizer)
        change = self._before - after if self.encoder else after - self._before
        return {"probe": self.kind, "unit": "points" if self.encoder else "nats/token", "examples": self.n,
                "data": {"file": DEFAULT_FILE if not self.settings.train.forgetting_file else Path(self.path).name,
                         "digest": file_digest(self.path)},
                "before": self._before, "after": after, "forgetting": change, "before_from_cache": self._cached,
                "after_s": time.perf_counter() - start}


_BEFORE: dict[str, float] = {}  # probe key -> the base model's value, once per process
