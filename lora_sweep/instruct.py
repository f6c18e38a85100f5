"""The instruction-tuning task family: instruction/response data, a causal decoder, loss on the response only.

It implements the task-family contract (lora_sweep.task_family.TaskFamily). Examples are {instruction, input, output}; the
held-out (reported) split is a seeded permutation, the tuning split is carved from the rest; the prompt's
tokens get label -100 so only the response is learned and scored.

Task `files` reads your own data (lora_sweep.user_files: local CSV, TSV, JSON, JSON lines or Parquet files, or a hub
dataset) in either layout: prompt and response columns (task.prompt_column, task.response_column, an optional
task.input_column), or chat rows (task.messages_column: a list of {role, content} objects), whose last assistant turn
is the response and whose turns before it are the prompt, rendered with the tokenizer's chat template. Its rows are
read and checked when the run's identity is taken, so bad data is refused before anything trains or is recorded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, DataCollatorForSeq2Seq

from lora_sweep import data, user_files
from lora_sweep.adapters import is_causal_decoder
from lora_sweep.errors import UserError
from lora_sweep.hub import hub_commit, load_pretrained, require_hub
from lora_sweep.identity import file_digest
from lora_sweep.settings import Settings, TaskSettings

TASK_TYPE = "CAUSAL_LM"
SHARED_INSTRUCT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruct"
IGNORE = -100  # label of tokens the loss skips

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class InstructTask:
    local_file: str | None  # file in the instruct data folder; None: hub only
    hub_id: str | None
    hub_fields: tuple[str, str, str] = ("instruction", "input", "output")  # hub columns for instruction, input, output


TASKS = {
    "alpaca": InstructTask("alpaca_5000.json", "tatsu-lab/alpaca"),
    "self_instruct": InstructTask("seed_tasks.jsonl", None),
    "dolly": InstructTask(None, "databricks/databricks-dolly-15k", ("instruction", "context", "response")),
}


FILES = "files"  # the task name of your own data (task=instruct/files)


def task_spec(name: str) -> InstructTask:
    if name not in TASKS:
        raise UserError(f"instruction task {name!r} is unknown; use one of {', '.join(TASKS)}, or {FILES} for your own data")
    return TASKS[name]


def data_dir(task: TaskSettings) -> Path:
    return Path(task.data_dir or os.environ.get("INSTRUCT_DIR") or SHARED_INSTRUCT_DIR).expanduser()


def resolve_source(task: TaskSettings) -> str:
    """'local' or 'hub', deciding `auto` by whether the local file exists; a folder the user named (task.data_dir)
    must hold the task: it is never passed over for the hub. Your own data: the hub when task.hub_dataset names it."""
    if task.name == FILES:
        if task.messages_column and task.template != "chat":
            raise UserError(f"task.messages_column={task.messages_column} holds chat rows, which are rendered with the "
                            f"tokenizer's chat template; set task.template=chat (task.template={task.template})")
        return "hub" if task.hub_dataset else "local"
    spec = task_spec(task.name)
    local = spec.local_file is not None and (data_dir(task) / spec.local_file).is_file()
    if task.source == "local" and spec.local_file is None:
        raise UserError(f"instruction task {task.name} is read from the hub only ({spec.hub_id}); use task.source=auto or hub")
    if task.source == "hub" and spec.hub_id is None:
        raise UserError(f"instruction task {task.name} has no hub dataset; use task.source=auto or local")
    if task.source == "hub":
        return "hub"
    if local:
        return "local"
    if task.source == "local" or task.data_dir or spec.hub_id is None:
        raise UserError(f"no {spec.local_file} in {data_dir(task)}"
                        + (f" (from task.data_dir={task.data_dir}); point task.data_dir at a folder holding it" if task.data_dir
                           else "; set task.data_dir or INSTRUCT_DIR to a folder holding it")
                        + (", or use task.source=hub" if spec.hub_id else ""))
    return "hub"


def load_model(path: str, settings: Settings, meta: bool = False) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path, revision=settings.model.revision)
    if not is_causal_decoder(config.model_type):
        raise UserError(f"model {settings.model.name} ({config.model_type}) is not a causal decoder; instruction tasks "
                        f"need one such as model=smollm2_135m")
    return load_pretrained(MODEL_FOR_CAUSAL_LM_MAPPING, path, config, settings.model.revision, meta)


def _require_hub(spec: InstructTask) -> None:
    require_hub(f"instruction data {spec.hub_id}", "task=instruct/alpaca or task=instruct/self_instruct (local files in ../shared/data/instruct)")


def data_identity(task: TaskSettings, source: str) -> dict:
    """What data a run reads: the local file by content hash, or the hub dataset at its commit. Your own data is read
    and checked here (lora_sweep.user_files), so a bad file is refused before a run starts."""
    if task.name == FILES:
        _own_examples(task)
        return user_files.data_identity(task)
    spec = task_spec(task.name)
    if source == "hub":
        _require_hub(spec)
        return {"hub": spec.hub_id, "revision": hub_commit(spec.hub_id, "dataset", None)}
    return {"files": {spec.local_file: file_digest(data_dir(task) / spec.local_file)}}


def _check_examples(rows: list, where: str) -> list[dict[str, str]]:
    if not isinstance(rows, list):
        raise UserError(f"{where}: expected a JSON list of {{instruction, input, output}} objects, found {type(rows).__name__}")
    if not rows:
        raise UserError(f"{where} holds no examples")
    examples = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
            raise UserError(f"{where}: example {i} lacks a string 'instruction' or 'output'")
        examples.append({"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]})
    return examples


def read_local(name: str, path: Path) -> list[dict[str, str]]:
    """Examples of a local file: Alpaca's JSON list, or the Self-Instruct seed tasks (each instance one example)."""
    if not path.is_file():
        raise UserError(f"instruction file {path} not found; set task.data_dir or INSTRUCT_DIR, or use task.source=hub")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"{path} line {line_no}: not UTF-8 text ({exc.reason}); an instruction file is JSON text") from None
    try:
        if name == "self_instruct":
            rows = []
            for line_no, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                task = json.loads(line)
                if not isinstance(task, dict) or not isinstance(task.get("instances"), list):
                    raise UserError(f"{path} line {line_no}: a seed task needs an 'instances' list")
                rows += [{"instruction": task.get("instruction"), **instance} for instance in task["instances"]]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    return _check_examples(rows, str(path))


