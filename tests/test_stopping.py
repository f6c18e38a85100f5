"""Stopping a run or a sweep: Ctrl-C and SIGTERM end it with one line and exit 130 / 143, the run in progress leaves
no record, and a sweep's parallel workers end with it; a run waiting for another process's lock says so."""

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from lora_sweep import records

TINY = ["train.batch_size=8", "task.max_train_examples=64", "task.max_eval_examples=32", "task.tune_examples=16",
        "train.threads=1", "train.save_adapter=false", "train.memory_probe=false", "train.forgetting_examples=0"]
STOPPED = "the run in progress left no record; finished runs keep theirs, and the same command resumes"


@pytest.mark.slow
def test_ctrl_c_during_a_run_is_one_line_exit_130_and_no_record(tmp_path, tiny_bert_dir):
    """A single run (no sweep) gets Ctrl-C while it trains: one line, exit 130, no record. In a process of its own: a
    signal raised inside the test process can reach pytest's own handler and end the whole session."""
    out = tmp_path / "out.log"
    command = [sys.executable, "-m", "lora_sweep", "pair_baseline=false", f"model.name_or_path={tiny_bert_dir}",
               f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "train.max_steps=100000", *TINY]
    with open(out, "w") as stdout, open(tmp_path / "err.log", "w") as stderr:
        run = subprocess.Popen(command, stdout=stdout, stderr=stderr, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 240
        while " starting" not in out.read_text():
            assert run.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
            time.sleep(0.5)
        time.sleep(2)  # into training
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(timeout=60) == 130
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    printed = (tmp_path / "err.log").read_text()  # the line may follow the progress bar's last redraw
    assert printed.count("stopped by") == 1 and f"stopped by SIGINT: {STOPPED}\n" in printed
    assert "Traceback" not in printed and "error:" not in printed
    assert not list(tmp_path.glob("runs/*.json")) and not list(tmp_path.glob("runs/.*.tmp"))


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("signum,whole_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_stopped_parallel_sweep_ends_its_workers_and_writes_no_record(tmp_path, tiny_bert_dir, signum, whole_group):
    """SIGTERM to the sweep's process alone (a scheduler, `kill`), or Ctrl-C (SIGINT to the terminal's whole process
    group): the joblib workers end with it, so no record is written after the stop."""
    out = tmp_path / "out.log"
    command = [sys.executable, "-m", "lora_sweep", "-m", "hydra/launcher=local", "method.r=1,2", "pair_baseline=false",
               f"model.name_or_path={tiny_bert_dir}", f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
               "train.max_steps=100000", *TINY]
    with open(out, "w") as stdout, open(tmp_path / "err.log", "w") as stderr:
        sweep = subprocess.Popen(command, stdout=stdout, stderr=stderr, start_new_session=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 240
        while out.read_text().count(" starting") < 2:  # both workers are training
            assert sweep.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
            time.sleep(0.5)
        workers = psutil.Process(sweep.pid).children(recursive=True)
        assert len(workers) >= 2
        (os.killpg if whole_group else os.kill)(sweep.pid, signum)
        assert sweep.wait(timeout=60) == 128 + signum
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    time.sleep(2)  # a worker still alive would be seen now
    assert [w.pid for w in workers if alive(w)] == []
    assert not list(tmp_path.glob("runs/**/*.json"))
    lines = [line for line in (tmp_path / "err.log").read_text().replace("\r", "\n").splitlines() if line.startswith("stopped by")]
    assert lines == [f"stopped by {signal.Signals(signum).name}: {STOPPED}"]


def test_a_run_waiting_for_another_process_lock_says_so(tmp_path, capsys):
    lock = tmp_path / "runs" / ".locks" / "abc.lock"
    lock.parent.mkdir(parents=True)
    entered = threading.Event()

    def run() -> None:
        with records.run_lock(tmp_path / "runs", "abc"):
            entered.set()

    with open(lock, "w") as other:  # another open file: flock treats it as another process's
        fcntl.flock(other, fcntl.LOCK_EX)
        waiting = threading.Thread(target=run)
        waiting.start()
        time.sleep(0.5)
        assert not entered.is_set()
        fcntl.flock(other, fcntl.LOCK_UN)
    waiting.join(timeout=10)
    assert entered.is_set()
    assert capsys.readouterr().out == f"[lora-sweep] waiting for .locks/abc.lock in {tmp_path / 'runs'}: another process is running abc\n"


def test_a_run_that_gets_its_lock_at_once_says_nothing(tmp_path, capsys):
    with records.run_lock(tmp_path / "runs", "abc"):
        pass
    assert capsys.readouterr().out == ""
