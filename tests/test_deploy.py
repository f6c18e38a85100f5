"""Deployment through PEFT on tiny models built from a config: merging changes no output (linear, embedding and
convolution adapters), parameter counts follow the arithmetic, a swapped-in adapter behaves as if freshly loaded, a
mixed batch gives each row its own adapter; and `lora-deploy` on a tiny results folder writes its record and section."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import ResNetConfig, ResNetForImageClassification

from lora_sweep import reporting
from lora_sweep import adapters, deploy, experiment, records
from lora_sweep.settings import MethodSettings, compose
from tests.conftest import tiny_bert

VOCAB, H = 30522, 64  # tiny_bert's sizes
# Conv2d layers of the tiny ResNet below as (c_in, c_out, k): the stem, two 3x3 in stage 0, a 1x1 shortcut and two 3x3 in stage 1.
CONVS = [(3, 8, 7), (8, 8, 3), (8, 8, 3), (8, 16, 1), (8, 16, 3), (16, 16, 3)]


def lora(**kw) -> MethodSettings:
    method = MethodSettings(name="lora", lr=1e-3, init="false", **kw)  # init=false: B is random too, so merging matters
    method.validate()
    return method


def tiny_resnet() -> ResNetForImageClassification:
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                     layer_type="basic", num_labels=2)).eval()


def tokens(rows: int = 4) -> dict:
    torch.manual_seed(1)
    return {"input_ids": torch.randint(0, VOCAB, (rows, 12)), "attention_mask": torch.ones(rows, 12, dtype=torch.long)}


@torch.no_grad()
def logits(model, inputs, **kw):
    return model(**inputs, **kw).logits


@pytest.mark.parametrize("model,targets,task_type,inputs", [
    (tiny_bert, "qv", "SEQ_CLS", tokens),
    (tiny_bert, "embeddings", "SEQ_CLS", tokens),
    (tiny_resnet, ["convolution"], None, lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}),
], ids=["linear", "embedding", "conv"])
def test_merged_outputs_equal_unmerged_ones(one_thread, model, targets, task_type, inputs):
    wrapped, adapted = adapters.apply_method(model().eval(), lora(r=4, targets=targets), task_type)
    x = inputs()
    before = logits(wrapped.eval(), x)
    merged = wrapped.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert (logits(merged, x) - before).abs().max() < 1e-5
    assert before.abs().max() > 1e-3 and adapted


@pytest.mark.parametrize("r", [1, 4])
def test_embedding_and_conv_adapters_count_their_arithmetic(r):
    model = tiny_bert()
    total = sum(p.numel() for p in model.parameters())
    wrapped, adapted = adapters.apply_method(model, lora(r=r, targets="embeddings"), "SEQ_CLS")
    assert adapted == ["bert.embeddings.word_embeddings"]
    assert adapters.count_parameters(wrapped, total, "lora").adapter == (VOCAB + H) * r
    conv = tiny_resnet()
    wrapped, adapted = adapters.apply_method(conv, lora(r=r, targets=["convolution"]), None)
    assert len(adapted) == len(CONVS)
    assert adapters.count_parameters(wrapped, 0, "lora").adapter == sum((c_in * k * k + c_out) * r for c_in, c_out, k in CONVS)


@pytest.mark.parametrize("r", [1, 3])
def test_a_conv1d_adapter_has_the_parameters_its_width_says(r):
    """No supported model family has a Conv1d, so PEFT's own Conv1d LoRA is checked against adapters.width directly."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(6, 10, kernel_size=5), torch.nn.ReLU(), torch.nn.Conv1d(10, 4, kernel_size=3))
    widths = [adapters.width(m) for m in net if isinstance(m, torch.nn.Conv1d)]
    assert widths == [6 * 5 + 10, 10 * 3 + 4]
    wrapped = get_peft_model(net, LoraConfig(r=r, target_modules=["0", "2"], init_lora_weights=False))
    assert sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n) == sum(widths) * r
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        before = wrapped(x)
        assert (wrapped.merge_and_unload()(x) - before).abs().max() < 1e-5


def saved_adapters(tmp_path, count: int) -> list:
    """`count` adapters of tiny_bert (LoRA on query/value and a trained head), each with weights of its own."""
    paths = []
    for i in range(count):
        torch.manual_seed(10 + i)
        wrapped, _ = adapters.apply_method(tiny_bert(), lora(r=2 + 2 * i), "SEQ_CLS")
        with torch.no_grad():
            for p in wrapped.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
        wrapped.save_pretrained(tmp_path / f"adapter{i}")
        paths.append(tmp_path / f"adapter{i}")
    return paths


def test_a_swapped_in_adapter_gives_what_a_fresh_load_of_it_gives(tmp_path, one_thread):
    a, b = saved_adapters(tmp_path, 2)
    x = tokens()
    model = deploy.load_adapter(tiny_bert().eval(), a, "default", "bert")
    first = logits(model, x)
    deploy.load_adapter(model, b, "b", "bert")
    model.set_adapter("b")
    fresh = deploy.load_adapter(tiny_bert().eval(), b, "default", "bert")
    assert torch.equal(logits(model, x), logits(fresh, x))
    assert (logits(fresh, x) - first).abs().max() > 1e-3  # the two adapters differ, so the check can fail


