"""Every bad input ends with one clear error, a non-zero exit within seconds, and no `done` record.

Most cases call the console script's entry point in this process (Hydra and all); one runs the real command."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from lora_sweep import reporting as analysis_cli
from lora_sweep import cli, deploy, estimate_cli, experiment, records, settings

QUICK = ["train.max_steps=2", "task.max_train_examples=64", "task.max_eval_examples=32", "train.save_adapter=false"]


def arguments(tmp_path: Path, overrides) -> list[str]:
    return [f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'out'}",
            *QUICK, *overrides]


def lora_sweep(tmp_path: Path, *overrides: str, capsys=None, monkeypatch=None) -> SimpleNamespace:
    """`lora-sweep OVERRIDES` in this process: its exit code and what it printed."""
    monkeypatch.setattr(sys, "argv", ["lora-sweep", *arguments(tmp_path, overrides)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    printed = capsys.readouterr()
    return SimpleNamespace(returncode=exit_info.value.code, stderr=printed.err, stdout=printed.out)


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
    (["method=nope"], "Could not find 'method/nope'; Available options in 'method': adalora, full, lora"),
    # automatic rank allocation (#25): AdaLoRA's ranks and schedule, EVA's settings and pass, an unmeetable budget
    (["method=adalora", "method.init_r=4"], "method.r=8 (AdaLoRA's target rank) is above method.init_r=4; AdaLoRA prunes from "
                                             "init_r down to r: use init_r >= 8"),
    (["method=adalora", "method.deltaT=5"], "method.tinit=0.1 and method.tfinal=0.2 of a 2-step run leave 2 to prune ranks in; "
                                            "AdaLoRA needs at least 5 (2, or method.deltaT=5 if more)"),
    pytest.param(["method=adalora", "train.max_steps=-1", "train.epochs=0.1", "method.tinit=0.4", "method.tfinal=0.4"],
                 "of a 1-step run leave 1 to prune ranks in; AdaLoRA needs at least 2",  # an epoch budget: checked once the data is read
                 marks=pytest.mark.slow),
    (["method.init=eva", "method.eva_rho=0.5"], "method.eva_rho=0.5 must be >= 1"),
    pytest.param(["method.init=eva", "method.eva_examples=100000"], "method.eva_examples=100000 is more than the 64 training "
                 "examples; use method.eva_examples <= 64", marks=pytest.mark.slow),  # checked once the data is read
    (["+sweep=autorank", "method.r=1000", "train.max_steps=2"], "method.r=1000 is larger than the smallest adapted matrix allows; use r <= 384"),
    (["+sweep=autorank", "+allocator=advisor", "method.lr=5e-3", "train.seed=0", "method.r=4", "train.max_steps=2"],
     "method.rank_pattern='results/tables/rank_pattern_sst2_minilm_l6_qv_r4.yaml' is neither a preset"),
    (["method.r=abc"], "Error merging override method.r=abc; Value 'abc' of type 'str' could not be converted to Integer"),
    (["method.rank=8"], "error: method.rank is not a setting; known: method.name, method.lr, method.r, method.alpha, "),
    (["+method.rank=32"], "error: method.rank is not a setting; known: method.name, method.lr, method.r, method.alpha, "),
    (["+train.max_step=5"], "error: train.max_step is not a setting; the closest known: train.max_steps, "),
    (["+baseline.rr=2"], "error: baseline.rr is not a setting; the closest known: baseline.r\n"),
    (["+xyz=1"], "error: xyz is not a setting; known: model, task, method, baseline, train, "),
    (["+method.rank=32", "method.r=1,2", "-m"], "error: method.rank is not a setting; known: method.name, method.lr, method.r, method.alpha, "),
    (["train.seed=-1"], "train.seed=-1 must be between 0 and 2**32 - 1"),
    (["train.seed=0,4294967296", "-m"], "train.seed=4294967296 must be between 0 and 2**32 - 1"),
    (["train.batching=shuffled"], "train.batching='shuffled' is not allowed; use sorted, random, grouped"),
    (["train.min_micro_batch=0"], "train.min_micro_batch=0 must be between 1 and train.batch_size=32"),
    (["train.min_micro_batch=33"], "train.min_micro_batch=33 must be between 1 and train.batch_size=32"),
    (["train.curve_points=[0.5,0.25]"], "train.curve_points=[0.5, 0.25] must be increasing fractions of the budget in (0, 1)"),
    (["train.curve_points=[0.5,1.5]"], "train.curve_points=[0.5, 1.5] must be increasing fractions of the budget in (0, 1)"),
])
def test_bad_input_fails_with_one_line(tmp_path, capsys, monkeypatch, overrides, message):
    """Bad values, unknown options (with the allowed ones named), wrong types, an unreachable hub."""
    result = lora_sweep(tmp_path, *overrides, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert message in result.stderr and "Config search path" not in result.stderr and "To append" not in result.stderr
    assert done_records(tmp_path) == []


@pytest.mark.parametrize("own_process", [pytest.param(True, marks=pytest.mark.slow, id="process"),
                                         pytest.param(False, id="in-process")])
def test_the_command_itself_fails_fast_when_the_hub_is_out_of_reach(tmp_path, capsys, monkeypatch, own_process):
    """The command itself (a fresh process, `python -m lora_sweep`) and its entry point in this process."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.perf_counter()
    if own_process:
        result = subprocess.run([sys.executable, "-m", "lora_sweep", *arguments(tmp_path, ["model=roberta_base"])],
                                capture_output=True, text=True, env=env, timeout=120)
    else:
        result = lora_sweep(tmp_path, "model=roberta_base", capsys=capsys, monkeypatch=monkeypatch)
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
    result = lora_sweep(tmp_path, f"task.data_dir={tmp_path / 'glue'}", capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 2
    assert "train.tsv line 3: expected 2 tab-separated columns, found 3" in result.stderr
    assert not list(tmp_path.glob("runs/*.json"))  # found before the baseline started: no record, not even a failed one


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
    (["runs_dir={tmp}/a_file/runs"], None,
     "{tmp}/a_file/runs: Not a directory; point runs_dir, cache_dir or artifacts_dir at a folder you can write", ""),
    (["cache_dir={tmp}/a_file/cache"], None, "{tmp}/a_file/cache/tokenized: Not a directory", ""),
    ([], read_only, "{tmp}/runs: Permission denied; point runs_dir, cache_dir or artifacts_dir at a folder you can write", ""),
    pytest.param([], no_space, "{tmp}/runs: No space left on device; free some space, or point runs_dir, cache_dir or artifacts_dir at another disk",
                 "", marks=pytest.mark.slow),  # found when the record is written: after the run has trained
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


def refuse_training(monkeypatch) -> None:
    """A check that belongs before any run fails the test if a run starts instead."""
    def started(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(experiment, "execute", started)


def small_glue(folder: Path, train_rows: int) -> Path:
    (folder / "SST-2").mkdir(parents=True)
    (folder / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"sentence {i}\t{i % 2}\n" for i in range(train_rows)))
    (folder / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    return folder


TOO_LONG = "train.max_seq_len=129 is longer than the model's 128 positions (max_position_embeddings in its config.json); use train.max_seq_len <= 128"


@pytest.mark.parametrize("overrides,prepare,message", [
    ([], read_only, "{tmp}/runs: Permission denied; point runs_dir, cache_dir or artifacts_dir at a folder you can write"),
    (["method.r=1,2", "-m"], read_only, "{tmp}/runs: Permission denied"),
    (["train.max_seq_len=129"], None, TOO_LONG),
    (["method=full", "train.max_seq_len=129"], None, TOO_LONG),
    (["train.max_seq_len=129", "method.r=1,2", "-m"], None, TOO_LONG),
    (["task.data_dir={tmp}/small", "task.tune_examples=20"], None, "task.tune_examples=20 leaves no training examples of 20; use fewer"),
    (["task.data_dir={tmp}/small", "task.tune_examples=20", "method=full"], None, "task.tune_examples=20 leaves no training examples"),
    (["task.data_dir={tmp}/header_only"], None, "GLUE file {tmp}/header_only/SST-2/train.tsv has no data rows"),
])
def test_what_would_fail_after_training_is_refused_before_any_run(tmp_path, capsys, monkeypatch, tiny_bert_dir, overrides, prepare, message):
    """A read-only results folder, a sequence length beyond the model's positions, a tuning split as large as the
    training data, an empty data file: refused for a single run as for a sweep, before the baseline or any run starts."""
    small_glue(tmp_path / "small", 20)
    small_glue(tmp_path / "header_only", 0)
    refuse_training(monkeypatch)
    if prepare:
        prepare(monkeypatch)
    result = lora_sweep(tmp_path, f"model.name_or_path={tiny_bert_dir}", *(o.format(tmp=tmp_path) for o in overrides),
                        capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 2 and result.stderr.splitlines() == [result.stderr.strip()], result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and message.format(tmp=tmp_path) in result.stderr
    assert " starting" not in result.stdout
    assert not list(tmp_path.glob("runs/**/*.json"))


def damaged_models(tiny_bert_dir: Path, folder: Path) -> tuple[Path, Path]:
    """A copy of the tiny model with its weights file cut in half, and one whose config.json is not JSON."""
    truncated, corrupt = shutil.copytree(tiny_bert_dir, folder / "truncated"), shutil.copytree(tiny_bert_dir, folder / "corrupt")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    (corrupt / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    return truncated, corrupt


@pytest.mark.parametrize("sweep", [[], ["method.r=1,2", "-m"]])
def test_a_damaged_model_folder_is_one_line_before_any_run(tmp_path, capsys, monkeypatch, tiny_bert_dir, sweep):
    truncated, corrupt = damaged_models(tiny_bert_dir, tmp_path)
    refuse_training(monkeypatch)
    result = lora_sweep(tmp_path, f"model.name_or_path={truncated}", *sweep, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: model.name_or_path={truncated}: model.safetensors is damaged or truncated (Error while deserializing header: "
        f"incomplete metadata, file not fully covered); save or download the model again"]
    result = lora_sweep(tmp_path, f"model.name_or_path={corrupt}", *sweep, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: model.name_or_path={corrupt} is not a model transformers can load: It looks like the config file at "
        f"'{corrupt / 'config.json'}' is not a valid JSON file."]
    assert not list(tmp_path.glob("runs/**/*.json"))


def test_lora_estimate_reads_a_corrupt_config_as_one_line(tmp_path, capsys, tiny_bert_dir):
    _, corrupt = damaged_models(tiny_bert_dir, tmp_path)
    for source in (corrupt, corrupt / "config.json"):
        with pytest.raises(SystemExit) as exit_info:
            estimate_cli.main([f"model.name_or_path={source}"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: model.name_or_path={source} is not a model transformers can load: It looks like the config file at "
            f"'{corrupt / 'config.json'}' is not a valid JSON file."]


@pytest.mark.parametrize("override,quoted", [("model.name_or_path=~/models/x", "model.name_or_path='~/models/x'"),
                                             ("runs_dir=runs/ü", "runs_dir='runs/ü'")])
def test_a_value_hydra_cannot_read_unquoted_gets_the_quoting_hint(tmp_path, capsys, monkeypatch, override, quoted):
    result = lora_sweep(tmp_path, override, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: cannot read {override}: a value holding ~, a non-ASCII letter or another character outside Hydra's grammar "
        f"must be quoted, inside the shell's quotes: \"{quoted}\" (for example \"runs_dir='runs/ü'\")"]
    key, value = override.split("=")
    assert OmegaConf.select(OmegaConf.structured(settings.compose(quoted)), key) == value  # the hint works


def test_a_full_disk_names_the_folder_it_could_not_write(tmp_path, monkeypatch):
    no_space(monkeypatch)
    with pytest.raises(OSError) as failure:
        records.write_record(tmp_path / "runs", {"run_id": "abc"})
    assert failure.value.filename == str(tmp_path / "runs") and failure.value.errno == errno.ENOSPC
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_lora_analyze_refuses_a_tolerance_that_is_not_positive(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        analysis_cli.main([str(tmp_path), f"--tolerance={value}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --tolerance={float(value):g} must be > 0 (in the metric's display units: points for GLUE metrics, nats for a loss)"]


def test_lora_deploy_fails_when_it_measured_nothing(tmp_path, capsys, monkeypatch):
    """The default run's adapter is not on disk (a clean clone): nothing is measured, and the exit status says so."""
    records.write_record(tmp_path / "runs", {"run_id": "abc", "status": "done", "task": "sst2", "model": "minilm_l6",
                                             "method": "lora", "baseline_run_id": None, "artifact": None})
    monkeypatch.setattr(deploy, "load_records", lambda runs_dir: (None, []))  # the record above is no analysable one
    monkeypatch.setattr(deploy, "analyse", lambda runs, skipped: None)
    monkeypatch.setattr(deploy, "default_run", lambda analysis, runs_dir: ("abc", "the rank the analysis recommends"))
    with pytest.raises(SystemExit) as exit_info:
        deploy.main([str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    assert exit_info.value.code == 1 and "abc: its adapter and full-FT checkpoint is not on disk" in capsys.readouterr().err
    assert not (tmp_path / "deploy").exists()


def test_lora_deploy_refuses_an_adalora_run_and_says_how_to_deploy_its_ranks(tmp_path, capsys):
    records.write_record(tmp_path / "runs", {"run_id": "abc", "status": "done", "task": "sst2", "model": "minilm_l6",
                                             "method": "adalora", "baseline_run_id": None, "artifact": None})
    with pytest.raises(SystemExit) as exit_info:
        deploy.main([str(tmp_path), "--run", "abc", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: --run abc is an AdaLoRA run")
    assert "method.rank_pattern=" in err[0] and not (tmp_path / "deploy").exists()


def test_help_lists_every_launcher(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lora-sweep", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    out = capsys.readouterr().out
    listed = out[out.index("hydra/launcher="):].split("\n\n")[0]
    launchers = sorted(p.stem for p in (Path(settings.CONF_DIR) / "hydra" / "launcher").glob("*.yaml"))
    assert launchers and all(re.search(rf"(=|\| ){name}\b", listed) for name in launchers), listed
