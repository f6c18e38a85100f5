"""Every bad input ends with one clear error, a non-zero exit within seconds, and no `done` record.

Most cases call the console script's entry point in this process (Hydra and all); one runs the real command."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_sweep import cli, records

QUICK = ["train.max_steps=2", "task.max_train_examples=64", "task.max_eval_examples=32", "train.save_adapter=false"]


def arguments(tmp_path: Path, overrides) -> list[str]:
    return [f"results_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'out'}",
            *QUICK, *overrides]


def lora_sweep(tmp_path: Path, *overrides: str, capsys=None, monkeypatch=None) -> SimpleNamespace:
    """`lora-sweep OVERRIDES` in this process: its exit code and what it printed to stderr."""
    monkeypatch.setattr(sys, "argv", ["lora-sweep", *arguments(tmp_path, overrides)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return SimpleNamespace(returncode=exit_info.value.code, stderr=capsys.readouterr().err)


def done_records(tmp_path: Path) -> list[dict]:
    folder = tmp_path / "runs"
    found = [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []
    return [r for r in found if r["status"] == "done"]


@pytest.mark.parametrize("overrides,message", [
    (["method.targets=qvx"], "method.targets='qvx' is not a preset; use one of qv, qkvo, mlp, all_linear, embeddings"),
    (["method.targets=[nothing_here]"], "matches no adaptable module of this model; its linear, embedding and convolution modules are: bert.embeddings.position_embeddings, "
                                        "bert.embeddings.token_type_embeddings, bert.embeddings.word_embeddings, bert.encoder.layer.N.attention.output.dense"),
    (["method.r=0"], "method.r=0 must be >= 1"),
    (["method.r=1000"], "method.r=1000 is larger than the smallest adapted matrix allows; use r <= 384"),
    (["method.alpha=0"], "alpha=0.0 must be > 0"),
    (["method.dropout=1.0"], "method.dropout=1.0 must be in [0, 1)"),
    (["task.name=nope"], "GLUE task 'nope' is unknown; use one of sst2, mrpc"),
    (["model.name_or_path=FacebookAI/roberta-base"], "needs the Hugging Face hub, which cannot be reached"),
    (["task=glue/mnli"], "nyu-mll/glue) needs the Hugging Face hub, which cannot be reached"),
    (["model=nope"], "Could not find 'model/nope'; Available options in 'model': bert_base, deberta_v3_base"),
    (["task=glue/nope"], "Could not find 'task/glue/nope'; available options: cola, mnli, mrpc"),
    (["method=nope"], "Could not find 'method/nope'; Available options in 'method': full, lora"),
    (["method.r=abc"], "Error merging override method.r=abc; Value 'abc' of type 'str' could not be converted to Integer"),
])
def test_bad_input_fails_with_one_line(tmp_path, capsys, monkeypatch, overrides, message):
    """Bad values, unknown options (with the allowed ones named), wrong types, an unreachable hub."""
    result = lora_sweep(tmp_path, *overrides, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert message in result.stderr and "Config search path" not in result.stderr
    assert done_records(tmp_path) == []


def test_the_command_itself_fails_fast_when_the_hub_is_out_of_reach(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lora_sweep", *arguments(tmp_path, ["model=roberta_base"])],
                            capture_output=True, text=True, env=env, timeout=120)
    assert time.perf_counter() - started < 30
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model 'FacebookAI/roberta-base' needs the Hugging Face hub, which cannot be reached "
        "(ConnectError: [Errno 111] Connection refused); use model=minilm_l6 (the embedded model) or "
        "model.name_or_path=<a local folder>"]
    assert done_records(tmp_path) == []


def test_malformed_data_file_names_file_and_line(tmp_path, capsys, monkeypatch):
    glue_dir = tmp_path / "glue" / "SST-2"
    glue_dir.mkdir(parents=True)
    (glue_dir / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    (glue_dir / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    result = lora_sweep(tmp_path, f"task.data_dir={tmp_path / 'glue'}", "pair_baseline=false", capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 2
    assert "train.tsv line 3: expected 2 tab-separated columns, found 3" in result.stderr
    assert done_records(tmp_path) == []
    failed = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert [r["status"] for r in failed] == ["failed"] and "line 3" in failed[0]["error"]


def malformed_glue(folder: Path, train: bytes) -> Path:
    (folder / "SST-2").mkdir(parents=True)
    (folder / "SST-2" / "train.tsv").write_bytes(train)
    (folder / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    return folder


def test_a_sweep_over_malformed_data_stops_before_any_run(tmp_path, capsys, monkeypatch):
    glue_dir = malformed_glue(tmp_path / "glue", b"sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    result = lora_sweep(tmp_path, "method.r=1,2", f"task.data_dir={glue_dir}", "-m", capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {glue_dir}/SST-2/train.tsv line 3: expected 2 tab-separated columns, found 3"]
    assert not list(tmp_path.glob("runs/*.json"))


def no_space(monkeypatch):
    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", full)


def read_only(monkeypatch):  # chmod means nothing to root: the refusal the OS gives anyone else, simulated
    def refuse(dir, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(records.tempfile, "mkstemp", refuse)


@pytest.mark.parametrize("overrides,prepare,message,never", [
    (["results_dir={tmp}/a_file/runs"], None,
     "{tmp}/a_file/runs/.locks: Not a directory; point results_dir, cache_dir or artifacts_dir at a folder you can write", ""),
    (["cache_dir={tmp}/a_file/cache"], None, "{tmp}/a_file/cache/tokenized: Not a directory", ""),
    ([], read_only, "{tmp}/runs: Permission denied; point results_dir, cache_dir or artifacts_dir at a folder you can write", ""),
    ([], no_space, "No space left on device; free some space, or point results_dir, cache_dir or artifacts_dir at another disk", ""),
    (["model.name_or_path={tmp}/empty"], None, "model.name_or_path={tmp}/empty is a folder but not a model: it has no config.json", ""),
    (["model.name_or_path={tmp}/typo"], None, "model.name_or_path={tmp}/typo: no such folder", "cannot be reached"),
    (["model.name_or_path=models/typo"], None, "model.name_or_path=models/typo: no such folder", "cannot be reached"),
    (["task.data_dir={tmp}/empty"], None,
     "no GLUE SST-2/train.tsv in {tmp}/empty/SST-2 (from task.data_dir={tmp}/empty); point task.data_dir at a folder holding SST-2/",
     "set task.data_dir"),
    (["task.data_dir={tmp}/binary"], None, "{tmp}/binary/SST-2/train.tsv line 3: not UTF-8 text (invalid start byte)", ""),
])
def test_file_system_and_model_path_problems_are_one_line(tmp_path, capsys, monkeypatch, tiny_bert_dir, overrides, prepare, message, never):
    """Unwritable or full folders, a folder that is not a model, a model path that does not exist (never a hub
    problem), a data folder without the task, a binary data file: one `error:` line, exit 2, no `done` record."""
    (tmp_path / "a_file").write_text("a file, not a folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "models").mkdir()
    malformed_glue(tmp_path / "binary", b"sentence\tlabel\ngood\t1\n\xff\xfe\x00\x01binary\t1\n")
    monkeypatch.chdir(tmp_path)
    if prepare:
        prepare(monkeypatch)
    result = lora_sweep(tmp_path, f"model.name_or_path={tiny_bert_dir}", "pair_baseline=false",
                        *(o.format(tmp=tmp_path) for o in overrides), capsys=capsys, monkeypatch=monkeypatch)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.lstrip("\r").startswith("train:")]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert message.format(tmp=tmp_path) in lines[0]
    assert not never or never not in lines[0]
    assert done_records(tmp_path) == []
    assert not list(tmp_path.glob("runs/.*.tmp"))


def test_help_opens_with_the_program_and_the_commands_a_newcomer_needs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lora-sweep", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("lora-sweep: ")
    assert all(command in out for command in ("lora-sweep method.r=16", "lora-sweep -m +sweep=rank", "lora-analyze results"))
    assert "model: bert_base" in out and "task/glue: cola" in out and "Hydra" not in out.splitlines()[0]
