"""Automatic rank allocation: EVA's initialisation, AdaLoRA's pruning schedule, and an autorank sweep whose allocators
are compared with uniform LoRA at one counted budget and whose choices re-train as plain LoRA."""

import re
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from lora_sweep import adapters, batching, experiment, memory
from lora_sweep.errors import UserError
from lora_sweep.settings import MethodSettings, compose
from tests.conftest import tiny_bert, tiny_bert_config
from tests.test_sweep import grid, load, sweep, values

WIDTH = 2 * tiny_bert_config().hidden_size  # d + k of every query and value matrix of the tiny BERT


def batches(count: int, size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 1000, (size, 16), generator=generator),
             "attention_mask": torch.ones(size, 16, dtype=torch.long),
             "labels": torch.randint(0, 2, (size,), generator=generator)} for _ in range(count)]


def a_matrices(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_A" in name}


def test_eva_replaces_the_default_a_by_orthonormal_components_and_its_ranks_sum_to_the_budget():
    r = 4
    method = MethodSettings(name="lora", lr=1e-3, r=r, init="eva", eva_rho=2.0)
    model, targets = adapters.apply_method(tiny_bert(), method, "SEQ_CLS")
    drawn = a_matrices(model)  # PEFT's default A, drawn before the pass
    adapters.initialize_eva(model, batches(6), lambda k, inputs: nullcontext())
    ranks = adapters.allocated_ranks(model, method, targets)
    assert set(ranks) == set(targets) and sum(ranks.values()) == r * len(targets) and max(ranks.values()) <= 2 * r
    for name, a in a_matrices(model).items():  # EVA's rows are principal components: orthonormal; the default's are not
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-4), name
        assert a.shape != drawn[name].shape or not torch.allclose(a, drawn[name])
    for a in drawn.values():
        assert not torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-2)
    counts = adapters.count_parameters(model, 0, "lora", ranks)
    assert counts.adapter == counts.kept == sum(ranks.values()) * WIDTH


@pytest.mark.parametrize("probing", [True, False])
def test_eva_pass_probes_its_first_svd_update_and_its_costliest_batch_only(monkeypatch, probing):
    """As training probes one step, EVA's pass probes two forwards, in the plan's order (the pass computes what it
    computes unprobed): its first SVD update and the first of its costliest batch; the peak holds at least the fp32
    weights."""
    method = MethodSettings(name="lora", lr=1e-3, r=4, init="eva", eva_examples=24)
    model, _ = adapters.apply_method(tiny_bert(), method, "SEQ_CLS")
    lengths = [4] * 8 + [16] * 8 + [8] * 8  # three batches of 8 in the plan's order: the second is the longest
    train_set = Dataset.from_dict({"input_ids": [[5] * n for n in lengths], "label": [0, 1] * 12})

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([r["label"] for r in rows])}

    probed, active, original = [], [], memory.probe

    @contextmanager
    def spy(*args, **kwargs):
        active.append(True)
        with original(*args, **kwargs) as peak:
            yield peak
        active.pop()

    monkeypatch.setattr(memory, "probe", spy)
    model.register_forward_pre_hook(lambda module, args, kwargs: probed.append(kwargs["input_ids"].shape[1]) if active else None,
                                    with_kwargs=True)
    plan = batching.Plan([[list(range(k, k + 8))] for k in (0, 8, 16)], probe_step=2)
    p = SimpleNamespace(method=method, settings=SimpleNamespace(train=SimpleNamespace(batch_size=8, memory_probe=probing)))
    out = experiment.eva_pass(p, model, train_set, plan, collate, "cpu")
    assert out["time"]["init_s"] > 0
    if probing:
        assert probed == [4, 16] and out["memory"]["init_peak_bytes"] >= 4 * sum(t.numel() for t in model.parameters())
    else:
        assert probed == [] and "memory" not in out


def test_adalora_keeps_its_initial_budget_through_tinit_and_reaches_the_target_at_tfinal():
    steps, r = 20, 2
    method = MethodSettings(name="adalora", lr=1e-2, r=r, tinit=0.1, tfinal=0.25)
    tinit, tfinal = method.adalora_schedule(steps)
    assert (tinit, tfinal, method.initial_r) == (2, 5, 3)
    model, targets = adapters.apply_method(tiny_bert(), method, "SEQ_CLS", steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=method.lr)
    update = adapters.adalora_step(model, method)
    kept = {}
    for step, batch in enumerate(batches(steps), start=1):
        model(**batch).loss.backward()
        optimizer.step()
        update(step)
        optimizer.zero_grad()
        kept[step] = adapters.allocated_ranks(model, method, targets)
    total = {step: sum(ranks.values()) for step, ranks in kept.items()}
    assert all(total[s] == method.initial_r * len(targets) for s in range(1, tinit + 1))
    assert total[tinit + 1] < method.initial_r * len(targets)
    assert all(total[s] == r * len(targets) for s in range(steps - tfinal, steps + 1))
    assert kept[steps] == kept[steps - tfinal]  # the final ranks are fixed once pruning ends
    counts = adapters.count_parameters(model, 0, "adalora", kept[steps])
    assert counts.adapter == method.initial_r * (WIDTH + 1) * len(targets)  # trained: the initial budget, singular values too
    assert counts.kept == r * len(targets) * WIDTH


