"""Your own instruction data (task=instruct/files): prompt and response columns, or chat rows, in the files people have.

The files are the Alpaca examples of ../shared/data/instruct written in other layouts: JSON lines with renamed columns
and an input column, Parquet with the default column names, and chat rows (system, user, assistant turns; some rows
have an earlier exchange before the answer)."""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lora_sweep import experiment, instruct
from lora_sweep.errors import UserError
from lora_sweep.settings import compose
from tests.conftest import SHARED_DATA

ROWS = 300  # the first rows of the Alpaca file: enough for three splits, quick to read
SOURCE = json.loads((SHARED_DATA / "instruct" / "alpaca_5000.json").read_text())[:ROWS]
SYSTEM = "You are a careful assistant."
EARLIER = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hello! What can I do for you?"}]
SPLIT = ("task.heldout_examples=20", "task.tune_examples=20")
COLUMNS = {  # overrides naming each layout's columns
    "qa": ("task.prompt_column=question", "task.input_column=context", "task.response_column=answer"),
    "parquet": ("task.input_column=input",),  # task.prompt_column=prompt and task.response_column=response: the preset's
    "chat": ("task.messages_column=messages", "task.template=chat"),
}


def user_turn(row: dict) -> str:
    return row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")


def chat(i: int, row: dict) -> list[dict]:
    """The conversation of source row i: every third one has an earlier exchange before the question."""
    earlier = EARLIER if i % 3 == 1 else []
    return [{"role": "system", "content": SYSTEM}, *earlier, {"role": "user", "content": user_turn(row)},
            {"role": "assistant", "content": row["output"]}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def own_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("own-instruct")
    files = {
        "qa": write_jsonl(folder / "qa.jsonl", [{"question": r["instruction"], "context": r["input"] or None, "answer": r["output"]}
                                                for r in SOURCE]),
        "parquet": folder / "alpaca.parquet",
        "chat": write_jsonl(folder / "chat.jsonl", [{"messages": chat(i, r)} for i, r in enumerate(SOURCE)]),
    }
    pd.DataFrame({"prompt": [r["instruction"] for r in SOURCE], "input": [r["input"] for r in SOURCE],
                  "response": [r["output"] for r in SOURCE]}).to_parquet(files["parquet"])
    return files


def own_task(layout: str, path: Path, *overrides: str):
    return compose("task=instruct/files", f"task.train_file={path}", *COLUMNS[layout], *SPLIT, *overrides).task


def expected(layout: str, i: int) -> dict:
    row = SOURCE[i]
    if layout == "chat":
        return {"messages": chat(i, row)[:-1], "output": row["output"]}
    return {"instruction": row["instruction"], "input": row["input"], "output": row["output"]}


@pytest.mark.parametrize("layout", ["qa", "parquet", "chat"])
def test_the_examples_read_are_the_source_rows(own_files, layout):
    splits = instruct.load_splits(own_task(layout, own_files[layout]), 0, "local")
    assert (len(splits["train"]), len(splits["tune"]), len(splits["dev"])) == (ROWS - 40, 20, 20)
    ids = {name: set(split["id"]) for name, split in splits.items()}
    assert not ids["train"] & ids["tune"] and not ids["train"] & ids["dev"] and not ids["tune"] & ids["dev"]
    assert ids["train"] | ids["tune"] | ids["dev"] == set(range(ROWS))
    for split in splits.values():
        for example in split:
            assert {k: v for k, v in example.items() if k != "id"} == expected(layout, example["id"])  # id: the row in the file
    again = instruct.load_splits(own_task(layout, own_files[layout], "task.split_seed=7"), 0, "local")
    assert set(again["dev"]["id"]) != ids["dev"]  # the held-out rows follow task.split_seed


def encoded_example(own_files, layout: str, tokenizer, i: int) -> dict:
    settings = compose("task=instruct/files", f"task.train_file={own_files[layout]}", *COLUMNS[layout], *SPLIT, "train.max_seq_len=1024")
    tokens = instruct.build(settings, "local", tokenizer)
    for split in tokens.values():
        ids = list(split["id"])
        if i in ids:
            return split[ids.index(i)]
    raise AssertionError(f"row {i} is in no split")


def check_labels(example: dict, prompt: list[int], response: str, tokenizer) -> None:
    """The prompt's tokens are masked (-100), the response's tokens and EOS kept, nothing truncated."""
    ids, labels = example["input_ids"], example["labels"]
    expected_response = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt + expected_response
    assert labels == [instruct.IGNORE] * len(prompt) + expected_response


def test_prompt_and_response_columns_mask_the_alpaca_prompt(own_files, smollm_tokenizer):
    i = next(i for i, row in enumerate(SOURCE) if row["input"])  # a row with an input column
    row = SOURCE[i]
    prompt = instruct.ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"])
    example = encoded_example(own_files, "qa", smollm_tokenizer, i)
    check_labels(example, smollm_tokenizer(prompt)["input_ids"], row["output"], smollm_tokenizer)
    assert smollm_tokenizer.decode([t for t in example["labels"] if t != instruct.IGNORE]) == row["output"] + "<|im_end|>"


def test_chat_rows_mask_every_turn_before_the_last_assistant_turn(own_files, smollm_tokenizer):
    tok = smollm_tokenizer
    i = 1  # a conversation with an earlier exchange: its first assistant turn is prompt, not response
    turns = chat(i, SOURCE[i])
    rendered = tok.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and rendered.endswith("<|im_start|>assistant\n")
    assert EARLIER[1]["content"] in rendered
    example = encoded_example(own_files, "chat", tok, i)
    check_labels(example, tok(rendered, add_special_tokens=False)["input_ids"], SOURCE[i]["output"], tok)
    assert tok.decode([t for t in example["labels"] if t != instruct.IGNORE]) == SOURCE[i]["output"] + "<|im_end|>"


def quick_run(tmp_path: Path, model_dir: Path, task: tuple[str, ...]) -> tuple[str, ...]:
    return (f"model.name_or_path={model_dir}", "model.name=tiny_llama", "task=instruct/files", *task, *SPLIT,
            "task.max_train_examples=16", "task.max_eval_examples=8", "task.tune_examples=8", "method.r=4", "method.lr=5e-3",
            "train.max_steps=2", "train.batch_size=4", "train.max_seq_len=128", "train.eval_batch_size=8", "train.threads=1",
            "train.memory_probe=false", "train.forgetting_examples=0", "train.save_adapter=false", "train.curve_points=[]",
            "pair_baseline=false", f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["qa", "chat"])
def test_a_tiny_llama_trains_on_each_layout(tmp_path, own_files, tiny_llama_dir, layout):
    task = (f"task.train_file={own_files[layout]}", *COLUMNS[layout], "task.generate_examples=2", "task.max_new_tokens=4")
    record = experiment.run(compose(*quick_run(tmp_path, tiny_llama_dir, task)))
    assert record["status"] == "done", record["error"]
    assert record["task"] == "files" and record["primary_metric"] == "loss" and record["data_source"] == "local"
    assert 0 < record["metrics"]["loss"] < 20 and record["metrics"]["eval_tokens"] > 0
    assert (record["train_examples"], record["tune_examples"], record["eval_examples"]) == (16, 8, 8)
    assert record["metrics"]["generated"] == 2  # greedy generations from the held-out prompts, rendered as trained
    task_identity = record["identity"]["config"]["task"]
    assert list(task_identity["data"]["files"]) == ["train"]
    assert task_identity["messages_column"] == ("messages" if layout == "chat" else None)


@pytest.mark.slow
def test_the_run_id_is_the_files_content(tmp_path, own_files, tiny_llama_dir):
    path = shutil.copy(own_files["qa"], tmp_path / "qa.jsonl")

    def run_id(file: Path) -> str:
        return experiment.plan(compose(*quick_run(tmp_path, tiny_llama_dir, (f"task.train_file={file}", *COLUMNS["qa"])))).run_id

    first = run_id(path)
    assert run_id(path) == first
    moved = tmp_path / "elsewhere" / "qa.jsonl"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    assert run_id(moved) == first  # the folder is not the data
    content = path.read_bytes()
    changed = content.replace(b'"answer": "1.', b'"answer": "2.', 1)
    assert len(changed) == len(content) and changed != content
    path.write_bytes(changed)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a later write, whatever the clock's resolution
    assert run_id(path) != first
    no_input = compose(*quick_run(tmp_path, tiny_llama_dir, (f"task.train_file={moved}", COLUMNS["qa"][0], COLUMNS["qa"][2])))
    assert experiment.plan(no_input).run_id != first  # the same file read without its input column: other examples


def test_an_unknown_instruction_task_names_files():
    with pytest.raises(UserError, match="instruction task 'mine' is unknown; use one of alpaca, self_instruct, dolly, or files"):
        instruct.task_spec("mine")


def test_a_hub_dataset_is_read_from_the_hub():
    task = compose("task=instruct/files", "task.hub_dataset=someone/their-chats", "task.messages_column=messages",
                   "task.template=chat").task
    assert instruct.resolve_source(task) == "hub"
    with pytest.raises(UserError, match="task.hub_dataset=someone/their-chats needs the Hugging Face hub, which cannot be reached"):
        instruct.data_identity(task, "hub")


def refusal(task) -> str:
    """The one line a bad file gives when the run's identity is taken (before anything trains or is recorded)."""
    with pytest.raises(UserError) as error:
        instruct.data_identity(task, instruct.resolve_source(task))
    return str(error.value)


QA = [{"question": "Name a colour.", "context": None, "answer": "Red."}, {"question": "Add 2 and 3.", "context": "", "answer": "5"},
      {"question": "Translate to French.", "context": "Good morning.", "answer": "Bonjour."}, {"question": "Say hi.", "context": None, "answer": "Hi."}]
HELD_OUT_ONE = ("task.heldout_examples=1", "task.tune_examples=1")


def test_a_missing_column_lists_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    task = compose("task=instruct/files", f"task.train_file={path}", *HELD_OUT_ONE).task
    assert refusal(task) == f"{path}: no column 'prompt' (task.prompt_column); its columns are question, context, answer"
    task = own_task("qa", path, *HELD_OUT_ONE, "task.input_column=extra")
    assert refusal(task) == f"{path}: no column 'extra' (task.input_column); its columns are question, context, answer"
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat(i, r)} for i, r in enumerate(SOURCE[:4])])
    task = own_task("chat", chats, *HELD_OUT_ONE, f"task.eval_file={path}")  # the eval file is checked as the train file is
    assert refusal(task) == f"{path}: no column 'messages' (task.messages_column); its columns are question, context, answer"