def _load_hub(spec: InstructTask) -> list[dict[str, str]]:
    _require_hub(spec)
    raw = datasets.load_dataset(spec.hub_id, split="train")
    instruction, context, output = spec.hub_fields
    return [{"instruction": r[instruction], "input": r.get(context) or "", "output": r[output]} for r in raw]


def _own_columns(task: TaskSettings) -> dict[str, str | None]:
    if task.messages_column:
        return {"task.messages_column": task.messages_column}
    return {"task.prompt_column": task.prompt_column, "task.input_column": task.input_column,
            "task.response_column": task.response_column}


def _text(value, where: str, row: int, column: str, setting: str, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where} data row {row + 1}: {column!r} ({setting}) is {_shown(value)}; {what} is text")
    return value


def _shown(value) -> str:
    """A value as an error line shows it: its repr, cut short, and its type."""
    text = repr(value)
    return f"{text[:80]}{'...' if len(text) > 80 else ''} ({type(value).__name__})"


def _chat_example(turns, where: str, row: int, column: str) -> dict:
    """A chat row as an example: the turns before the last assistant turn (the prompt) and that turn's content."""
    def refuse(problem: str) -> UserError:
        return UserError(f"{where} data row {row + 1}: {column!r} (task.messages_column) {problem}; a chat row is a list of "
                         f"{{role, content}} objects with text values")

    if not isinstance(turns, list) or not turns:
        raise refuse(f"is {_shown(turns)}")
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise refuse(f"turn {n} is {_shown(turn)}")
    last = max((n for n, turn in enumerate(turns) if turn["role"] == "assistant"), default=None)
    if last is None:
        raise UserError(f"{where} data row {row + 1}: {column!r} (task.messages_column) has no assistant turn (its roles: "
                        f"{', '.join(turn['role'] for turn in turns)}); the last assistant turn is the response the loss is on")
    return {"messages": [{"role": turn["role"], "content": turn["content"]} for turn in turns[:last]],
            "output": turns[last]["content"]}