def test_a_mixed_batch_gives_each_row_its_own_adapter(tmp_path, one_thread):
    paths = saved_adapters(tmp_path, 3)
    x = tokens(6)
    mixed = tiny_bert().eval()
    for i, path in enumerate(paths):
        mixed = deploy.load_adapter(mixed, path, f"a{i}", "bert")
    routing = [f"a{i % 3}" for i in range(6)]
    out = logits(mixed, x, adapter_names=routing)
    for i, path in enumerate(paths):
        alone = logits(deploy.load_adapter(tiny_bert().eval(), path, "default", "bert"), x)
        assert (out[i::3] - alone[i::3]).abs().max() < 1e-5
        assert (out[(i + 1) % 3::3] - alone[(i + 1) % 3::3]).abs().max() > 1e-3


@pytest.mark.slow
def test_lora_deploy_writes_a_record_and_the_report_its_section(tmp_path, tiny_bert_dir, capsys):
    results = tmp_path / "results"
    few = ["train.max_steps=2", "train.batch_size=8", "task.max_train_examples=32", "task.max_eval_examples=40",
           "task.tune_examples=20", "train.threads=1", "train.memory_probe=false", "method.r=2",
           f"model.name_or_path={tiny_bert_dir}", f"runs_dir={results / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]
    runs = [experiment.run(compose(*few, f"train.seed={seed}")) for seed in (0, 1)]
    reporting.write(results / "runs")
    assert "No deployment measurements: run `lora-deploy" in (results / "report.md").read_text()

    with pytest.raises(SystemExit) as done:
        deploy.main([str(results), "--repeats", "2", "--threads", "1", "--cache-dir", str(tmp_path / "cache")])
    assert done.value.code == 0
    record = records.read_record(results / "deploy", runs[0]["run_id"])
    assert record["chosen"].endswith("(r=2, seed 0)") and json.dumps(record).find(str(tmp_path)) == -1  # no absolute path
    merge = record["merge"]
    assert merge["examples"] == 40 and merge["max_abs_diff"] < 1e-5 and merge["before"] == merge["after"] == merge["recorded"]
    assert merge["max_abs_diff_vs_recorded"] < 1e-4 and merge["same_examples_as_recorded"]
    assert record["swap"]["adapter_run_id"] == runs[1]["run_id"] and record["swap"]["hotswap"].startswith("not applicable")
    assert record["adapter_bytes"] < record["checkpoint_bytes"]
    assert [m["n"] for m in record["many"]] == [1, 2] and record["many"][1]["max_abs_diff_mixed_vs_merged"] < 1e-5
    assert record["many"][1]["tensor_bytes"]["mixed batch"] < record["many"][1]["tensor_bytes"]["merged models"]
    for size in ("batch_1", "batch_32"):
        assert record["latency"][size]["merged/base"]["n"] == 2 and record["latency"][size]["seconds_per_batch"]["merged"]["median"] > 0
    reporting.write(results / "runs")
    text = (results / "report.md").read_text()
    assert "## Deployment" in text and runs[0]["run_id"] in text.split("## Deployment")[1] and (results / "plots" / "deployment.png").is_file()

    shutil.rmtree(results / "runs" / runs[1]["artifact"]["path"])  # as in a clean clone: no artifact
    with pytest.raises(SystemExit) as missing:
        deploy.main([str(results), "--run", runs[1]["run_id"], "--cache-dir", str(tmp_path / "cache")])
    assert missing.value.code == 1 and "its adapter is not on disk" in capsys.readouterr().err


@pytest.mark.slow
def test_the_embeddings_preset_trains_the_real_minilm(tmp_path):
    record = experiment.run(compose(
        "train.max_steps=2", "train.batch_size=8", "task.max_train_examples=32", "task.max_eval_examples=16",
        "task.tune_examples=16", "train.threads=1", "pair_baseline=false", "train.save_adapter=false",
        "train.memory_probe=false", "method.targets=embeddings", "method.r=4",
        f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"))
    assert record["status"] == "done" and record["adapted_modules"] == ["bert.embeddings.word_embeddings"]
    assert record["params"]["adapter"] == (30522 + 384) * 4


def test_hotswap_applies_to_adapters_of_one_shape_without_a_task_head(tmp_path, one_thread):
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    def saved(name, model, r):
        torch.manual_seed(r)
        wrapped, _ = adapters.apply_method(model, lora(r=r), "CAUSAL_LM" if name.startswith("llama") else "SEQ_CLS")
        wrapped.save_pretrained(tmp_path / name)
        return LoraConfig.from_pretrained(str(tmp_path / name))

    llama = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    a, b, c = (saved(name, LlamaForCausalLM(llama), r) for name, r in (("llama_a", 2), ("llama_b", 2), ("llama_c", 4)))
    assert deploy.hotswap_blocker(a, b) is None
    assert deploy.hotswap_blocker(a, c) == "the adapters differ in rank or adapted modules"
    bert = saved("bert", tiny_bert(), 2)
    assert "modules_to_save" in deploy.hotswap_blocker(bert, bert)
