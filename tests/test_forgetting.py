"""lora_sweep.forgetting: an untrained adapter forgets exactly nothing; a changed model does; the probe is cheap."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lora_sweep import adapters, forgetting
from lora_sweep.errors import UserError
from lora_sweep.settings import compose
from tests.conftest import tiny_bert


def _perturb(model) -> None:
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)


def test_encoder_forgetting_of_an_untrained_lora_is_zero_and_of_a_changed_one_is_not(one_thread, tiny_bert_dir):
    settings = compose(f"model.name_or_path={tiny_bert_dir}", "train.forgetting_examples=48")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    probe = forgetting.Probe(settings, {"weights": "tiny-bert-test"}, "cpu")
    start = time.perf_counter()
    probe.before(tiny_bert(), tokenizer)
    model, _ = adapters.apply_method(tiny_bert(), settings.method, "SEQ_CLS")
    untrained = probe.measure(model, tokenizer)
    assert time.perf_counter() - start < 3
    assert untrained["probe"] == "stsb_zero_shot_spearman" and untrained["examples"] == 48
    assert untrained["forgetting"] == 0.0 and untrained["before"] == untrained["after"]
    _perturb(model)
    assert probe.measure(model, tokenizer)["forgetting"] != 0.0


def test_decoder_forgetting_reads_the_users_text_file(one_thread, tiny_bert_dir, tmp_path):
    text = tmp_path / "general.txt"
    text.write_text("\n".join(f"Sentence number {i} talks about the weather and the sea." for i in range(40)) + "\n\n")
    settings = compose(f"model.name_or_path={tiny_bert_dir}", "task=instruct/alpaca", f"train.forgetting_file={text}",
                       "train.forgetting_examples=16", "method.targets=qv")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    probe = forgetting.Probe(settings, {"weights": "tiny-llama-test"}, "cpu")
    probe.before(LlamaForCausalLM(config), tokenizer)
    torch.manual_seed(0)
    model, _ = adapters.apply_method(LlamaForCausalLM(config), settings.method, "CAUSAL_LM")
    result = probe.measure(model, tokenizer)
    assert result["probe"] == "heldout_cross_entropy" and result["data"]["file"] == "general.txt"
    assert result["forgetting"] == 0.0 and result["before"] == pytest.approx(10.3, abs=1.0)  # ln(30522) for a random model
    _perturb(model)
    assert probe.measure(model, tokenizer)["forgetting"] != 0.0


def test_a_missing_forgetting_file_is_one_error_and_zero_examples_turn_the_probe_off(tiny_bert_dir):
    with pytest.raises(UserError, match="train.forgetting_file"):
        forgetting.Probe(compose("train.forgetting_file=/no/such/file.txt"), {}, "cpu")
    probe = forgetting.Probe(compose("train.forgetting_examples=0"), {}, "cpu")
    assert not probe.active and probe.measure(None, None)["probe"] is None
