"""lora_sweep.train: exact optimizer steps with gradient accumulation, the schedule, weight-decay groups, clipping,
the divergence guard and the end-of-budget loss trend."""

from __future__ import annotations


import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from lora_sweep import adapters, batching, distributed, glue, train
from lora_sweep.settings import MethodSettings, TrainSettings
from tests.conftest import SHARED_DATA, tiny_bert, tiny_bert_config

FULL = MethodSettings(name="full", lr=1e-3)
OPTIMIZER_FOR = train.optimizer_for


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir):
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


def sst2(tokenizer, n: int) -> datasets.Dataset:
    rows = glue.read_tsv(glue.TASKS["sst2"], SHARED_DATA / "glue" / "SST-2" / "train.tsv").select(range(n))
    return rows.map(lambda b: tokenizer(b["text_a"], truncation=True, max_length=64), batched=True, remove_columns=["text_a"])


class Recorder:
    """Wraps train.optimizer_for: keeps the optimizer and, at each optimizer.step, its learning rate and the global
    gradient norm it is about to apply."""

    def __init__(self, monkeypatch):
        self.optimizer, self.lrs, self.grad_norms, self.grads = None, [], [], []

        def optimizer_for(model, method, settings):
            optimizer = OPTIMIZER_FOR(model, method, settings)

            def before_step(opt, args, kwargs):
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
                self.lrs.append(opt.param_groups[0]["lr"])
                self.grads.append(torch.cat([g.flatten() for g in grads]).clone())

            optimizer.register_step_pre_hook(before_step)
            self.optimizer = optimizer
            return optimizer

        monkeypatch.setattr(train, "optimizer_for", optimizer_for)


def run(tokenizer, monkeypatch, examples=10, method=FULL, dropout=0.1, **settings):
    data = sst2(tokenizer, examples)
    lengths = [len(ids) for ids in data["input_ids"]]
    cfg = TrainSettings(memory_probe=False, log_every=1, **settings)
    steps = cfg.total_steps(len(data))
    plan = batching.train_plan(lengths, cfg.batch_size, steps, cfg.grad_accum, cfg.seed, cfg.batching, cfg.micro_batch_floor)
    torch.manual_seed(0)
    config = tiny_bert_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    model = BertForSequenceClassification(config)
    model, _ = adapters.apply_method(model, method, "SEQ_CLS")
    forwards = []
    model.register_forward_hook(lambda module, args, out: forwards.append(1))
    recorder = Recorder(monkeypatch)
    result = train.fit(distributed.make_accelerator("cpu", "none"), model, data, glue.collator(tokenizer), plan, method, cfg)
    return result, recorder, plan, len(forwards)


def test_grad_accum_across_an_epoch_wrap_makes_exactly_max_steps_updates_on_schedule(tokenizer, monkeypatch):
    # 10 examples in micro-batches of 4 (4, 4, 2 per epoch); 4 steps x 3 micro-batches = 12 micro-batches: 4 epochs
    result, recorder, plan, forwards = run(tokenizer, monkeypatch, batch_size=4, grad_accum=3, max_steps=4, warmup_ratio=0.5,
                                           batching="random")
    assert len(plan.batches) == 12 and forwards == 12
    assert result.samples == 4 * 10 and result.steps == 4 and len(result.step_losses) == 4
    assert len(recorder.lrs) == 4  # optimizer.step called once per 3 micro-batches, never at an epoch's end
    states = list(recorder.optimizer.state.values())
    assert len(states) == len([p for g in recorder.optimizer.param_groups for p in g["params"]])
    assert all(int(state["step"]) == 4 for state in states)  # every parameter updated 4 times
    # linear warmup over round(0.5 x 4) = 2 steps, then linear decay to 0 at step 4, stepped once per update
    assert recorder.lrs == pytest.approx([0.0, 0.5e-3, 1e-3, 0.5e-3])
    assert recorder.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert [step for step, _ in result.loss_curve] == [1, 2, 3, 4]