@pytest.mark.parametrize("overrides,message", [
    (("method.tinit=0.5", "method.tfinal=0.5"), "method.tinit + method.tfinal = 1 leaves no steps to prune ranks in; their sum must be below 1"),
    (("method.tfinal=1.5",), "method.tinit=0.1 and method.tfinal=1.5 are fractions of the run's steps: each must be in [0, 1)"),
    (("method.init=eva",), "method=adalora does not combine with init=eva (AdaLoRA has its own initialisation); use method=lora for it"),
    (("method.use_dora=true",), "method=adalora does not combine with DoRA; use method=lora for it"),
])
def test_adalora_settings_that_cannot_work_are_refused_naming_the_value(overrides, message):
    """The command-line path of such errors (one line, exit 2, no run) is tests/test_bad_input.py's."""
    with pytest.raises(UserError, match=re.escape(message)):
        compose("method=adalora", *overrides)


def test_a_rank_pattern_with_rank_zero_leaves_that_module_unadapted(tmp_path):
    pattern = tmp_path / "pattern.yaml"
    pattern.write_text("bert.encoder.layer.0.attention.self.query: 0\nbert.encoder.layer.1.attention.self.value: 6\n")
    model, targets = adapters.apply_method(tiny_bert(), MethodSettings(name="lora", lr=1e-3, r=4, rank_pattern=str(pattern)), "SEQ_CLS")
    assert "bert.encoder.layer.0.attention.self.query" not in targets and len(targets) == 3
    assert adapters.count_parameters(model, 0, "lora").adapter == (4 + 6 + 4) * WIDTH


def test_the_autorank_preset_crosses_four_allocators_with_four_learning_rates_and_three_seeds():
    jobs = grid("+sweep=autorank")
    assert len(jobs) == 48 and values(jobs, "+allocator") == ["adalora", "advisor", "eva", "uniform"]
    assert values(jobs, "train.seed") == ["0", "1", "2"] and values(jobs, "method.lr") == ["0.002", "0.005", "0.01", "0.02"]


@pytest.mark.slow
def test_an_autorank_sweep_compares_allocators_at_one_counted_budget_and_its_patterns_retrain_it(tmp_path, tiny_bert_dir):
    result = sweep(tmp_path, tiny_bert_dir, "+sweep=autorank", "+allocator=uniform,eva,adalora", "train.seed=0,1", "method.lr=2e-3",
                   "train.max_steps=6", "method.r=4", "method.eva_examples=16")
    assert result.returncode == 0, result.stdout + result.stderr
    found = load(tmp_path / "runs")
    adapted = [r for r in found.values() if r["method"] != "full"]
    assert len(adapted) == 6 and all(r["status"] == "done" and found[r["baseline_run_id"]]["method"] == "full" for r in adapted)
    uniform = {r["params"]["adapter"] for r in adapted if r["allocated_ranks"] is None}
    assert len(uniform) == 1 and {r["params"]["kept"] for r in adapted} == uniform  # one budget, counted in every run
    for r in adapted:
        if r["allocated_ranks"] is not None:
            assert set(r["allocated_ranks"]) == set(r["adapted_modules"]) and sum(r["allocated_ranks"].values()) == 4 * len(r["adapted_modules"])
    assert all(r["time"]["init_s"] > 0 and r["memory"]["init_peak_bytes"] > 0 for r in adapted if r["config"]["method"]["init"] == "eva")
    report = (tmp_path / "report.md").read_text()
    assert "## Automatic rank allocation against the grid" in report and "Δ vs uniform r=4" in report
    assert (tmp_path / "plots" / "allocators_sst2_tiny_qv_r4.png").is_file()
    exported = sorted((tmp_path / "tables" / "allocated").glob("*.yaml"))
    assert len(exported) == 4  # eva and adalora, two seeds each
    for path in exported:
        run_id = re.search(r"ranks of run (\w+)", path.read_text()).group(1)
        model, _ = adapters.apply_method(tiny_bert(), MethodSettings(name="lora", lr=1e-3, r=4, rank_pattern=str(path)), "SEQ_CLS")
        assert adapters.count_parameters(model, 0, "lora").adapter == found[run_id]["params"]["kept"]