@pytest.mark.parametrize("row", range(len(QA)))
def test_a_prompt_that_is_not_text_names_its_row(tmp_path, row):
    path = write_jsonl(tmp_path / "qa.jsonl", [dict(r, question=None) if i == row else r for i, r in enumerate(QA)])
    # whether the row is trained on or held out, the line names the file it is in
    assert refusal(own_task("qa", path, *HELD_OUT_ONE)) == (
        f"{path} data row {row + 1}: 'question' (task.prompt_column) is None (NoneType); a prompt is text")


def test_a_response_or_input_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "sums.csv"
    path.write_text("question,context,answer\nAdd 2 and 3.,,5\nAdd 4 and 5.,,9\nAdd 1 and 1.,,2\n")  # numbers: read as numbers
    assert refusal(own_task("qa", path, "task.tune_examples=1", f"task.eval_file={path}")) == (
        f"{path} data row 1: 'answer' (task.response_column) is 5 (int); a response is text")
    path = write_jsonl(tmp_path / "qa.jsonl", [dict(r, context=["a", "list"]) if i == 2 else r for i, r in enumerate(QA)])
    assert refusal(own_task("qa", path, *HELD_OUT_ONE)) == (
        f"{path} data row 3: 'context' (task.input_column) is ['a', 'list'] (list); an input is text")