def test_an_accumulated_step_applies_the_mean_gradient_of_its_micro_batches(tokenizer, monkeypatch):
    # one step over the same 16 examples: two micro-batches of 8 accumulated, or one batch of 16 (no dropout, no clipping)
    _, accumulated, plan, forwards = run(tokenizer, monkeypatch, examples=16, dropout=0.0, batch_size=8, grad_accum=2, max_steps=1,
                                         max_grad_norm=0.0, batching="random")
    _, whole, _, _ = run(tokenizer, monkeypatch, examples=16, dropout=0.0, batch_size=16, grad_accum=1, max_steps=1, max_grad_norm=0.0,
                         batching="random")
    assert forwards == 2 and sorted(i for b in plan.batches for i in b) == list(range(16))
    torch.testing.assert_close(accumulated.grads[0], whole.grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_sorted_micro_batches_give_the_random_batch_gradient_for_a_classifier(tokenizer, monkeypatch, grad_accum):
    """Dropout off: the step's 32 real SST-2 examples, cut by length into micro-batches of at least 4, give the gradient
    of the same 32 examples as one random batch (or two accumulated ones), and the same step loss."""
    kwargs = dict(examples=64, dropout=0.0, batch_size=32 // grad_accum, grad_accum=grad_accum, max_steps=2, max_grad_norm=0.0)
    result_random, random_, plan_random, _ = run(tokenizer, monkeypatch, batching="random", **kwargs)
    result_sorted, sorted_, plan_sorted, forwards = run(tokenizer, monkeypatch, batching="sorted", min_micro_batch=4, **kwargs)
    for step_random, step_sorted in zip(plan_random.steps, plan_sorted.steps):
        assert sorted(i for b in step_random for i in b) == sorted(i for b in step_sorted for i in b)  # the same examples
    assert forwards == len(plan_sorted.batches) > 2 * grad_accum  # really cut into more micro-batches
    for g_random, g_sorted in zip(random_.grads, sorted_.grads):
        assert torch.linalg.vector_norm(g_random) > 1e-3
        torch.testing.assert_close(g_sorted, g_random, rtol=1e-4, atol=1e-6)
    assert result_sorted.step_losses == pytest.approx(result_random.step_losses, rel=1e-5)
    assert result_sorted.computed_tokens < 0.8 * result_random.computed_tokens  # and less padding computed


def test_sorted_micro_batches_give_the_random_batch_gradient_for_a_causal_lm(monkeypatch):
    """A causal LM's loss is a mean over response tokens: with uneven response lengths, micro-batches weighted by their
    share of the step's response tokens give the whole batch's gradient (weighting by examples would not)."""
    rng = np.random.default_rng(0)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(24):
        prompt, response = int(rng.integers(2, 20)), int(rng.integers(1, 30))
        ids = rng.integers(3, 100, size=prompt + response).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([-100] * prompt + ids[prompt:])
    data = datasets.Dataset.from_dict(rows)
    lengths = [len(ids) for ids in rows["input_ids"]]

    def step_gradient(batching_mode: str) -> tuple[torch.Tensor, float, int]:
        cfg = TrainSettings(batch_size=24, max_steps=1, memory_probe=False, max_grad_norm=0.0, batching=batching_mode, min_micro_batch=3)
        plan = batching.train_plan(lengths, 24, 1, 1, 0, batching_mode, 3)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0))
        recorder = Recorder(monkeypatch)
        pad = lambda features: {k: torch.tensor([f[k] + [0 if k != "labels" else -100] * (max(map(len, (g["input_ids"] for g in features))) - len(f[k]))
                                                 for f in features]) for k in ("input_ids", "attention_mask", "labels")}
        result = train.fit(distributed.make_accelerator("cpu", "none"), model, data, pad, plan, FULL, cfg)
        return recorder.grads[0], result.step_losses[0], len(plan.batches)

    whole, whole_loss, one = step_gradient("random")
    cut, cut_loss, micro_batches = step_gradient("sorted")
    assert one == 1 and micro_batches >= 3
    torch.testing.assert_close(cut, whole, rtol=1e-4, atol=1e-6)
    assert cut_loss == pytest.approx(whole_loss, rel=1e-5)


