"""lora_sweep.identity: every setting either changes a run's id (it can change the result) or is proven not to.

The table below has a row for every field of every settings dataclass (enumerated with dataclasses.fields, so a
field added without a row fails `test_every_settings_field_has_a_row`). Each row holds cases `(base, changed,
expect)`: two override lists composed with `lora_sweep.settings.compose` and planned with `experiment.plan` on
config-only tiny models (planning builds the model on the meta device, so no weights are read), and whether the
two run ids must differ ("differs") or be equal ("same"). A "same" case also checks that the two settings really
differ, so an override that silently does nothing cannot pass as "ignored".
"""

from __future__ import annotations

import dataclasses
import functools
import shutil

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from lora_sweep import experiment, identity
from lora_sweep.errors import UserError
from lora_sweep.settings import (AnalysisSettings, EstimateSettings, LoggerSettings, MethodSettings, ModelSettings, Settings, TaskSettings,
                                 TrainSettings, compose)
from tests.conftest import SHARED_DATA

DIFFERS, SAME = "differs", "same"
INSTRUCT = ("model.name_or_path={llama}", "task=instruct/alpaca")
GENERATING = (*INSTRUCT, "task.generate_examples=2")
FULL = ("method=full",)
RATIO = ("method.alpha_policy=ratio",)
EVA = ("method.init=eva",)
ADALORA = ("method=adalora",)
NO_STEPS = ("train.max_steps=-1",)
TEXT = ("task=text/classification", "task.train_file={own}", "task.heldout_examples=10", "task.tune_examples=10")
SCORE = (*TEXT, "task.label_column=score")

