"""LoRA through PEFT against the paper's arithmetic: (d+k)*r per adapted matrix, merge = no change in outputs."""

import re

import pytest
import torch
from peft import PeftModel

from lora_sweep import adapters
from lora_sweep.errors import UserError
from lora_sweep.settings import MethodSettings
from tests.conftest import tiny_bert

H, FF, LAYERS = 64, 128, 2  # tiny_bert's sizes
HEAD = (H * H + H) + (H * 2 + 2)  # pooler dense + classifier (2 labels)
PER_LAYER = {  # (d + k) of each matrix a preset adapts, per layer
    "qv": [H + H, H + H],
    "qkvo": [H + H] * 4,
    "mlp": [H + FF, FF + H],
    "all_linear": [H + H] * 4 + [H + FF, FF + H],
}


def lora(**kw) -> MethodSettings:
    method = MethodSettings(name="lora", lr=1e-3, **kw)
    method.validate()
    return method


@pytest.mark.parametrize("preset", sorted(PER_LAYER))
@pytest.mark.parametrize("r", [1, 4])
def test_trainable_parameters_follow_d_plus_k_times_r(preset, r):
    model = tiny_bert()
    total = sum(p.numel() for p in model.parameters())
    wrapped, adapted = adapters.apply_method(model, lora(r=r, targets=preset), "SEQ_CLS")
    counts = adapters.count_parameters(wrapped, total, "lora")
    expected_adapter = LAYERS * sum(PER_LAYER[preset]) * r
    assert len(adapted) == LAYERS * len(PER_LAYER[preset])
    assert counts.adapter == expected_adapter
    assert counts.head == HEAD
    assert counts.trainable == expected_adapter + HEAD
    assert counts.total == total


def test_dora_adds_one_magnitude_per_output_row():
    model = tiny_bert()
    total = sum(p.numel() for p in model.parameters())
    wrapped, _ = adapters.apply_method(model, lora(r=2, targets="qv", use_dora=True), "SEQ_CLS")
    counts = adapters.count_parameters(wrapped, total, "lora")
    assert counts.adapter == LAYERS * (2 * (H + H) * 2 + 2 * H)


def test_full_fine_tuning_trains_everything_and_counts_the_head():
    model = tiny_bert()
    total = sum(p.numel() for p in model.parameters())
    wrapped, adapted = adapters.apply_method(model, MethodSettings(name="full", lr=1e-5), "SEQ_CLS")
    counts = adapters.count_parameters(wrapped, total, "full")
    assert adapted == [] and counts.trainable == total and counts.adapter == 0 and counts.head == HEAD


def test_explicit_target_list_and_its_errors():
    _, adapted = adapters.apply_method(tiny_bert(), lora(targets=["query"]), "SEQ_CLS")
    assert adapted == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(LAYERS)]
    with pytest.raises(UserError, match=r"matches no adaptable module.*attention\.self\.query"):
        adapters.apply_method(tiny_bert(), lora(targets=["q_proj"]), "SEQ_CLS")


def test_rank_beyond_the_matrix_is_refused():
    with pytest.raises(UserError, match=r"method.r=65 is larger than .* r <= 64"):
        adapters.apply_method(tiny_bert(), lora(r=65, targets="qv"), "SEQ_CLS")


