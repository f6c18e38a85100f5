"""The one definition of an experiment, of a configuration, and of what a LoRA run and its baseline share.

- An experiment's identity is exactly what can change its result: the model's weights (by source and version
  or content hash), the data actually read (by content hash or hub revision), the task's splits and caps,
  the method as trained (fields the method, alpha policy or task family ignores are left out or normalised),
  the training budget, the device and precision, the seed, and for a LoRA run its baseline's method.
  Code and library versions are recorded beside it, not in it.
- A configuration is the identity minus the seed: the seeds of one configuration are its replicates.
- A run's context is the configuration minus the method: a LoRA configuration is compared with the full
  fine-tuning configurations of the same context.

The run id, the configuration id and the context id are hashes of these; experiment, records and the
analysis all use them, so there is no second list of "the fields that matter" anywhere to drift.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from lora_sweep.settings import MethodSettings, Settings, TaskSettings, TrainSettings

# Settings that change how a run is executed, logged or stored, never what it computes.
NOT_RESULT = {
    # distributed: the processes split the same global batches; equal within float tolerance (tests/test_distributed.py)
    "train": ("threads", "device", "eval_batch_size", "log_every", "memory_probe", "save_adapter", "seed", "distributed",
              "forgetting_examples", "forgetting_file",  # forgetting: a measurement beside training; the record holds its protocol
              "curve_points"),  # the learning curve's evaluations draw no random numbers: training is unchanged (tests/test_train.py)
    # replaced by the identity of the data actually read (content hashes, the hub commit)
    "task": ("data_dir", "source", "train_file", "eval_file", "hub_revision"),
}
INSTRUCT_ONLY = ("heldout_examples", "split_seed", "template", "generate_examples", "max_new_tokens", "generate_time_limit_s")
HUB_SPLITS = ("hub_dataset", "hub_config", "train_split", "eval_split")  # which hub data: for the user's own, from the hub
TEXT_ONLY = ("text_column", "text_pair_column", "label_column", "problem", "metric")  # family text
INSTRUCT_FILES = ("prompt_column", "input_column", "response_column", "messages_column")  # instruct's own files (name files)
GENERATION = ("max_new_tokens", "generate_time_limit_s")  # meaningless without generate_examples
LORA_SCALING = ("alpha", "alpha_policy", "alpha_ratio")  # replaced by the effective alpha
EVA_ONLY = ("eva_rho", "eva_tau", "eva_examples")  # meaningless without init=eva
ADALORA_ONLY = ("init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")  # meaningless for LoRA
FULL_FT_FIELDS = ("name", "lr")


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """A file's content hash (first 16 hex digits of SHA-256), computed once per process per file version."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def method_identity(method: MethodSettings, targets: list[str] | None = None,
                    ranks: dict[str, int] | None = None) -> dict[str, Any]:
    """A method as trained: full FT is its learning rate; LoRA's alpha is the effective one, its targets the module
    names it adapts (a preset and the same modules listed by name are one experiment), and a rank pattern the rank
    of each module (`ranks`, resolved: a preset and a file of the same ranks are one experiment; no pattern, or one
    giving every module `r`, adds nothing, so runs without one keep their ids). EVA's and AdaLoRA's settings count only
    for their own runs (AdaLoRA's init_r as trained), so LoRA runs keep the ids they had before either existed."""
    fields = dataclasses.asdict(method)
    if method.name == "full":
        return {k: fields[k] for k in FULL_FT_FIELDS}
    ignored = (*LORA_SCALING, "match_budget", "rank_pattern", *(() if method.eva else EVA_ONLY),
               *(() if method.name == "adalora" else ADALORA_ONLY))
    fields = {k: v for k, v in fields.items() if k not in ignored}
    if method.name == "adalora":
        fields["init_r"] = method.initial_r
    fields.update(alpha=method.effective_alpha, init=str(method.init).lower(),
                  targets=sorted(targets) if targets is not None else method.targets)
    if ranks:
        fields["rank_pattern"] = dict(sorted(ranks.items()))
    return fields


def task_identity(task: TaskSettings, data: dict[str, Any]) -> dict[str, Any]:
    own = task.family == "text" or (task.family == "instruct" and task.name == "files")
    ignored = {*NOT_RESULT["task"], *(() if own and task.hub_dataset else HUB_SPLITS), *(() if task.family == "text" else TEXT_ONLY),
               *(() if task.family == "instruct" and own else INSTRUCT_FILES),
               *(() if task.family == "instruct" else INSTRUCT_ONLY), *(() if task.generate_examples else GENERATION)}
    if task.family == "text":  # a text task carves its eval split from train as instruct does, unless given one
        ignored -= {"heldout_examples", "split_seed"}
    return {**{k: v for k, v in dataclasses.asdict(task).items() if k not in ignored}, "data": data}


def train_identity(train: TrainSettings) -> dict[str, Any]:
    fields = {k: v for k, v in dataclasses.asdict(train).items() if k not in NOT_RESULT["train"]}
    fields.pop("epochs" if train.max_steps > 0 else "max_steps")  # the other one decides the budget
    if train.batching == "sorted":
        fields["min_micro_batch"] = train.micro_batch_floor  # as trained: null and the number it stands for are one run
    else:
        fields.pop("min_micro_batch")  # only sorted batches are cut into micro-batches
    return fields


def experiment_identity(settings: Settings, method: MethodSettings, targets: list[str] | None, model: dict[str, Any],
                        data: dict[str, Any], device: str, ranks: dict[str, int] | None = None) -> dict[str, Any]:
    """{"config": ..., "seed": ...}: everything that defines one experiment's result."""
    config = {
        "model": model,
        "task": task_identity(settings.task, data),
        "method": method_identity(method, targets, ranks),
        "train": train_identity(settings.train),
        "device": {"type": device, "precision": "bf16 autocast" if device == "cuda" else "fp32"},
    }
    if method.name != "full":
        config["baseline"] = method_identity(settings.baseline)
    return {"config": config, "seed": settings.train.seed}


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_id(identity: dict[str, Any]) -> str:
    return _hash(identity)


def config_id(identity: dict[str, Any]) -> str:
    """Same configuration, other seed: the same config id."""
    return _hash(identity["config"])


BATCHING_FIELDS = ("batching", "min_micro_batch", "group_by_length")  # group_by_length: schema 2's name for it


def batching_free_id(identity: dict[str, Any]) -> str:
    """Same configuration, whichever way its batches were drawn (train.batching): what a batching comparison pairs."""
    config = {**identity["config"], "train": {k: v for k, v in identity["config"]["train"].items() if k not in BATCHING_FIELDS}}
    return _hash(config)


def context_id(identity: dict[str, Any]) -> str:
    """What a LoRA configuration shares with the full-FT configurations it is compared with."""
    return _hash({k: v for k, v in identity["config"].items() if k not in ("method", "baseline")})