# section -> field -> [(base overrides, changed overrides, expectation)]; "{bert}" etc. are folders made below.
TABLE: dict[str, dict[str, list[tuple[tuple[str, ...], tuple[str, ...], str]]]] = {
    "model": {
        "name": [((), ("model.name=another_label",), SAME)],  # a label for tables and plots
        "name_or_path": [((), ("model.name_or_path={bert_other}",), DIFFERS),  # other weights
                         ((), ("model.name_or_path={bert_copy}",), SAME)],  # the same files elsewhere
        "revision": [((), ("model.revision=v2",), SAME)],  # a local folder has no revisions
        "architecture": [((), ("model.architecture=architectures/llama3_2_1b.json",), SAME)],  # read by lora-estimate only
    },
    "task": {
        "family": [(("model.name_or_path={llama}",), INSTRUCT, DIFFERS)],
        "name": [((), ("task.name=cola",), DIFFERS)],
        "source": [((), ("task.source=local",), SAME)],  # auto resolves to the same local files
        "data_dir": [((), ("task.data_dir={glue_copy}",), SAME),  # an identical copy of the data
                     ((), ("task.data_dir={glue_changed}",), DIFFERS)],  # one line of train.tsv changed
        "max_train_examples": [((), ("task.max_train_examples=100",), DIFFERS)],
        "max_eval_examples": [((), ("task.max_eval_examples=100",), DIFFERS)],
        "tune_examples": [((), ("task.tune_examples=500",), DIFFERS), (INSTRUCT, (*INSTRUCT, "task.tune_examples=50"), DIFFERS)],
        "tune_seed": [((), ("task.tune_seed=1",), DIFFERS)],
        "heldout_examples": [((), ("task.heldout_examples=50",), SAME), (INSTRUCT, (*INSTRUCT, "task.heldout_examples=50"), DIFFERS)],
        "split_seed": [((), ("task.split_seed=7",), SAME), (INSTRUCT, (*INSTRUCT, "task.split_seed=7"), DIFFERS)],
        "template": [((), ("task.template=chat",), SAME), (INSTRUCT, (*INSTRUCT, "task.template=chat"), DIFFERS)],
        "generate_examples": [((), ("task.generate_examples=4",), SAME), (INSTRUCT, GENERATING, DIFFERS)],
        "max_new_tokens": [((), ("task.max_new_tokens=8",), SAME), (INSTRUCT, (*INSTRUCT, "task.max_new_tokens=8"), SAME),
                           (GENERATING, (*GENERATING, "task.max_new_tokens=8"), DIFFERS)],
        "generate_time_limit_s": [((), ("task.generate_time_limit_s=5",), SAME),
                                  (INSTRUCT, (*INSTRUCT, "task.generate_time_limit_s=5"), SAME),
                                  (GENERATING, (*GENERATING, "task.generate_time_limit_s=5"), DIFFERS)],
        # your own data: read by the text family (and instruct's files), ignored by GLUE's presets; a file by content
        "train_file": [((), ("task.train_file={own}",), SAME), (TEXT, (*TEXT[:1], "task.train_file={own_copy}", *TEXT[2:]), SAME),
                       (TEXT, (*TEXT[:1], "task.train_file={own_changed}", *TEXT[2:]), DIFFERS)],
        "eval_file": [((), ("task.eval_file={own}",), SAME), (TEXT, (*TEXT, "task.eval_file={own_copy}"), DIFFERS)],
        "hub_dataset": [((), ("task.hub_dataset=someone/tickets",), SAME)],  # offline: the hub's side is tested in test_own_data
        "hub_config": [((), ("task.hub_config=other",), SAME), (TEXT, (*TEXT, "task.hub_config=other"), SAME)],
        "hub_revision": [((), ("task.hub_revision=v2",), SAME), (TEXT, (*TEXT, "task.hub_revision=v2"), SAME)],
        "train_split": [((), ("task.train_split=other",), SAME), (TEXT, (*TEXT, "task.train_split=other"), SAME)],
        "eval_split": [((), ("task.eval_split=test",), SAME), (TEXT, (*TEXT, "task.eval_split=test"), SAME)],
        "text_column": [((), ("task.text_column=other",), SAME), (TEXT, (*TEXT, "task.text_column=other"), DIFFERS)],
        "text_pair_column": [((), ("task.text_pair_column=other",), SAME), (TEXT, (*TEXT, "task.text_pair_column=other"), DIFFERS)],
        "label_column": [((), ("task.label_column=score",), SAME), (TEXT, SCORE, DIFFERS)],
        "problem": [((), ("task.problem=regression",), SAME), (SCORE, (*SCORE, "task.problem=regression"), DIFFERS)],
        "metric": [((), ("task.metric=matthews",), SAME), (TEXT, (*TEXT, "task.metric=matthews"), DIFFERS)],
        "prompt_column": [((), ("task.prompt_column=q",), SAME), (TEXT, (*TEXT, "task.prompt_column=q"), SAME)],
        "input_column": [((), ("task.input_column=q",), SAME), (TEXT, (*TEXT, "task.input_column=q"), SAME)],
        "response_column": [((), ("task.response_column=q",), SAME), (TEXT, (*TEXT, "task.response_column=q"), SAME)],
        "messages_column": [((), ("task.messages_column=q",), SAME), (TEXT, (*TEXT, "task.messages_column=q"), SAME)],
    },
    "method": {
        "name": [((), ("method.name=full",), DIFFERS)],
        "lr": [((), ("method.lr=1e-3",), DIFFERS), (FULL, (*FULL, "method.lr=3e-5"), DIFFERS)],
        "r": [((), ("method.r=4",), DIFFERS), (FULL, (*FULL, "method.r=4"), SAME)],
        "alpha": [((), ("method.alpha=32",), DIFFERS), (RATIO, (*RATIO, "method.alpha=32"), SAME), (FULL, (*FULL, "method.alpha=32"), SAME)],
        # r=8: alpha 16 as given, or 2 x 8 by the ratio policy, is the same effective alpha
        "alpha_policy": [((), RATIO, SAME), (("method.alpha=8",), ("method.alpha=8", *RATIO), DIFFERS),
                         (FULL, (*FULL, *RATIO, "method.alpha_ratio=4"), SAME)],
        "alpha_ratio": [((), ("method.alpha_ratio=4",), SAME), (RATIO, (*RATIO, "method.alpha_ratio=4"), DIFFERS)],
        "use_rslora": [((), ("method.use_rslora=true",), DIFFERS), (FULL, (*FULL, "method.use_rslora=true"), SAME)],
        "dropout": [((), ("method.dropout=0.1",), DIFFERS), (FULL, (*FULL, "method.dropout=0.1"), SAME)],
        "targets": [((), ("method.targets=qkvo",), DIFFERS), ((), ("method.targets=[query,value]",), SAME),
                    (FULL, (*FULL, "method.targets=qkvo"), SAME)],
        "use_dora": [((), ("method.use_dora=true",), DIFFERS), (FULL, (*FULL, "method.use_dora=true"), SAME)],
        "init": [((), ("method.init=gaussian",), DIFFERS), ((), ("method.init=True",), SAME), (FULL, (*FULL, "method.init=gaussian"), SAME)],
        # qkvo has twice qv's (d + k) per layer on BERT: matching its budget at r=8 on qv trains r=16 on qv
        "match_budget": [(("method.r=16",), ("method.match_budget=qkvo",), SAME), ((), ("method.match_budget=qkvo",), DIFFERS),
                         (FULL, (*FULL, "method.match_budget=qkvo"), SAME)],
        # the resolved rank of each module: other ranks differ; the same ranks spelled otherwise, or all at r, do not
        "rank_pattern": [((), ("method.rank_pattern={tmp}/pattern.yaml",), DIFFERS),
                         ((), ("method.rank_pattern={tmp}/uniform.yaml",), SAME),
                         (("method.rank_pattern={tmp}/pattern.yaml",), ("method.rank_pattern={tmp}/pattern_by_suffix.json",), SAME),
                         (FULL, (*FULL, "method.rank_pattern={tmp}/pattern.yaml"), SAME)],
        # EVA's settings define an EVA run only; AdaLoRA's an AdaLoRA run only (its init_r as trained)
        **{name: [((), (f"method.{name}={value}",), SAME), (EVA, (*EVA, f"method.{name}={value}"), DIFFERS)]
           for name, value in {"eva_rho": 1.5, "eva_tau": 0.9, "eva_examples": 64}.items()},
        **{name: [((), (f"method.{name}={value}",), SAME), (ADALORA, (*ADALORA, f"method.{name}={value}"), DIFFERS),
                  (FULL, (*FULL, f"method.{name}={value}"), SAME)]
           for name, value in {"tinit": 0.05, "tfinal": 0.1, "deltaT": 2, "beta1": 0.9, "beta2": 0.9, "orth_reg_weight": 0.1}.items()},
        "init_r": [((), ("method.init_r=16",), SAME), (ADALORA, (*ADALORA, "method.init_r=16"), DIFFERS),
                   (ADALORA, (*ADALORA, "method.init_r=12"), SAME)],  # null stands for ceil(1.5 r) = 12: as trained
    },
    "baseline": {  # the full-FT method a LoRA run is paired with: only its learning rate defines it
        "name": [],  # anything but full is refused: test_a_baseline_that_is_not_full_fine_tuning_is_refused
        "lr": [((), ("baseline.lr=5e-5",), DIFFERS), (FULL, (*FULL, "baseline.lr=5e-5"), SAME)],
        **{name: [((), (f"baseline.{name}={value}",), SAME)] for name, value in {
            "r": 4, "alpha": 32, "alpha_policy": "ratio", "alpha_ratio": 4, "use_rslora": "true", "dropout": 0.1,
            "targets": "qkvo", "use_dora": "true", "init": "gaussian", "match_budget": "qkvo",
            "rank_pattern": "{tmp}/pattern.yaml", "eva_rho": 1.5, "eva_tau": 0.9, "eva_examples": 64, "init_r": 16, "tinit": 0.05,
            "tfinal": 0.1, "deltaT": 2, "beta1": 0.9, "beta2": 0.9, "orth_reg_weight": 0.1}.items()},
    },
    "train": {
        **{name: [((), (f"train.{name}={value}",), DIFFERS)] for name, value in {
            "batch_size": 16, "grad_accum": 2, "max_steps": 100, "warmup_ratio": 0.1, "weight_decay": 0.0, "max_grad_norm": 0.5,
            "batching": "random", "divergence_factor": 8.0, "max_seq_len": 128}.items()},
        "min_micro_batch": [((), ("train.min_micro_batch=2",), DIFFERS), ((), ("train.min_micro_batch=4",), SAME),  # null is 4 here
                            (("train.batching=random",), ("train.batching=random", "train.min_micro_batch=2"), SAME)],
        "epochs": [((), ("train.epochs=3",), SAME), (NO_STEPS, (*NO_STEPS, "train.epochs=3"), DIFFERS)],
        "seed": [((), ("train.seed=1",), DIFFERS)],  # and the same config id: test_seeds_are_replicates_of_one_configuration
        "device": [((), ("train.device=cpu",), DIFFERS if torch.cuda.is_available() else SAME)],  # the device as resolved
        **{name: [((), (f"train.{name}={value}",), SAME)] for name, value in {
            "threads": 1, "eval_batch_size": 7, "log_every": 3, "memory_probe": "false", "save_adapter": "false",
            "distributed": "ddp",  # the same global batches over several processes: tests/test_distributed.py
            "forgetting_examples": 0, "forgetting_file": "{tmp}/text.txt", "curve_points": "[0.5]"}.items()},
    },
    "logger": {name: [((), (override,), SAME)] for name, override in {
        "name": "logger=wandb", "project": "logger.project=other", "mode": "logger.mode=disabled"}.items()},
    "estimate": {name: [((), (f"estimate.{name}={value}",), SAME)] for name, value in {  # lora-estimate's assumptions
        "device_memory": "24GiB", "device": "cpu", "precision": "bf16", "batch_size": 4, "seq_len": 512,
        "gradient_checkpointing": "true", "optimizer": "sgd", "device_tflops": 312, "utilization": 0.5}.items()},
    "analysis": {"target_model": [((), ("analysis.target_model=llama3_1_8b",), SAME)]},  # the report only
    "": {  # top-level settings: where results go and how a sweep treats existing runs
        "runs_dir": [((), ("runs_dir={tmp}/elsewhere",), SAME)],
        "cache_dir": [((), ("cache_dir={tmp}/other_cache",), SAME)],
        "pair_baseline": [((), ("pair_baseline=false",), SAME)],
        "rerun": [((), ("rerun=true",), SAME)],
        "artifacts_dir": [((), ("artifacts_dir={tmp}/adapters",), SAME)],
        "analyze": [((), ("analyze=true",), SAME)],
        "deploy": [((), ("deploy=true",), SAME)],
    },
}
SECTIONS = {"model": ModelSettings, "task": TaskSettings, "method": MethodSettings, "baseline": MethodSettings,
            "train": TrainSettings, "logger": LoggerSettings, "estimate": EstimateSettings, "analysis": AnalysisSettings}
