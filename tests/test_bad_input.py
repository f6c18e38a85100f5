"""Every bad input ends with one clear error, a non-zero exit within seconds, and no `done` record.

Most cases call the console script's entry point in this process (Hydra and all); one runs the real command."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_sweep import cli

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
    (["method.targets=qvx"], "method.targets='qvx' is not a preset; use one of qv, qkvo, mlp, all_linear"),
    (["method.targets=[nothing_here]"], "matches no linear module of this model; its linear modules are: bert.encoder.layer.N.attention.output.dense, bert.encoder.layer.N.attention.self.key"),
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