def test_merged_and_reloaded_adapters_reproduce_the_trained_outputs(tmp_path, one_thread):
    torch.manual_seed(0)
    base_inputs = {"input_ids": torch.randint(0, 30522, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    model, _ = adapters.apply_method(tiny_bert(), lora(r=4, targets="all_linear"), "SEQ_CLS")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**base_inputs, labels=torch.tensor([0, 1, 0, 1])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(**base_inputs).logits
        with model.disable_adapter():
            untouched = model(**base_inputs).logits
    assert (trained - untouched).abs().max() > 1e-3  # the adapter really changed something

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        assert (reloaded(**base_inputs).logits - trained).abs().max() < 1e-5
        assert (merged(**base_inputs).logits - trained).abs().max() < 1e-5


def test_a_rank_pattern_trains_each_module_at_its_rank_with_the_uniform_scale(tmp_path):
    from lora_sweep.diagnostics import lora_deltas

    pattern = tmp_path / "pattern.yaml"
    pattern.write_text("bert.encoder.layer.0.attention.self.query: 2\nlayer.1.attention.self.value: 6\n")
    method = MethodSettings(name="lora", lr=1e-3, r=4, alpha=8, rank_pattern=str(pattern))
    model, targets = adapters.apply_method(tiny_bert(), method, "SEQ_CLS")
    ranks = {name: model.base_model.model.get_submodule(name).r["default"] for name in targets}
    assert ranks == {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.0.attention.self.value": 4,
                     "bert.encoder.layer.1.attention.self.query": 4, "bert.encoder.layer.1.attention.self.value": 6}
    scales = {model.base_model.model.get_submodule(name).scaling["default"] for name in targets}
    assert scales == {8 / 4}  # alpha / r of the uniform run, for every module
    assert adapters.count_parameters(model, 0, "lora").adapter == (2 + 4 + 4 + 6) * (64 + 64)
    assert len(lora_deltas(model)) == 4


@pytest.mark.parametrize("content,message", [("nothing.here: 2\n", "not an adapted module"), ("query: -1\n", "integer in 0..64"),
                                              ("- a\n- b\n", "must hold a mapping"), ("query: [\n", "not YAML or JSON")])
def test_a_bad_rank_pattern_is_one_error_naming_the_problem(tmp_path, content, message):
    pattern = tmp_path / "pattern.yaml"
    pattern.write_text(content)
    with pytest.raises(UserError, match=re.escape(message)):
        adapters.apply_method(tiny_bert(), MethodSettings(name="lora", lr=1e-3, r=4, rank_pattern=str(pattern)), "SEQ_CLS")
    with pytest.raises(UserError, match="neither a preset"):
        adapters.apply_method(tiny_bert(), MethodSettings(name="lora", lr=1e-3, r=4, rank_pattern="no_such_preset"), "SEQ_CLS")


def test_one_resolution_of_what_a_lora_run_trains_is_idempotent_and_matches_the_trained_model():
    """resolve_lora folds match_budget into r, or a rank pattern into per-module ranks; resolving its answer again
    changes nothing, and the model apply_method builds has exactly those ranks and (d+k)·r parameters per module."""
    model = tiny_bert()
    budget = adapters.resolve_lora(model, lora(r=2, targets="qkvo", match_budget="qv"))
    assert budget.method.r == 1 and budget.method.match_budget is None  # qkvo has twice qv's width: r 2 -> 1
    assert budget.method.rank_pattern is None and set(budget.ranks.values()) == {1}
    assert adapters.resolve_lora(model, budget.method) == budget
    plan = adapters.resolve_lora(model, lora(r=2, targets="qkvo", rank_pattern={"layer.0.attention.self.query": 3}))
    assert len(plan.targets) == LAYERS * 4 and sorted(set(plan.ranks.values())) == [2, 3]
    assert adapters.resolve_lora(model, plan.method) == plan
    wrapped, _ = adapters.apply_method(tiny_bert(), plan.method, "SEQ_CLS")
    counts = adapters.count_parameters(wrapped, 0, "lora")
    assert counts.adapter == sum((H + H) * rank for rank in plan.ranks.values())
    assert plan.alphas()["bert.encoder.layer.0.attention.self.query"] == 1.5 * plan.method.effective_alpha


def test_every_task_family_implements_the_contract():
    from lora_sweep import glue, instruct, text
    from lora_sweep.task_family import FAMILIES, TaskFamily

    assert FAMILIES == {"glue": glue, "instruct": instruct, "text": text}
    assert all(isinstance(family, TaskFamily) for family in FAMILIES.values())
    assert not isinstance(adapters, TaskFamily)  # a module lacking the contract's names does not pass