def test_the_learning_curve_checkpoints_do_not_change_training(tokenizer, monkeypatch):
    """Evaluating at checkpoints (eval mode, no gradients) leaves the run's losses and updates exactly as without them."""
    plain, recorder_plain, _, _ = run(tokenizer, monkeypatch, examples=40, batch_size=8, max_steps=4)
    calls = []
    original = train.fit

    def fit_with_checkpoints(*args, **kwargs):
        def evaluate(step):
            calls.append(step)
            model = args[1]
            model.eval()
            with torch.no_grad():
                model(**batching.load_batch(args[2], [0, 1], args[3], "cpu"))
        return original(*args, checkpoints=[1, 3], on_checkpoint=evaluate, **kwargs)

    monkeypatch.setattr(train, "fit", fit_with_checkpoints)
    curved, recorder_curved, _, _ = run(tokenizer, monkeypatch, examples=40, batch_size=8, max_steps=4)
    assert calls == [1, 3]
    assert curved.step_losses == plain.step_losses  # dropout 0.1 is on: the same masks were drawn
    for a, b in zip(recorder_plain.grads, recorder_curved.grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_epochs_decide_the_steps_when_max_steps_is_off(tokenizer, monkeypatch):
    # 2 epochs of ceil(10 / 4) = 3 micro-batches, 2 per step: ceil(6 / 2) = 3 steps
    assert TrainSettings(batch_size=4, grad_accum=2, max_steps=-1, epochs=2).total_steps(10) == 3
    result, recorder, plan, forwards = run(tokenizer, monkeypatch, batch_size=4, grad_accum=2, max_steps=-1, epochs=2, batching="random")
    assert result.steps == 3 and len(recorder.lrs) == 3 and forwards == 6


def _groups(model, weight_decay=0.05):
    optimizer = train.optimizer_for(model, FULL, TrainSettings(weight_decay=weight_decay))
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}


def test_bert_decays_weight_matrices_only():
    model = tiny_bert()
    groups = _groups(model)
    params = dict(model.named_parameters())
    assert set(groups) == {0.05, 0.0}
    assert groups[0.05] == {n for n, p in params.items() if p.ndim == 2}  # linear weights and embeddings
    assert groups[0.0] == {n for n, p in params.items() if p.ndim == 1}
    assert {n for n in groups[0.0] if "LayerNorm" in n} == {n for n in params if "LayerNorm" in n} != set()
    assert "classifier.bias" in groups[0.0] and "classifier.weight" in groups[0.05]


def test_lora_decays_its_matrices_and_the_head_weights_only():
    model, _ = adapters.apply_method(tiny_bert(), MethodSettings(name="lora", lr=1e-3, r=4, targets="qv"), "SEQ_CLS")
    groups = _groups(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert groups[0.05] | groups[0.0] == trainable and not groups[0.05] & groups[0.0]  # frozen weights in no group
    assert {n for n in groups[0.05] if "lora_" in n} == {n for n in trainable if "lora_" in n} != set()
    assert all(n.endswith("bias") for n in groups[0.0])


def test_llama_rmsnorm_weights_are_not_decayed():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    groups = _groups(model)
    norms = {n for n, _ in model.named_parameters() if "norm" in n}
    assert norms == {f"model.layers.{i}.{k}.weight" for i in range(2) for k in ("input_layernorm", "post_attention_layernorm")} | {"model.norm.weight"}
    assert groups[0.0] == norms  # Llama has no biases: only the RMSNorm weights are spared
    assert groups[0.05] == {n for n, p in model.named_parameters() if p.ndim == 2}


def test_lora_on_llama_has_only_the_decayed_group():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model, _ = adapters.apply_method(model, MethodSettings(name="lora", lr=1e-3, r=2, targets="qv"), "CAUSAL_LM")
    optimizer = train.optimizer_for(model, FULL, TrainSettings(weight_decay=0.05))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05]  # no empty no-decay group
    assert len(optimizer.param_groups[0]["params"]) == 2 * 2 * 2  # A and B of q and v in 2 layers


def test_every_trainable_parameter_is_in_exactly_one_group():
    model = tiny_bert()
    optimizer = train.optimizer_for(model, FULL, TrainSettings(weight_decay=0.0))
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)


def test_clipping_bounds_the_global_gradient_norm(tokenizer, monkeypatch):
    _, clipped, _, _ = run(tokenizer, monkeypatch, examples=16, batch_size=8, max_steps=4, max_grad_norm=0.05, warmup_ratio=0.0)
    _, free, _, _ = run(tokenizer, monkeypatch, examples=16, batch_size=8, max_steps=4, max_grad_norm=0.0, warmup_ratio=0.0)
    assert min(free.grad_norms) > 0.2  # without clipping the gradients are larger than the bound...
    assert clipped.grad_norms == pytest.approx([0.05] * 4, rel=1e-3)  # ...and with it they are scaled down to it


