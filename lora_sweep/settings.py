"""Typed, validated settings for one experiment.

Hydra composes YAML from `conf/`; these dataclasses are its schema (registered in Hydra's
ConfigStore, so a value of the wrong type such as `method.r=abc` is refused while composing,
before anything trains) and `validate` checks values against what is allowed (not `__post_init__`:
OmegaConf builds these dataclasses with missing values while composing). A key the schema does not have,
added with `+` (`+method.rank=32`), is refused by `from_config`: Hydra would add it and the run ignore it.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import math
import re
import time
import typing
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_sweep.errors import UserError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

PROBLEM_METRICS = {"classification": ("accuracy", "f1", "matthews"), "regression": ("pearson", "spearman")}  # first: the default
TARGET_PRESETS = ("qv", "qkvo", "mlp", "all_linear", "embeddings")
ALPHA_POLICIES = ("fixed", "ratio")
BATCHING = ("sorted", "random", "grouped")  # lora_sweep.batching
DEFAULT_MIN_MICRO_BATCH = 4
DISTRIBUTED = ("none", "ddp", "fsdp")  # one process; data parallel; fully sharded (lora_sweep.distributed)
INIT_CHOICES = ("true", "false", "gaussian", "olora", "pissa", "orthogonal", "eva")  # eva: a pass over training batches first (adapters.initialize_eva)
METHODS = ("lora", "adalora", "full")  # adalora: PEFT's AdaLoRA, ranks allocated during training
ADALORA_INIT_FACTOR = 1.5  # AdaLoRA's initial budget over its target (the paper's b(0) = 1.5 b(T)) where init_r is null


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass
class ModelSettings:
    name: str = MISSING  # short label used in records and plots
    name_or_path: str = MISSING  # hub id, local folder, or `package:<module>` for a model shipped in a PyPI package
    revision: str | None = None  # hub revision (branch, tag or commit)
    architecture: str | None = None  # lora-estimate: the model's config.json (relative to conf/, e.g. architectures/llama3_1_8b.json), read instead of name_or_path's so no download is needed


@dataclass
class TaskSettings:
    family: str = MISSING  # glue | instruct | text (your own classification or regression data)
    name: str = MISSING  # sst2, mrpc, ... (lora_sweep.glue.TASKS), alpaca, ... or files (instruct); any name for a text task
    source: str = "auto"  # auto (local folder if present, else hub) | local | hub
    data_dir: str | None = None  # local data folder; else $GLUE_DIR / $INSTRUCT_DIR; else ../shared/data/{glue,instruct}
    max_train_examples: int | None = None  # cap on training examples (first N of a seeded shuffle)
    max_eval_examples: int | None = None  # cap on eval examples (first N, unshuffled)
    tune_examples: int = 1000  # training examples held out as the tuning split: every choice is made there, never on eval
    tune_seed: int = 4321  # seed of the permutation that picks the tuning split (the same for every run seed)
    # Instruction tasks only:
    heldout_examples: int = 200  # examples held out for evaluation (a seeded split, recorded)
    split_seed: int = 1234
    template: str = "alpaca"  # alpaca (the Alpaca prompt) | chat (the tokenizer's chat template)
    generate_examples: int = 0  # greedy generations scored with ROUGE-L (0 = off)
    max_new_tokens: int = 64
    generate_time_limit_s: float = 120.0  # generation stops after this long, with what it has
    # Your own data (family `text`; family `instruct` with name `files`): local files or a hub dataset, through `datasets`
    train_file: str | None = None  # .csv, .tsv, .json (a list of objects), .jsonl or .parquet
    eval_file: str | None = None  # the eval split; without it (or eval_split), heldout_examples are carved from train
    hub_dataset: str | None = None  # a hub dataset id, instead of train_file
    hub_config: str | None = None  # the dataset's config (subset) name
    hub_revision: str | None = None  # a commit, tag or branch; the run's identity holds the commit it resolved to
    train_split: str = "train"  # the hub dataset's split to train on
    eval_split: str | None = None  # the hub dataset's eval split; null: carve heldout_examples from train_split
    text_column: str = "text"  # family text: the text to classify
    text_pair_column: str | None = None  # family text: a second text, for pair tasks (entailment, paraphrase)
    label_column: str = "label"  # family text: integer or string labels (classification), numbers (regression)
    problem: str = "classification"  # family text: classification | regression
    metric: str | None = None  # family text: accuracy (default), f1 (two classes), matthews; pearson (default), spearman
    prompt_column: str = "prompt"  # instruct files: the instruction
    input_column: str | None = None  # instruct files: an optional input shown with the instruction
    response_column: str = "response"  # instruct files: the response (the loss is on its tokens only)
    messages_column: str | None = None  # instruct files: chat rows [{role, content}, ...]; the last assistant turn is the response

    def validate(self) -> None:
        _check(self.source in ("auto", "local", "hub"), f"task.source={self.source!r} is not allowed; use auto, local or hub")
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"task.{key}={value} must be at least 1 (or null for all)")
        _check(self.heldout_examples >= 1, f"task.heldout_examples={self.heldout_examples} must be >= 1")
        _check(self.tune_examples >= 1, f"task.tune_examples={self.tune_examples} must be >= 1: choices are made on the tuning split")
        _check(self.template in ("alpaca", "chat"), f"task.template={self.template!r} is unknown; use alpaca or chat")
        _check(self.generate_examples >= 0 and self.max_new_tokens >= 1,
               "task.generate_examples must be >= 0 and task.max_new_tokens >= 1")
        _check(self.problem in PROBLEM_METRICS, f"task.problem={self.problem!r} is unknown; use classification or regression")
        allowed = PROBLEM_METRICS[self.problem]
        _check(self.metric is None or self.metric in allowed,
               f"task.metric={self.metric!r} is not a {self.problem} metric; use one of {', '.join(allowed)}")
        if self.family == "text" or (self.family == "instruct" and self.name == "files"):
            _check((self.train_file is None) != (self.hub_dataset is None),
                   "your own data needs exactly one of task.train_file (a local file) and task.hub_dataset (a hub dataset id)")
            _check(self.eval_file is None or self.train_file is not None, "task.eval_file needs task.train_file (a hub dataset names task.eval_split)")

    @property
    def primary_metric(self) -> str:
        """The metric a `text` task reports and compares runs by."""
        return self.metric or PROBLEM_METRICS[self.problem][0]


@dataclass
class MethodSettings:
    name: str = MISSING  # lora | adalora (ranks allocated during training) | full
    lr: float = MISSING  # peak learning rate of AdamW
    r: int = 8  # LoRA rank; AdaLoRA: the target average rank it prunes to (the kept budget, as uniform r's)
    alpha: float = 16.0  # LoRA alpha (alpha_policy=fixed)
    alpha_policy: str = "fixed"  # fixed: alpha as given; ratio: alpha = alpha_ratio * r
    alpha_ratio: float = 2.0
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    dropout: float = 0.0
    targets: Any = "qv"  # a preset (qv, qkvo, mlp, all_linear) or a list of module-name regexes
    use_dora: bool = False
    init: str = "true"  # PEFT's init_lora_weights; eva: A from the SVD of activations on training batches, ranks redistributed
    match_budget: str | None = None  # a preset: choose r so the adapter is as large as that preset's at rank `r`
    rank_pattern: Any = None  # per-module ranks (PEFT's rank_pattern): a preset in conf/rank_pattern/, a YAML/JSON file, or a mapping; others get `r`, 0 leaves a module unadapted
    # EVA (init=eva), PEFT's EvaConfig:
    eva_rho: float = 2.0  # a module may get up to rho * r ranks (>= 1; 1 = no redistribution); the ranks still sum to r per module
    eva_tau: float = 0.99  # the pass stops once each module's components change by less than this cosine similarity between batches
    eva_examples: int = 512  # the pass reads the run's first training batches up to this many examples (never tuning or eval data), cycling them until converged
    # AdaLoRA (name=adalora), PEFT's AdaLoraConfig; its schedule in fractions of the run's optimizer steps:
    init_r: int | None = None  # initial rank of every module (the trained budget); null: ceil(1.5 * r)
    tinit: float = 0.1  # warm-up without pruning: this fraction of the steps
    tfinal: float = 0.2  # final fine-tuning at the pruned ranks: this fraction of the steps (pruning ends at 1 - tfinal)
    deltaT: int = 1  # optimizer steps between two reallocations while pruning
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality regulariser of P and Q, added to the training loss

    def validate(self) -> None:
        _check(self.name in METHODS, f"method={self.name!r} is unknown; use one of {', '.join(METHODS)}")
        _check(self.lr > 0, f"method.lr={self.lr} must be > 0")
        if self.name == "full":
            return
        _check(self.r >= 1, f"method.r={self.r} must be >= 1")
        _check(self.alpha_policy in ALPHA_POLICIES, f"method.alpha_policy={self.alpha_policy!r} is unknown; use one of {', '.join(ALPHA_POLICIES)}")
        _check(self.effective_alpha > 0, f"method alpha={self.effective_alpha} must be > 0")
        _check(0 <= self.dropout < 1, f"method.dropout={self.dropout} must be in [0, 1)")
        _check(str(self.init).lower() in INIT_CHOICES, f"method.init={self.init!r} is unknown; use one of {', '.join(INIT_CHOICES)}")
        if isinstance(self.targets, str):
            _check(self.targets in TARGET_PRESETS, f"method.targets={self.targets!r} is not a preset; use one of {', '.join(TARGET_PRESETS)} or a list of module names")
        else:
            _check(bool(self.targets) and all(isinstance(t, str) and t for t in self.targets),
                   f"method.targets={self.targets!r} must be a preset name or a non-empty list of module names")
        _check(self.match_budget is None or self.match_budget in TARGET_PRESETS,
               f"method.match_budget={self.match_budget!r} is not a preset; use one of {', '.join(TARGET_PRESETS)} or null")
        _check(not (self.rank_pattern and self.match_budget), "method.rank_pattern and method.match_budget cannot be combined: "
               "a rank pattern sets its own budget")
        if self.eva:
            _check(self.eva_rho >= 1, f"method.eva_rho={self.eva_rho} must be >= 1 (a module may get up to rho * r ranks; 1: none moves)")
            _check(0 < self.eva_tau <= 1, f"method.eva_tau={self.eva_tau} must be in (0, 1]")
            _check(self.eva_examples >= 1, f"method.eva_examples={self.eva_examples} must be >= 1")
            _check(not self.use_dora, "method.init=eva with use_dora=true is not supported; use one of them")
        if self.name == "adalora":
            self._validate_adalora()

    def _validate_adalora(self) -> None:
        _check(self.initial_r >= self.r, f"method.r={self.r} (AdaLoRA's target rank) is above method.init_r={self.initial_r}; "
               f"AdaLoRA prunes from init_r down to r: use init_r >= {self.r}")
        _check(0 <= self.tinit < 1 and 0 <= self.tfinal < 1, f"method.tinit={self.tinit} and method.tfinal={self.tfinal} are fractions "
               "of the run's steps: each must be in [0, 1)")
        _check(self.tinit + self.tfinal < 1, f"method.tinit + method.tfinal = {self.tinit + self.tfinal:g} leaves no steps to prune "
               "ranks in; their sum must be below 1")
        _check(self.deltaT >= 1, f"method.deltaT={self.deltaT} must be >= 1 (optimizer steps between reallocations)")
        _check(0 < self.beta1 < 1 and 0 < self.beta2 < 1, f"method.beta1={self.beta1} and method.beta2={self.beta2} must be in (0, 1)")
        _check(self.orth_reg_weight >= 0, f"method.orth_reg_weight={self.orth_reg_weight} must be >= 0")
        for clash, why in ((self.use_dora, "DoRA"), (self.rank_pattern, "a rank pattern (AdaLoRA chooses the ranks)"),
                           (str(self.init).lower() == "eva", "init=eva (AdaLoRA has its own initialisation)")):
            _check(not clash, f"method=adalora does not combine with {why}; use method=lora for it")

    @property
    def eva(self) -> bool:
        """Whether this LoRA run is initialised by EVA (a data pass before training)."""
        return self.name == "lora" and str(self.init).lower() == "eva"

    @property
    def initial_r(self) -> int:
        """AdaLoRA's initial rank of every module: init_r, or ceil(1.5 * r) where it is null."""
        return self.init_r or math.ceil(ADALORA_INIT_FACTOR * self.r)

    @property
    def built_r(self) -> int:
        """The rank every adapted module is built at (before any pattern): AdaLoRA's initial rank, else r."""
        return self.initial_r if self.name == "adalora" else self.r

    def adalora_schedule(self, steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in optimizer steps for a run of `steps`; an error where no step is left to prune in."""
        tinit, tfinal = round(self.tinit * steps), round(self.tfinal * steps)
        prune, need = steps - tfinal - tinit, max(2, self.deltaT)  # PEFT scores importance on steps before the last allocation
        _check(prune >= need, f"method.tinit={self.tinit:g} and method.tfinal={self.tfinal:g} of a {steps}-step run leave {prune} "
               f"to prune ranks in; AdaLoRA needs at least {need} (2, or method.deltaT={self.deltaT} if more): train longer or "
               "lower tinit, tfinal or deltaT")
        return tinit, tfinal

    @property
    def effective_alpha(self) -> float:
        return self.alpha_ratio * self.r if self.alpha_policy == "ratio" else self.alpha

    @property
    def scaling_label(self) -> str:
        """How alpha was chosen, for grouping runs into series: 'alpha=16', 'alpha=2r', 'rslora alpha=16'."""
        base = f"alpha={self.alpha_ratio:g}r" if self.alpha_policy == "ratio" else f"alpha={self.alpha:g}"
        return f"rslora {base}" if self.use_rslora else base


@dataclass
class TrainSettings:
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 150  # optimizer steps; -1 to train for `epochs` instead
    epochs: float = 1.0
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01  # AdamW's, on weight matrices only (not on biases and normalisation weights)
    max_grad_norm: float = 1.0  # gradient clipping by global norm; 0 = off
    batching: str = "sorted"  # sorted: each step's random batch sorted by length and cut into micro-batches (the same optimisation as random, less padding) | random | grouped (transformers' length-grouped sampler: faster, but changes the result)
    min_micro_batch: int | None = None  # batching=sorted: fewest examples in one micro-batch (1..batch_size); null: 4, or batch_size if smaller. Small ones pad least, large ones keep matmuls efficient (SST-2, batch 32: 4 -> 88 % of computed tokens real, 8 -> 73 %)
    divergence_factor: float = 4.0  # diverged when the mean loss of the last 10 steps exceeds this x the first step's
    max_seq_len: int = 64  # truncation length; batches are padded dynamically
    seed: int = 0
    threads: int = 0  # torch threads; 0 = leave torch's default
    device: str = "auto"  # auto (CUDA with bf16 if present, else CPU fp32) | cpu | cuda
    eval_batch_size: int = 32  # examples per length-sorted evaluation batch (outputs returned in the split's order)
    log_every: int = 10  # steps between logged losses
    curve_points: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # fractions of the budget at which the tuning split is also evaluated (the learning curve; the end of training always is); [] = none
    memory_probe: bool = True  # measure one optimizer step's peak tensor memory and its split
    save_adapter: bool = True  # save the adapter (or full model) and record its size on disk
    distributed: str = "none"  # none | ddp | fsdp: how the processes of one run (torchrun, accelerate launch, SLURM) share it
    forgetting_examples: int = 160  # forgetting probe (lora_sweep.forgetting): STS-B dev pairs or texts, a fixed seeded subset (1 thread: MiniLM ~2.5 s, SmolLM2-135M ~11 s); 0 = off
    forgetting_file: str | None = None  # the probe's data: null = STS-B/dev.tsv of the GLUE folder; a decoder reads a text file, one document a line

    def total_steps(self, examples: int) -> int:
        """Optimizer steps of a run on `examples` training examples: max_steps, or `epochs` passes."""
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.epochs * math.ceil(examples / self.batch_size) / self.grad_accum))

    @property
    def micro_batch_floor(self) -> int:
        """The fewest examples a sorted micro-batch holds, as trained (min_micro_batch resolved)."""
        return self.min_micro_batch or min(DEFAULT_MIN_MICRO_BATCH, self.batch_size)

    def validate(self) -> None:
        for key in ("batch_size", "grad_accum", "max_seq_len", "eval_batch_size", "log_every"):
            _check(getattr(self, key) >= 1, f"train.{key}={getattr(self, key)} must be >= 1")
        _check(self.max_steps >= 1 or (self.max_steps == -1 and self.epochs > 0),
               f"train.max_steps={self.max_steps} must be >= 1, or -1 with train.epochs > 0")
        _check(0 <= self.warmup_ratio < 1, f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        _check(self.threads >= 0, f"train.threads={self.threads} must be >= 0")
        _check(0 <= self.seed < 2**32, f"train.seed={self.seed} must be between 0 and 2**32 - 1")
        _check(self.forgetting_examples >= 0, f"train.forgetting_examples={self.forgetting_examples} must be >= 0 (0 = no forgetting probe)")
        _check(self.max_grad_norm >= 0, f"train.max_grad_norm={self.max_grad_norm} must be >= 0 (0 = no clipping)")
        _check(self.divergence_factor > 1, f"train.divergence_factor={self.divergence_factor} must be > 1")
        _check(self.device in ("auto", "cpu", "cuda"), f"train.device={self.device!r} is not allowed; use auto, cpu or cuda")
        _check(self.distributed in DISTRIBUTED, f"train.distributed={self.distributed!r} is not allowed; use {', '.join(DISTRIBUTED)}")
        _check(self.batching in BATCHING, f"train.batching={self.batching!r} is not allowed; use {', '.join(BATCHING)}")
        _check(self.min_micro_batch is None or 1 <= self.min_micro_batch <= self.batch_size,
               f"train.min_micro_batch={self.min_micro_batch} must be between 1 and train.batch_size={self.batch_size} (or null: "
               f"{DEFAULT_MIN_MICRO_BATCH}, or the batch size if smaller)")
        points = list(self.curve_points)
        _check(all(0 < x < 1 for x in points) and points == sorted(set(points)),
               f"train.curve_points={points} must be increasing fractions of the budget in (0, 1) (the end of training is always evaluated)")


@dataclass
class LoggerSettings:
    name: str = "none"  # none | wandb
    project: str = "lora-sweep"
    mode: str = "offline"  # wandb mode: online | offline | disabled

    def validate(self) -> None:
        _check(self.name in ("none", "wandb"), f"logger={self.name!r} is unknown; use none or wandb")
        _check(self.mode in ("online", "offline", "disabled"), f"logger.mode={self.mode!r} is not allowed; use online, offline or disabled")


PRECISIONS = ("auto", "fp32", "bf16_autocast", "bf16")
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")
MEMORY_UNITS = {"TiB": 2**40, "GiB": 2**30, "MiB": 2**20, "TB": 10**12, "GB": 10**9, "MB": 10**6}


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '512MiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*", str(text))
    _check(match is not None and match.group(2) in MEMORY_UNITS,
           f"estimate.device_memory={text!r} is not a memory size; write a number and one of {', '.join(MEMORY_UNITS)} (e.g. 80GiB)")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2)])


@dataclass
class EstimateSettings:
    """What `lora-estimate` assumes beyond the experiment itself (model, method and train come from their groups)."""

    device_memory: str = "80GiB"  # memory of the device the estimate is for: a number and a unit (GiB, GB, MiB, MB, TiB, TB)
    device: str = "cuda"  # cuda (fused attention kernels, 1-byte dropout masks) | cpu (as this harness measures on CPU)
    precision: str = "auto"  # auto: as lora-sweep trains on `device` (cuda: bf16 autocast over fp32 weights; cpu: fp32); fp32; bf16_autocast; bf16 (bf16 weights, gradients and AdamW state; LoRA adapters stay fp32, as PEFT keeps them)
    batch_size: int | None = None  # examples per micro-batch; null: train.batch_size
    seq_len: int | None = None  # tokens per example (every example at this length); null: train.max_seq_len
    gradient_checkpointing: bool = False  # keep each layer's input only and recompute the layer in backward (one more forward)
    optimizer: str = "adamw"  # adamw (two moments in the parameter's dtype) | adamw_8bit (bitsandbytes: 2 bytes per parameter) | sgd (no state)
    device_tflops: float = 989.0  # rated dense TFLOP/s of the device in the compute dtype (H100 SXM bf16: 989; A100: 312; L40S: 362)
    utilization: float = 0.4  # fraction of the rated FLOP/s a training step reaches (an assumption, not measured here; see benchmarks/memory_model.py)

    def validate(self) -> None:
        parse_bytes(self.device_memory)
        _check(self.device in ("cuda", "cpu"), f"estimate.device={self.device!r} is not allowed; use cuda or cpu")
        _check(self.precision in PRECISIONS, f"estimate.precision={self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        _check(self.optimizer in OPTIMIZERS, f"estimate.optimizer={self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        for key in ("batch_size", "seq_len"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"estimate.{key}={value} must be at least 1 (or null for the train setting)")
        _check(self.device_tflops > 0, f"estimate.device_tflops={self.device_tflops} must be > 0")
        _check(0 < self.utilization <= 1, f"estimate.utilization={self.utilization} must be in (0, 1]")

    @property
    def device_bytes(self) -> int:
        return parse_bytes(self.device_memory)

    def tokens(self, train: TrainSettings) -> tuple[int, int]:
        """(batch size, sequence length) estimated: these settings' where given, else the training run's."""
        return self.batch_size or train.batch_size, self.seq_len or train.max_seq_len

    @property
    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16_autocast" if self.device == "cuda" else "fp32"


@dataclass
class AnalysisSettings:
    target_model: str | None = None  # a model preset (conf/model/<name>.yaml): the report adds its memory and time estimate; null: none


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    task: TaskSettings = field(default_factory=TaskSettings)
    method: MethodSettings = field(default_factory=MethodSettings)
    baseline: MethodSettings = field(default_factory=MethodSettings)  # the full-FT method every LoRA run is paired with
    train: TrainSettings = field(default_factory=TrainSettings)
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    estimate: EstimateSettings = field(default_factory=EstimateSettings)  # lora-estimate only
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    runs_dir: str = "results/runs"  # the run records (and their history/, logs/, corrupt/ folders); the report goes beside it
    results_dir: str | None = None  # deprecated: the old name of runs_dir, accepted (with a warning line) for one release
    cache_dir: str = ".cache/lora_sweep"  # tokenized data, converted models, Hydra's own output folders
    artifacts_dir: str = "${runs_dir}/artifacts"  # saved adapters and models (train.save_adapter)
    pair_baseline: bool = True  # ensure the paired full-FT run before each LoRA run
    rerun: bool = False  # run again even if a `done` record exists
    analyze: bool = False  # sweeps: write the analysis report beside runs_dir when the sweep ends
    deploy: bool = False  # sweeps: before the analysis, measure deployment (lora-deploy's default run) into <results>/deploy

    def validate(self) -> None:
        for part in (self.task, self.method, self.baseline, self.train, self.logger, self.estimate):
            part.validate()
        _check(self.baseline.name == "full", f"baseline must be a full fine-tuning method, not {self.baseline.name!r}")
        if self.method.name == "adalora" and self.train.max_steps > 0:
            self.method.adalora_schedule(self.train.max_steps)

    def check_training_split(self, examples: int) -> None:
        """The checks that need the training split's size (known once the data is read, before any run trains)."""
        if self.method.eva:
            _check(self.method.eva_examples <= examples, f"method.eva_examples={self.method.eva_examples} is more than the "
                   f"{examples} training examples; use method.eva_examples <= {examples}")
        if self.method.name == "adalora":
            self.method.adalora_schedule(self.train.total_steps(examples))


@functools.cache
def _stamp() -> str:
    """Date, time and a random suffix, drawn once per process: two sweeps started in the same second get folders of their own."""
    return time.strftime("%Y-%m-%d/%H-%M-%S-") + uuid.uuid4().hex[:6]


FALLBACK_RANK = 8  # the rank an allocator comparison is budgeted at when the grid recommends none (conf/method/lora.yaml's r)


def recommended_rank(table: str, task: str, model: str, targets: str) -> int:
    """`${recommended_rank:...}` (conf/sweep/autorank.yaml): the uniform rank a grid's analysis recommended for this task,
    model and targets (its recommendation table, lora-analyze's tables/recommendation.csv), else FALLBACK_RANK."""
    path = Path(table)
    if path.is_file():
        with path.open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                if (row["task"], row["model"], row["targets"]) == (task, model, str(targets)) and row.get("r"):
                    return int(float(row["r"]))
    return FALLBACK_RANK


def register() -> None:
    """Make `Settings` the schema Hydra validates `conf/config.yaml` against, and `${stamp:}` (conf/config.yaml's
    output folders) and `${recommended_rank:}` resolvable. Hydra copies a resolved value into each job's config (as it
    does `${now:}`), so jobs in other processes name the folder the sweep's own process named."""
    ConfigStore.instance().store(name="settings_schema", node=Settings)
    OmegaConf.register_new_resolver("stamp", _stamp, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("recommended_rank", recommended_rank, replace=True)


def unknown_key(path: str) -> str | None:
    """The one line for a dotted key the schema does not have (`method.rank`), naming the closest known keys;
    None where every part of it is known or lies below a free-form setting (a rank pattern's mapping)."""
    schema: Any = Settings
    parts = path.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(schema):
            return None
        known = typing.get_type_hints(schema)
        if part not in known:
            group = ".".join(parts[:depth])
            prefix = f"{group}." if group else ""
            close = difflib.get_close_matches(part, known, n=3)
            names = ", ".join(prefix + k for k in (close or known))
            return f"{prefix}{part} is not a setting; {'the closest known' if close else 'known'}: {names}"
        schema = known[part]
    return None


def _check_known_keys(cfg: DictConfig, schema: Any = Settings, prefix: str = "") -> None:
    """Refuse a key the schema does not know (`+method.rank=32`, `+train.max_step=5`): Hydra adds it, OmegaConf's
    merge keeps it and to_object drops it, so the run would train without the setting the user typed."""
    hints = typing.get_type_hints(schema)
    for key, node in cfg.items_ex(resolve=False):
        if key not in hints:
            raise UserError(unknown_key(f"{prefix}{key}"))
        if dataclasses.is_dataclass(hints[key]) and isinstance(node, DictConfig):
            _check_known_keys(node, hints[key], f"{prefix}{key}.")


def from_config(cfg: DictConfig, strict: bool = True) -> Settings:
    """Turn a composed config into validated settings, or raise a one-line UserError. `strict`: refuse a key the
    schema does not know (a user's input; a record written by an older version may hold a setting since removed)."""
    if strict:
        _check_known_keys(cfg)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Settings), cfg)
        _rename_deprecated(merged)
        settings = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    settings.validate()
    return settings


def _rename_deprecated(config: DictConfig) -> None:
    """results_dir (the runs folder, under a name that said otherwise) is read as runs_dir, with one warning line."""
    if config.results_dir is None:
        return
    if config.runs_dir != Settings.runs_dir and config.runs_dir != config.results_dir:
        raise UserError(f"results_dir={config.results_dir} and runs_dir={config.runs_dir} disagree; "
                        f"set runs_dir only (results_dir is its deprecated name)")
    print(f"warning: results_dir is deprecated and will be removed; use runs_dir={config.results_dir} "
          f"(the folder of the run records)", file=sys.stderr)
    config.runs_dir, config.results_dir = config.results_dir, None


def compose(*overrides: str) -> Settings:
    """Settings from `conf/` with command-line style overrides, outside a Hydra app (tests, notebooks, benchmarks)."""
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return from_config(hydra_compose(config_name="config", overrides=list(overrides)))