CASES = [pytest.param(section, name, base, changed, expect, id=f"{section or 'top'}.{name}-{i}")
         for section, rows in TABLE.items() for name, cases in rows.items() for i, (base, changed, expect) in enumerate(cases)]


def test_every_settings_field_has_a_row():
    for section, cls in SECTIONS.items():
        assert set(TABLE[section]) == {f.name for f in dataclasses.fields(cls)}, section
    top = {f.name for f in dataclasses.fields(Settings)} - set(SECTIONS) - {"results_dir"}  # runs_dir's deprecated name
    assert set(TABLE[""]) == top
    assert all(cases for section, rows in TABLE.items() for name, cases in rows.items() if (section, name) != ("baseline", "name"))


@pytest.fixture(scope="module")
def folders(tiny_bert_dir, tmp_path_factory) -> dict[str, str]:
    """Model folders (the tiny BERT, a copy, one with other weights, a tiny Llama) and GLUE data folders."""
    root = tmp_path_factory.mktemp("identity")
    shutil.copytree(tiny_bert_dir, root / "bert_copy")
    torch.manual_seed(1)
    BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert_dir)).save_pretrained(root / "bert_other")
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / "llama")
    shutil.copytree(SHARED_DATA / "glue" / "SST-2", root / "glue_copy" / "SST-2")
    changed = root / "glue_changed" / "SST-2"
    shutil.copytree(SHARED_DATA / "glue" / "SST-2", changed)
    lines = (changed / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    text, label = lines[1].rstrip("\n").split("\t")
    lines[1] = f"{text}\t{1 - int(label)}\n"  # same layout, one label flipped
    (changed / "train.tsv").write_text("".join(lines), encoding="utf-8")
    (root / "pattern.yaml").write_text("bert.encoder.layer.0.attention.self.query: 2\n")
    (root / "pattern_by_suffix.json").write_text('{"layer.0.attention.self.query": 2, "layer.1.attention.self.value": 8}')
    (root / "uniform.yaml").write_text("query: 8\nvalue: 8\n")
    own = "text,other,label,score\n" + "".join(f"example {i},pair {i},{'ab'[i % 2]},{i % 2}\n" for i in range(60))
    (root / "own.csv").write_text(own)
    (root / "own_copy.csv").write_text(own)
    (root / "own_changed.csv").write_text(own.replace("example 0,", "example zero,"))
    return {"bert": str(tiny_bert_dir), "bert_copy": str(root / "bert_copy"), "bert_other": str(root / "bert_other"),
            "llama": str(root / "llama"), "glue_copy": str(root / "glue_copy"), "glue_changed": str(root / "glue_changed"),
            "tmp": str(root), **{name: str(root / f"{name}.csv") for name in ("own", "own_copy", "own_changed")}}


@pytest.fixture(scope="module")
def planned(folders):
    """settings and plan for a list of overrides (on the tiny BERT unless the overrides name a model), memoised."""

    @functools.cache
    def plan_for(overrides: tuple[str, ...]) -> tuple[Settings, experiment.Plan]:
        resolved = [o.format(**folders) for o in overrides]
        if not any(o.startswith("model.name_or_path=") for o in resolved):
            resolved.insert(0, f"model.name_or_path={folders['bert']}")
        settings = compose(f"runs_dir={folders['tmp']}/runs", f"cache_dir={folders['tmp']}/cache", *resolved)
        return settings, experiment.plan(settings)

    return plan_for


@pytest.mark.slow  # ~150 cases, each composing its settings with Hydra (~0.25 s apiece)
@pytest.mark.parametrize("section,name,base,changed,expect", CASES)
def test_a_setting_changes_the_run_id_exactly_when_it_can_change_the_result(planned, section, name, base, changed, expect):
    (settings_a, plan_a), (settings_b, plan_b) = planned(base), planned(changed)
    assert settings_a != settings_b  # the override took effect
    if expect == DIFFERS:
        assert plan_a.run_id != plan_b.run_id, f"{section}.{name}: {changed} should change the run id"
        if name != "seed":
            assert identity.config_id(plan_a.identity) != identity.config_id(plan_b.identity)
    else:
        assert plan_a.run_id == plan_b.run_id, f"{section}.{name}: {changed} should not change the run id"
        assert plan_a.identity == plan_b.identity


def test_a_different_data_file_in_the_same_layout_changes_only_the_data_digest(planned):
    _, same = planned(())
    _, copy = planned(("task.data_dir={glue_copy}",))
    _, changed = planned(("task.data_dir={glue_changed}",))
    assert copy.run_id == same.run_id
    digests = same.identity["config"]["task"]["data"]["files"], changed.identity["config"]["task"]["data"]["files"]
    assert digests[0]["SST-2/dev.tsv"] == digests[1]["SST-2/dev.tsv"]
    assert digests[0]["SST-2/train.tsv"] != digests[1]["SST-2/train.tsv"]
    strip = lambda ident: {**ident["config"], "task": {k: v for k, v in ident["config"]["task"].items() if k != "data"}}
    assert strip(same.identity) == strip(changed.identity)  # nothing else differs
    assert changed.run_id != same.run_id and identity.context_id(changed.identity) != identity.context_id(same.identity)


def test_seeds_are_replicates_of_one_configuration(planned):
    _, seed0 = planned(())
    _, seed1 = planned(("train.seed=1",))
    assert seed0.run_id != seed1.run_id
    assert identity.config_id(seed0.identity) == identity.config_id(seed1.identity)
    assert identity.context_id(seed0.identity) == identity.context_id(seed1.identity)


def test_baseline_lr_re_pairs_a_lora_run_within_the_same_context(planned):
    _, lora = planned(())
    _, repaired = planned(("baseline.lr=5e-5",))
    assert lora.run_id != repaired.run_id
    assert identity.config_id(lora.identity) != identity.config_id(repaired.identity)
    assert identity.context_id(lora.identity) == identity.context_id(repaired.identity)
    assert repaired.identity["config"]["baseline"] == {"name": "full", "lr": 5e-5}


def test_a_lora_run_and_its_baseline_share_a_context_and_nothing_more(planned):
    settings, lora = planned(())
    baseline = experiment.plan(experiment.baseline_settings(settings))
    assert baseline.settings.method.name == "full"
    assert lora.identity["config"]["baseline"] == baseline.identity["config"]["method"] == {"name": "full", "lr": compose().baseline.lr}
    assert identity.context_id(lora.identity) == identity.context_id(baseline.identity)
    assert identity.config_id(lora.identity) != identity.config_id(baseline.identity)
    _, full = planned(FULL)  # the same full-FT run, reached as a run of its own
    assert full.run_id == baseline.run_id


def test_a_preset_and_the_same_modules_by_name_are_one_experiment(planned):
    _, preset = planned(())
    _, named = planned(("method.targets=[query,value]",))
    _, suffixes = planned(("method.targets=[attention.self.value,attention.self.query]",))
    assert preset.run_id == named.run_id == suffixes.run_id
    assert preset.identity["config"]["method"]["targets"] == sorted(
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value"))
    assert preset.identity["config"]["method"]["alpha"] == 16.0  # the effective alpha, whatever the policy


def test_a_budget_matched_run_records_the_rank_it_trains(planned):
    _, matched = planned(("method.match_budget=qkvo",))
    assert matched.method.r == 16 and matched.method.match_budget is None
    assert matched.identity["config"]["method"]["r"] == 16


def test_a_baseline_that_is_not_full_fine_tuning_is_refused(folders):
    with pytest.raises(UserError, match="baseline must be a full fine-tuning method, not 'lora'"):
        compose(f"model.name_or_path={folders['bert']}", "baseline.name=lora")


def test_the_ids_are_stable_hashes_of_the_identity(planned):
    _, plan = planned(())
    again = experiment.plan(compose(f"model.name_or_path={plan.model_path}", f"runs_dir={plan.settings.runs_dir}",
                                    f"cache_dir={plan.settings.cache_dir}"))
    assert again.run_id == plan.run_id == identity.run_id(plan.identity)
    assert len(plan.run_id) == 16 and int(plan.run_id, 16) >= 0
    assert plan.identity["seed"] == 0 and set(plan.identity["config"]) == {"model", "task", "method", "train", "device", "baseline"}