def _own_split(task: TaskSettings, rows: datasets.Dataset, split: str) -> datasets.Dataset:
    """One split of your own data as examples with their `id` (the row in its source): {instruction, input, output}
    from prompt and response columns, or {messages, output} from chat rows."""
    named = task.eval_split if task.hub_dataset else task.eval_file
    where = user_files.where(task, split if named else "train")  # a held-out split carved from train is in the train file
    ids = list(rows["id"])
    if task.messages_column:
        examples = [_chat_example(turns, where, row, task.messages_column) for row, turns in zip(ids, rows[task.messages_column])]
    else:
        inputs = rows[task.input_column] if task.input_column else [None] * len(rows)
        examples = [{"instruction": _text(prompt, where, row, task.prompt_column, "task.prompt_column", "a prompt"),
                     "input": "" if extra is None else _text(extra, where, row, task.input_column, "task.input_column", "an input"),
                     "output": _text(response, where, row, task.response_column, "task.response_column", "a response")}
                    for row, prompt, extra, response in zip(ids, rows[task.prompt_column], inputs, rows[task.response_column])]
    return datasets.Dataset.from_list(examples).add_column("id", ids)


_READ: dict[str, tuple[datasets.Dataset, datasets.Dataset]] = {}  # your own data's examples read in this process


