"""The measured memory split against bytes per parameter: fp32 weights 4 B, AdamW state 8 B per trained parameter."""

import pytest
import torch

from lora_sweep import adapters, memory
from lora_sweep.settings import MethodSettings
from tests.conftest import tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def measure(method: MethodSettings):
    model, _ = adapters.apply_method(tiny_bert(), method, "SEQ_CLS")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    torch.manual_seed(1)
    batch = {"input_ids": torch.randint(0, 30522, (16, 64)), "attention_mask": torch.ones(16, 64, dtype=torch.long),
             "labels": torch.randint(0, 2, (16,))}

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer state exists from the first step on: probe the second, as the trainer does
    with memory.probe(model, optimizer, torch.device("cpu")) as probe:
        step()
    return probe, sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable)


@pytest.mark.parametrize("method", [MethodSettings(name="full", lr=1e-5), MethodSettings(name="lora", lr=1e-3, r=8, targets="qkvo")],
                         ids=["full", "lora"])
def test_split_matches_bytes_per_parameter(method):
    probe, n_params, n_trainable = measure(method)
    buffers = 128 * 8 + 128 * 8  # position_ids and token_type_ids (int64) of tiny_bert
    assert probe.split["weights"] == 4 * n_params + buffers
    assert probe.split["optimizer"] == pytest.approx(8 * n_trainable, rel=0.02)
    assert probe.split["activations"] > 0
    assert probe.peak_bytes == sum(probe.split.values())


def test_full_fine_tuning_peaks_above_lora_on_the_same_batch():
    full, _, _ = measure(MethodSettings(name="full", lr=1e-5))
    lora, _, _ = measure(MethodSettings(name="lora", lr=1e-3, r=8, targets="qv"))
    assert full.peak_bytes > lora.peak_bytes
    assert full.split["optimizer"] > 10 * lora.split["optimizer"]
