"""Sweeps: presets expand to the grids they promise; baselines are shared; resume, parallel and concurrent runs lose nothing."""

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from lora_sweep import cli, experiment, records
from lora_sweep.settings import CONF_DIR, register
from lora_sweep.sweep import compose_job, job_overrides

TINY = ["task.max_train_examples=48", "task.max_eval_examples=32", "train.max_steps=2", "train.batch_size=8",
        "train.save_adapter=false", "train.max_seq_len=32", "model.name=tiny"]


def sweep_arguments(tmp_path: Path, model_dir: Path, *overrides: str, results: str = "runs", sweep_dir: bool = True) -> list[str]:
    """What follows `lora-sweep` on the command line of `sweep`."""
    return ["-m", f"model.name_or_path={model_dir}", *TINY, f"runs_dir={tmp_path / results}", f"cache_dir={tmp_path / 'cache'}",
            *([f"hydra.sweep.dir={tmp_path / 'multirun' / str(time.time_ns())}"] if sweep_dir else []), *overrides]


def sweep(tmp_path: Path, model_dir: Path, *overrides: str, results: str = "runs", wait: bool = True, sweep_dir: bool = True):
    """`lora-sweep -m` run from `tmp_path`; `sweep_dir=False` leaves Hydra's sweep folder to the default."""
    args = [sys.executable, "-m", "lora_sweep", *sweep_arguments(tmp_path, model_dir, *overrides, results=results, sweep_dir=sweep_dir)]
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                                start_new_session=True)
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def refused_sweep(tmp_path: Path, model_dir: Path, *overrides: str, own_process: bool, capsys, monkeypatch):
    """A sweep expected to be refused before it starts: `sweep` in a process of its own, or the same command line
    given to the console script's entry point in this process (its exit code and what it printed)."""
    if own_process:
        return sweep(tmp_path, model_dir, *overrides)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lora-sweep", *sweep_arguments(tmp_path, model_dir, *overrides)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    printed = capsys.readouterr()
    return SimpleNamespace(returncode=exit_info.value.code, stdout=printed.out, stderr=printed.err)


# The checks that need no training run in this process (fast) and, as the command itself, in a process of its own.
OWN_PROCESS = pytest.mark.parametrize("own_process", [pytest.param(True, marks=pytest.mark.slow, id="process"),
                                                      pytest.param(False, id="in-process")])