def _own_examples(task: TaskSettings) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) examples of your own data, checked; read once per process for each task and content of its data."""
    key = json.dumps([dataclasses.asdict(task), user_files.data_identity(task)], sort_keys=True)
    if key not in _READ:
        train, evaluation = user_files.read_splits(task, _own_columns(task))
        _READ[key] = _own_split(task, train, "train"), _own_split(task, evaluation, "eval")
    return _READ[key]


def load_splits(task: TaskSettings, seed: int, source: str) -> datasets.DatasetDict:
    """Train, tune and held-out examples (see data.split): the held-out split is the first `heldout_examples` of a
    permutation seeded by task.split_seed (your own data: an eval file or split where one is named, see
    user_files.read_splits); ids are positions in the source file."""
    if task.name == FILES:
        return data.split(*_own_examples(task), task, seed)
    spec = task_spec(task.name)
    examples = read_local(task.name, data_dir(task) / spec.local_file) if source == "local" else _load_hub(spec)
    if len(examples) <= task.heldout_examples:
        raise UserError(f"task.heldout_examples={task.heldout_examples} leaves no training examples of {len(examples)}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(task.split_seed)).tolist()
    rows = datasets.Dataset.from_list(examples).add_column("id", list(range(len(examples))))
    return data.split(rows.select(sorted(order[task.heldout_examples:])), rows.select(order[:task.heldout_examples]), task, seed)


def prompt_text(example: dict, template: str, tokenizer) -> str:
    if example.get("messages") is not None:  # a chat row of your own data (task.template=chat): its turns before the response
        return tokenizer.apply_chat_template(example["messages"], tokenize=False, add_generation_prompt=True)
    if template == "chat":
        content = example["instruction"] + (f"\n\n{example['input']}" if example["input"] else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return (ALPACA_PROMPT if example["input"] else ALPACA_PROMPT_NO_INPUT).format(**example)


def encode(example: dict[str, str], tokenizer, template: str, max_len: int) -> dict[str, list[int]]:
    """Token ids and labels: prompt tokens masked, the response (ending in EOS) kept.

    Over-long examples lose the start of the prompt first; the response keeps at least a quarter of
    max_len (or all of itself, if shorter), so truncation never drops the whole response."""
    prompt = tokenizer(prompt_text(example, template, tokenizer), add_special_tokens=template != "chat")["input_ids"]
    response = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    keep_response = min(len(response), max(max_len - len(prompt), max(1, max_len // 4)))
    response = response[:keep_response]
    prompt = prompt[len(prompt) - (max_len - len(response)):] if len(prompt) + len(response) > max_len else prompt
    ids = prompt + response
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * len(prompt) + response}


def check_template_room(tokenizer, template: str, max_len: int) -> None:
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("task.template=chat needs a tokenizer with a chat template, and this model's has none; "
                        "use task.template=alpaca (chat rows, task.messages_column, need a chat model)")
    empty = prompt_text({"instruction": "", "input": "", "output": ""}, template, tokenizer)
    fixed = len(tokenizer(empty, add_special_tokens=template != "chat")["input_ids"])
    if fixed >= max_len - 1:
        raise UserError(f"the {template} prompt template alone takes {fixed} tokens of train.max_seq_len={max_len}, "
                        f"leaving no room for a response; raise train.max_seq_len above {fixed + 1}")


def build(settings: Settings, source: str, tokenizer) -> datasets.DatasetDict:
    """Tokenized train/tune/dev splits; the dev split keeps its prompts and references for generation."""
    task, max_len = settings.task, settings.train.max_seq_len
    check_template_room(tokenizer, task.template, max_len)
    splits = {}
    for name, examples in load_splits(task, settings.train.seed, source).items():
        encoded = [encode(e, tokenizer, task.template, max_len) for e in examples]
        columns = {k: [e[k] for e in encoded] for k in ("input_ids", "attention_mask", "labels")}
        columns["id"] = examples["id"]
        if name == "dev":
            columns["prompt"] = [prompt_text(e, task.template, tokenizer) for e in examples]
            columns["reference"] = examples["output"]
        splits[name] = datasets.Dataset.from_dict(columns)
    return datasets.DatasetDict(splits)


def collator(tokenizer):
    """Pads ids with the pad token and labels with -100; drops the text columns kept for generation."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, padding=True)

    def collate(features: list[dict]) -> dict:
        return pad([{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in features])

    return collate


def batch_outputs(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-example outputs kept in the record: summed cross-entropy over the response tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return torch.stack([losses.sum(dim=1), (labels != IGNORE).sum(dim=1).float()], dim=1)


def split_metrics(outputs: np.ndarray, labels, settings: Settings) -> tuple[dict[str, float], str]:
    """Held-out loss per response token (primary; a ratio of sums, not a mean over examples) and its perplexity."""
    loss = float(outputs[:, 0].sum() / outputs[:, 1].sum())
    return {"loss": loss, "perplexity": math.exp(loss), "eval_tokens": float(outputs[:, 1].sum())}, "loss"


@torch.no_grad()
def generate(accelerator, model: torch.nn.Module, tokenizer, dev: datasets.Dataset, task: TaskSettings) -> dict[str, float]:
    """Greedy generations for the first held-out prompts, within a time limit, scored with ROUGE-L."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    model = accelerator.unwrap_model(model).eval()
    scores, empty, runaway = [], 0, 0
    deadline = time.perf_counter() + task.generate_time_limit_s
    for example in dev.select(range(min(task.generate_examples, len(dev)))):
        if time.perf_counter() > deadline:
            break
        inputs = tokenizer(example["prompt"], return_tensors="pt", add_special_tokens=task.template != "chat").to(accelerator.device)
        out = model.generate(**inputs, max_new_tokens=task.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        empty += not text
        runaway += len(new) >= task.max_new_tokens and tokenizer.eos_token_id not in new.tolist()
        scores.append(scorer.score(example["reference"], text)["rougeL"].fmeasure)
    n = len(scores)
    return {"rougeL": sum(scores) / n, "empty_rate": empty / n, "runaway_rate": runaway / n, "generated": float(n)} if n else {}


def extra_metrics(accelerator, model: torch.nn.Module, tokenizer, dev: datasets.Dataset, settings: Settings) -> dict[str, float]:
    """ROUGE-L of greedy generations, when asked for."""
    return generate(accelerator, model, tokenizer, dev, settings.task) if settings.task.generate_examples else {}