ROLE_CONTENT = "; a chat row is a list of {role, content} objects with text values"


@pytest.mark.parametrize("bad,message", [
    ("Hello.", "is 'Hello.' (str)"),
    ([], "is [] (list)"),
    ([{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}], "turn 0 is {'from': 'human', 'value': 'Hi.'} (dict)"),
    ([{"role": "user", "content": "Hi."}, {"role": "assistant"}], "turn 1 is {'role': 'assistant'} (dict)"),
    ([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": 7}], "turn 1 is {'role': 'assistant', 'content': 7} (dict)"),
    (["Hi.", "Hello."], "turn 0 is 'Hi.' (str)"),
])
def test_a_chat_row_that_is_not_role_content_objects_is_refused(tmp_path, bad, message):
    rows = [{"messages": chat(i, r)} for i, r in enumerate(SOURCE[:4])]
    rows[2] = {"messages": bad}
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert refusal(own_task("chat", path, *HELD_OUT_ONE)) == f"{path} data row 3: 'messages' (task.messages_column) {message}{ROLE_CONTENT}"


def test_a_chat_row_without_an_assistant_turn_is_refused(tmp_path):
    rows = [{"messages": chat(i, r)} for i, r in enumerate(SOURCE[:4])]
    rows[3] = {"messages": chat(3, SOURCE[3])[:-1]}
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert refusal(own_task("chat", path, *HELD_OUT_ONE)) == (
        f"{path} data row 4: 'messages' (task.messages_column) has no assistant turn (its roles: system, user); "
        f"the last assistant turn is the response the loss is on")


def test_chat_rows_need_the_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat(i, r)} for i, r in enumerate(SOURCE[:4])])
    task = compose("task=instruct/files", f"task.train_file={path}", "task.messages_column=messages").task
    assert refusal(task) == ("task.messages_column=messages holds chat rows, which are rendered with the tokenizer's chat "
                             "template; set task.template=chat (task.template=alpaca)")


def test_a_split_left_empty_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    assert refusal(own_task("qa", path, "task.heldout_examples=4")) == (
        f"task.heldout_examples=4 (the eval split carved from {path}, which has no eval file) leaves no training examples of 4; "
        f"use fewer, or name task.eval_file")
    with pytest.raises(UserError, match="task.tune_examples=3 leaves no training examples of 3; use fewer"):
        instruct.load_splits(own_task("qa", path, "task.heldout_examples=1", "task.tune_examples=3"), 0, "local")


@pytest.mark.parametrize("name,content", [
    ("empty.jsonl", ""),
    ("blank.jsonl", "\n\n"), ("empty.json", "[]"), ("empty.csv", "question,context,answer\n"),
])
def test_an_empty_file_is_refused(tmp_path, name, content):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    empty = tmp_path / name
    empty.write_text(content)
    assert refusal(own_task("qa", empty)) == f"{empty} holds no rows"
    assert refusal(own_task("qa", path, f"task.eval_file={empty}")) == f"{empty} holds no rows"
