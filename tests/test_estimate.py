"""lora_sweep.estimate against bytes-per-parameter arithmetic and the memory probe; lora-estimate's no-weights and fit checks."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora_sweep import adapters, estimate, estimate_cli, memory
from lora_sweep.task_family import family_for
from lora_sweep.settings import compose
from lora_sweep.train import optimizer_for
from tests.conftest import tiny_bert

TINY_LLAMA = dict(vocab_size=2000, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
ON_CPU = ("estimate.device=cpu", "estimate.precision=fp32")


@pytest.fixture(scope="module")
def llama_config_only(tmp_path_factory):
    """A model folder holding a config.json and no weights."""
    folder = tmp_path_factory.mktemp("config-only")
    LlamaConfig(**TINY_LLAMA).save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    tiny_bert().save_pretrained(folder)
    return folder


def _settings(*overrides):
    return compose(*overrides, "cache_dir=/nonexistent/never-written")


@pytest.mark.parametrize("precision,weight_bytes", [("fp32", 4), ("bf16", 2)])
def test_weights_gradients_and_optimizer_are_bytes_per_parameter(llama_config_only, precision, weight_bytes):
    s = _settings(f"model.name_or_path={llama_config_only}", "task=instruct/alpaca", "estimate.device=cpu", f"estimate.precision={precision}")
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(torch.float32 if precision == "fp32" else torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    full = estimate.estimate(s, s.baseline)
    assert full.params == full.trainable == n
    assert full.weights == weight_bytes * n + buffers
    assert full.all_gradients == weight_bytes * n
    assert full.optimizer == 2 * weight_bytes * n  # AdamW's two moments in the parameter's dtype
    lora = estimate.estimate(s, s.method)
    adapter = 3 * 8 * ((64 + 64) + (64 + 32))  # 3 layers x r=8 x (in + out) of q (64 -> 64) and v (64 -> 32)
    assert lora.trainable == adapter
    assert lora.all_gradients == 4 * adapter and lora.optimizer == 8 * adapter  # PEFT keeps adapters in fp32
    assert lora.weights == weight_bytes * n + 4 * adapter + buffers


def test_the_estimate_reads_no_weight_file(llama_config_only, monkeypatch):
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("a weight file was read")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    s = _settings(f"model.name_or_path={llama_config_only}", "task=instruct/alpaca")
    lora, full = estimate.both(s)
    assert lora.peak > 0 and full.peak > lora.peak
    shipped = _settings("model=llama3_1_8b", "task=instruct/alpaca", "estimate.precision=bf16")
    assert estimate.estimate(shipped, shipped.baseline).params == 8_030_261_248  # Llama-3.1-8B, from conf/architectures


def _measured(s, batch: int, seq: int):
    family = family_for(s)
    torch.manual_seed(0)
    model = family.load_model(str(s.model.name_or_path), s).to(estimate.PRECISIONS[s.estimate.precision].weight_dtype)
    if s.estimate.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model, _ = adapters.apply_method(model, s.method, family.TASK_TYPE)
    model.train()
    optimizer = optimizer_for(model, s.method, s.train)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    labels = ids if s.task.family == "instruct" else torch.zeros(batch, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with memory.probe(model, optimizer, torch.device("cpu")) as probe:
        step()
    return probe


@pytest.mark.parametrize("case", ["bert full", "llama lora qv", "llama lora qv bf16", "llama full checkpointing"])
def test_activations_agree_with_the_memory_probe(case, bert_dir, tmp_path, one_thread):
    batch, seq = 32, 128
    if case.startswith("bert"):
        base = (f"model.name_or_path={bert_dir}", "method=full", *ON_CPU)
    else:
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(tmp_path)
        base = (f"model.name_or_path={tmp_path}", "task=instruct/alpaca", "method=full" if "full" in case else "method.targets=qv", *ON_CPU)
    if case.endswith("bf16"):
        base = (*base, "estimate.precision=bf16")
    if case.endswith("checkpointing"):
        base = (*base, "estimate.gradient_checkpointing=true")
    s = _settings(*base, f"estimate.batch_size={batch}", f"estimate.seq_len={seq}")
    predicted = estimate.estimate(s, s.method)
    measured = _measured(s, batch, seq)
    assert predicted.peak_at == "backward"
    assert predicted.activations == pytest.approx(measured.split["activations"], rel=0.05)
    assert predicted.peak == pytest.approx(measured.peak_bytes, rel=0.05)


def test_a_configuration_that_cannot_fit_says_so(llama_config_only, capsys):
    args = [f"model.name_or_path={llama_config_only}", "task=instruct/alpaca", "estimate.device_memory=1MiB"]
    with pytest.raises(SystemExit) as exit_:
        estimate_cli.main(args)
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    lora = next(line for line in out.splitlines() if "LoRA r=8 qv" in line)
    assert re.search(r"does not fit: needs [0-9.]+ MiB of 1\.0 MiB$", lora)
    estimate_cli.main([*args[:2], "estimate.device_memory=80GiB"])  # fits: returns, exit status 0
    assert "fits (0 % of 80.00 GiB)" in capsys.readouterr().out


def test_a_bad_device_memory_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        estimate_cli.main(["estimate.device_memory=eighty"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: estimate.device_memory='eighty' is not a memory size; write a number and "
                                               "one of TiB, GiB, MiB, TB, GB, MB (e.g. 80GiB)")


def test_a_sweep_over_ranks_prints_one_table_per_rank(llama_config_only, capsys):
    estimate_cli.main(["-m", f"model.name_or_path={llama_config_only}", "task=instruct/alpaca", "method.r=2,16"])
    out = capsys.readouterr().out
    assert out.count("LoRA r=2 qv") == 1 and out.count("LoRA r=16 qv") == 1 and out.count("full FT") == 2


def test_shipped_architectures_match_their_published_sizes():
    sizes = {"llama3_2_1b": 1_235_814_400, "llama3_2_3b": 3_212_749_824, "llama3_1_70b": 70_553_706_496,
             "qwen2_5_0_5b": 494_032_768, "qwen2_5_7b": 7_615_616_512}
    for name, size in sizes.items():
        s = _settings(f"model={name}", "task=instruct/alpaca", "estimate.precision=bf16")
        model = estimate.build(s, s.baseline, estimate.PRECISIONS["bf16"])
        assert sum(p.numel() for p in model.parameters()) == size, name
    assert json.loads(open(estimate.architecture_source(s)).read())["num_key_value_heads"] == 4  # Qwen2.5-7B


def test_gradient_checkpointing_adds_one_forward_of_the_layers_and_not_of_the_lm_head(llama_config_only):
    base = ("task=instruct/alpaca", *ON_CPU, f"model.name_or_path={llama_config_only}", "train.batch_size=2", "train.max_seq_len=16")
    plain, checkpointed = (estimate.estimate(s, s.baseline) for s in (
        _settings(*base), _settings(*base, "estimate.gradient_checkpointing=true")))
    c = TINY_LLAMA
    h, kv, i = c["hidden_size"], c["hidden_size"] * c["num_key_value_heads"] // c["num_attention_heads"], c["intermediate_size"]
    layer_weights = h * h + 2 * h * kv + h * h + 3 * h * i  # q, k, v, o, gate, up, down
    tokens, seq = 2 * 16, 16
    recompute = tokens * c["num_hidden_layers"] * (2 * layer_weights + 2 * 2 * h * seq)  # linears + QK^T and AV
    assert checkpointed.flops - plain.flops == recompute  # lm_head (2000 x 64 per token) is not recomputed