def load(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def check_paired(found: dict[str, dict], lora_runs: int, baselines: int) -> None:
    lora = [r for r in found.values() if r["method"] == "lora"]
    full = [r for r in found.values() if r["method"] == "full"]
    assert len(lora) == lora_runs and len(full) == baselines
    assert all(r["status"] == "done" and r["metrics"] and r["memory"]["peak_bytes"] for r in found.values())
    for r in lora:
        baseline = found[r["baseline_run_id"]]
        assert baseline["method"] == "full" and baseline["seed"] == r["seed"] and r["baseline_status"] == "done"


@pytest.mark.slow
def test_joblib_launcher_runs_a_micro_sweep_with_shared_baselines(tmp_path, tiny_bert_dir):
    result = sweep(tmp_path, tiny_bert_dir, "hydra/launcher=local", "method.r=1,2", "train.seed=0,1")
    assert result.returncode == 0, result.stderr[-3000:]
    check_paired(load(tmp_path / "runs"), lora_runs=4, baselines=2)
    assert "run 4 of 4 finished" in result.stdout
    assert "LoRA r=2" in result.stdout and "full FT" in result.stdout  # the end-of-sweep table


@pytest.mark.slow
def test_submitit_local_executor_runs_a_micro_sweep(tmp_path, tiny_bert_dir):
    result = sweep(tmp_path, tiny_bert_dir, "hydra/launcher=submitit_local", "method.r=1,2", "train.seed=0,1", "train.threads=1")
    assert result.returncode == 0, result.stderr[-3000:]
    found = load(tmp_path / "runs")
    check_paired(found, lora_runs=4, baselines=2)
    assert not list((tmp_path / "runs").glob("history/*.json"))  # no baseline ran twice despite four jobs at once


@pytest.mark.slow
def test_ray_launcher_runs_a_micro_sweep(tmp_path, tiny_bert_dir):
    """A local Ray (2 CPUs): jobs run two at a time and the first that needs a baseline trains it under its lock."""
    result = sweep(tmp_path, tiny_bert_dir, "hydra/launcher=ray_local", "method.r=1,2", "train.seed=0,1", "train.threads=1")
    assert result.returncode == 0, result.stderr[-3000:]
    check_paired(load(tmp_path / "runs"), lora_runs=4, baselines=2)
    assert not (tmp_path / "runs" / "history").exists()  # no run (a baseline above all) was trained twice


@pytest.mark.slow
def test_a_second_sweep_finds_the_baseline_again(tmp_path, tiny_bert_dir):
    assert sweep(tmp_path, tiny_bert_dir, "method.r=1,2").returncode == 0
    first = load(tmp_path / "runs")
    second = sweep(tmp_path, tiny_bert_dir, "method.r=2,4")
    assert second.returncode == 0
    found = load(tmp_path / "runs")
    check_paired(found, lora_runs=3, baselines=1)
    for rid, record in first.items():  # nothing re-run, nothing lost
        assert found[rid] == record
    assert "already done: skipped" in second.stdout


@pytest.mark.slow
def test_resume_after_a_killed_sweep(tmp_path, tiny_bert_dir):
    slow = ["train.max_steps=30", "method.r=1,2,4,8"]
    process = sweep(tmp_path, tiny_bert_dir, *slow, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((tmp_path / "runs").glob("*.json"))) < 2:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # mid-way through the next run
    process.wait()
    before = load(tmp_path / "runs")
    assert 2 <= len(before) < 5 and all(r["status"] == "done" for r in before.values())

    result = sweep(tmp_path, tiny_bert_dir, *slow)
    assert result.returncode == 0, result.stderr[-3000:]
    after = load(tmp_path / "runs")
    check_paired(after, lora_runs=4, baselines=1)
    for rid, record in before.items():
        assert after[rid] == record  # done runs were skipped, not redone
    assert result.stdout.count("already done: skipped") >= len(before)
    assert not list((tmp_path / "runs").glob(".*.tmp"))


@pytest.mark.slow
def test_two_processes_writing_one_folder_lose_nothing(tmp_path, tiny_bert_dir):
    grid = ["method.r=1,2,4", "train.threads=1"]
    processes = [sweep(tmp_path, tiny_bert_dir, *grid, wait=False) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    check_paired(load(tmp_path / "runs"), lora_runs=3, baselines=1)
    assert not list((tmp_path / "runs").glob("history/*.json"))  # every run ran exactly once


@pytest.mark.slow
def test_a_sweep_with_a_failing_run_finishes_the_others_and_exits_1(tmp_path, tiny_bert_dir):
    """A model folder whose config.json promises 512 positions while its weights hold 128 passes every check (they
    read the config and the weights' header) but fails when the run loads its weights."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    glue = tmp_path / "glue" / "SST-2"
    glue.mkdir(parents=True)
    rows = "".join(f"{'a long sentence ' * 100 if i % 4 == 0 else 'short'}\t{i % 2}\n" for i in range(16))
    for name in ("train.tsv", "dev.tsv"):
        (glue / name).write_text("sentence\tlabel\n" + rows)
    result = sweep(tmp_path, tiny_bert_dir, f"task.data_dir={tmp_path / 'glue'}", "task.tune_examples=4",
                   "pair_baseline=false", f"model.name_or_path={tiny_bert_dir},{broken}")
    assert result.returncode == 1, result.stderr[-3000:]
    found = load(tmp_path / "runs")
    assert sorted(r["status"] for r in found.values()) == ["done", "failed"]
    failed = next(r for r in found.values() if r["status"] == "failed")
    assert "\n" not in failed["error"] and (tmp_path / "runs" / failed["log"]).is_file()
    table = result.stdout[result.stdout.rindex("run targets"):].splitlines()
    assert "run 2 of 2 finished" in result.stdout and sorted(line.split()[-1] for line in table[1:]) == ["done", "failed"]
    assert f"[sweep] 1 of 2 runs failed or left no record: {failed['run_id']}" in result.stderr


@pytest.mark.slow
def test_two_sweeps_started_at_once_from_one_folder_each_report_their_own_runs(tmp_path, tiny_bert_dir):
    grids = (["method.r=1,2"], ["method.r=4,8"])
    processes = [sweep(tmp_path, tiny_bert_dir, *grid, "train.threads=1", wait=False, sweep_dir=False) for grid in grids]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    for output, mine, theirs in zip(outputs, grids, reversed(grids)):
        assert "run 2 of 2 finished" in output and " of 4 " not in output and "run 3" not in output
        table = output[output.rindex("run targets"):]
        for ranks, present in ((mine, True), (theirs, False)):
            assert all((f"LoRA r={r}" in table) == present for r in ranks[0].split("=")[1].split(","))
    assert len(list((tmp_path / "cache" / "multirun").glob("*/*"))) == 2  # one folder per sweep, under the cache
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_sweep_killed_again_and_again_ends_with_every_run_done_exactly_once(tmp_path, tiny_bert_dir):
    """Bounded chaos: SIGKILL during start-up, and once one and two records exist (mid-way through the next run),
    re-running the sweep after each; then the last re-run completes it."""
    grid = ["method.r=1,2"]
    runs = tmp_path / "runs"
    for kill_at in (2.0, 1, 2):  # seconds after the start, or the number of records written
        process = sweep(tmp_path, tiny_bert_dir, *grid, wait=False)
        if isinstance(kill_at, float):
            time.sleep(kill_at)
        deadline = time.time() + 60
        while isinstance(kill_at, int) and len(list(runs.glob("*.json"))) < kill_at and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    result = sweep(tmp_path, tiny_bert_dir, *grid)
    assert result.returncode == 0, result.stderr[-3000:]
    found = load(runs)
    check_paired(found, lora_runs=2, baselines=1)
    assert all(records.load(path) == found[path.stem] for path in runs.glob("*.json"))  # valid records, none moved aside
    assert not (runs / "history").exists() and not (runs / "corrupt").exists()  # no run finished twice


@pytest.mark.parametrize("overrides,message", [
    (["method.r=1,abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    (["method.r=range(1,1)"], "the sweep grid is empty"),
    (["method.r=1,0"], "method.r=0 must be >= 1"),
    (["method.targets=qv,nothing"], "method.targets='nothing' is not a preset"),
])
@OWN_PROCESS
def test_bad_sweeps_stop_before_any_training(tmp_path, tiny_bert_dir, overrides, message, own_process, capsys, monkeypatch):
    result = refused_sweep(tmp_path, tiny_bert_dir, *overrides, own_process=own_process, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides,message", [
    (["+sweep=nope"], "Could not find 'sweep/nope'; Available options in 'sweep': advisor, alpha, autorank, batching, glue"),
    (["hydra/launcher=nope"], "Could not find 'hydra/launcher/nope'; Available options in 'hydra/launcher': basic, joblib, local"),
])
@OWN_PROCESS
def test_unknown_preset_or_launcher_is_refused(tmp_path, tiny_bert_dir, overrides, message, own_process, capsys, monkeypatch):
    result = refused_sweep(tmp_path, tiny_bert_dir, *overrides, own_process=own_process, capsys=capsys, monkeypatch=monkeypatch)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def grid(*overrides: str, sweep_args: tuple[str, ...] = ()) -> list[list[str]]:
    """The jobs of a sweep, as the callback sees them; `sweep_args` are swept values given on the command line."""
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    cfg.hydra.overrides.task.extend(sweep_args)
    return job_overrides(cfg)


def values(jobs: list[list[str]], key: str) -> list[str]:
    return sorted({o.split("=", 1)[1] for job in jobs for o in job if o.startswith(key + "=")})


def test_presets_expand_to_the_grids_they_promise():
    ranks = ["1", "16", "4", "64"]
    rank = grid("+sweep=rank")  # an adaptive sweep: its first round
    assert len(rank) == 12 and values(rank, "method.r") == ranks and values(rank, "train.seed") == ["0", "1", "2"]
    assert values(grid("+sweep=quick"), "method.r") == ["1", "64", "8"]
    alpha = grid("+sweep=alpha")
    assert len(alpha) == 42 and values(alpha, "+scaling") == ["fixed", "ratio_1", "ratio_2", "ratio_4", "ratio_half", "rslora"]
    targets = grid("+sweep=targets")
    assert len(targets) == 8 and values(targets, "method.targets") == ["all_linear", "mlp", "qkvo", "qv"]
    lr = grid("+sweep=lr")
    assert len(lr) == 2 * 6 * 7 and values(lr, "method") == ["full", "lora"]
    glue = grid("+sweep=glue")
    assert len(glue) == 35 and values(glue, "task") == ["glue/cola", "glue/mrpc", "glue/rte", "glue/sst2", "glue/stsb"]
    advisor = grid("+sweep=advisor")
    assert len(advisor) == 6 and values(advisor, "method.rank_pattern") == ["advised_sst2_minilm_l6_qv_r8", "null"]
    seeded = grid("+sweep=[rank,seeds]", "hydra.sweeper.adaptive=false")  # the adaptive sweep picks its own seeds
    assert len(seeded) == 12 and values(seeded, "train.seed") == ["0", "1", "2"]
    assert values(grid("+sweep=rank", sweep_args=("method.r=4,8",)), "method.r") == ["4", "8"]  # the command line wins


def composed(*overrides: str):
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose_job("config", list(overrides))


def test_alpha_policies_compose_into_their_scaling():
    ratio = composed("+scaling=ratio_half", "method.r=8").method
    assert (ratio.alpha_policy, ratio.effective_alpha, ratio.use_rslora) == ("ratio", 4.0, False)
    rs = composed("+scaling=rslora", "method.r=8").method
    assert (rs.effective_alpha, rs.use_rslora, rs.scaling_label) == (16.0, True, "rslora alpha=16")


@pytest.mark.parametrize("targets,expected_r", [("qv", 8), ("qkvo", 4), ("mlp", 3), ("all_linear", 2)])
def test_matched_budget_picks_the_rank_per_preset(targets, expected_r):
    # MiniLM: per layer qv = 2*(384+384) = 1536 per unit of rank, mlp = 2*(384+1536) = 3840, all = 6912
    plan = experiment.plan(composed(f"method.targets={targets}", "method.match_budget=qv", "method.r=8"))
    assert plan.method.r == expected_r
    same = experiment.plan(composed(f"method.targets={targets}", f"method.r={expected_r}"))
    assert plan.run_id == same.run_id  # the budget-matched run is that rank's run, not a duplicate