def test_clipping_leaves_small_gradients_alone(tokenizer, monkeypatch):
    _, big_bound, _, _ = run(tokenizer, monkeypatch, examples=16, batch_size=8, max_steps=2, max_grad_norm=1e6)
    _, free, _, _ = run(tokenizer, monkeypatch, examples=16, batch_size=8, max_steps=2, max_grad_norm=0.0)
    assert big_bound.grad_norms == pytest.approx(free.grad_norms, rel=1e-5)


def test_a_huge_learning_rate_is_stopped_by_the_guard(tokenizer, monkeypatch):
    result, recorder, _, _ = run(tokenizer, monkeypatch, examples=64, method=MethodSettings(name="full", lr=1e4),
                                 batch_size=8, max_steps=30, warmup_ratio=0.0)
    assert result.divergence is not None and result.diverged_at is not None
    assert result.diverged_at < 30 and len(recorder.lrs) == result.diverged_at  # stopped right after the runaway step
    assert result.steps == result.diverged_at - 1 and len(result.step_losses) == result.diverged_at
    assert result.divergence == train.divergence(result.step_losses, 4.0)
    assert f"step {result.diverged_at}" in result.divergence


def test_divergence_on_crafted_loss_curves():
    assert train.divergence([0.7, 0.6, 0.5], 4.0) is None
    assert train.divergence([0.7, 0.6, float("nan")], 4.0) == "loss became NaN or infinite at step 3"
    assert train.divergence([0.7, float("inf")], 4.0) == "loss became NaN or infinite at step 2"
    runaway = [0.7] * 5 + [3.0] * 10
    assert train.divergence(runaway, 4.0) == ("training loss ran away at step 15: mean of the last 10 steps 3 > 4 x the "
                                              "first step's 0.7")
    assert train.divergence(runaway, 5.0) is None  # 3.0 is within 5 x 0.7
    assert train.divergence([0.7] * 20 + [20.0], 4.0) is None  # one spike among ten steps is not a runaway: (9 x 0.7 + 20) / 10 < 2.8
    early = [0.7, 5.0]  # within the first ten steps the mean so far counts
    assert train.divergence(early, 4.0) == "training loss ran away at step 2: mean of the last 2 steps 2.85 > 4 x the first step's 0.7"


def test_a_normal_loss_curve_is_not_divergence():
    rng = np.random.default_rng(0)
    curve = list(0.7 * np.exp(-np.arange(300) / 80) + 0.25 + rng.normal(0, 0.08, 300))
    assert all(train.divergence(curve[:k], 4.0) is None for k in range(1, 301))


def test_loss_trend_tells_a_falling_curve_from_a_flat_noisy_one():
    rng = np.random.default_rng(0)
    steps = np.arange(400)
    falling = list(0.7 - 0.001 * steps + rng.normal(0, 0.02, 400))
    trend = train.loss_trend(falling)
    assert trend["still_improving"] is True and trend["tail_steps"] == 100
    assert trend["slope_per_100_steps"] == pytest.approx(-0.1, abs=0.03) and trend["slope_se"] < 0.03
    assert trend["initial_loss"] == falling[0] and trend["final_loss"] == pytest.approx(np.mean(falling[-10:]))
    flat = list(0.3 + rng.normal(0, 0.05, 400))
    trend = train.loss_trend(flat)
    assert trend["still_improving"] is False and abs(trend["slope_per_100_steps"]) < 2 * trend["slope_se"] + 0.02
    exact = train.loss_trend(list(1 - 0.002 * np.arange(40)))  # no noise: the slope is exact
    assert exact["slope_per_100_steps"] == pytest.approx(-0.2) and exact["still_improving"] is True
    rising = train.loss_trend(list(0.5 + 0.001 * steps))
    assert rising["still_improving"] is False
    assert train.loss_trend([0.7, 0.6])["still_improving"] is None  # too short to tell
    assert train.loss_trend([])["initial_loss"] is None
