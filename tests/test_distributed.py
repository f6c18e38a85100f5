"""One run over two CPU processes (torchrun, gloo, DDP) against the same run in one process, and a failing process.

The two-process runs are started by torchrun through a small launcher script that records which process enters the
run's lock and, when asked, makes one process fail in the middle of training.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest

from lora_sweep import distributed, experiment, train
from lora_sweep.errors import UserError
from lora_sweep.settings import TrainSettings, compose
from tests.test_sweep import sweep

ROOT = Path(__file__).resolve().parents[1]
# 64 examples, 21 of them the tuning split: 43 to train on, so each epoch ends with a batch of 3 (split 1 + 2 over two
# processes), and evaluation batches of 7 end with one of 5 (2 + 3) on the tuning split and of 6 on dev.
RUN = ["task.max_train_examples=64", "task.tune_examples=21", "task.max_eval_examples=34", "train.batch_size=8",
       "train.max_steps=6", "train.log_every=1", "train.eval_batch_size=7", "train.max_seq_len=32", "train.threads=1",
       "train.save_adapter=false", "model.name=tiny"]
# Two processes sum their gradients in another order than one process does: float32 rounding, nothing more.
LOSS_RTOL, OUTPUT_ATOL = 1e-5, 1e-4

LAUNCHER = textwrap.dedent("""
    import contextlib, os
    from lora_sweep import cli, records, train

    locked, lock = os.environ["LOCK_LOG"], records.run_lock

    @contextlib.contextmanager
    def logged_lock(*args):
        with open(locked, "a") as log:
            log.write(os.environ["RANK"] + "\\n")
        with lock(*args):
            yield

    records.run_lock = logged_lock
    if os.environ.get("FAIL_RANK") == os.environ["RANK"]:
        batches, load = [], train.load_batch

        def failing_load(*args):
            batches.append(1)
            if len(batches) == 3:
                raise RuntimeError("injected failure in one process")
            return load(*args)

        train.load_batch = failing_load
    cli.main()
""")


@pytest.fixture(scope="module")
def no_dropout_bert(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT without dropout: each process draws its own dropout masks, so only a model without dropout
    trains the same example by example in one process and in two (with dropout, the same in distribution)."""
    folder = tmp_path_factory.mktemp("no-dropout-bert")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert_dir / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    return folder


def launch(tmp_path: Path, model_dir: Path, *overrides: str, fail_rank: int | None = None) -> subprocess.CompletedProcess:
    """`lora-sweep` as one run of two processes under torchrun."""
    (tmp_path / "launch.py").write_text(LAUNCHER)
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "LOCK_LOG": str(tmp_path / "lock_holders"), **({"FAIL_RANK": str(fail_rank)} if fail_rank is not None else {})}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(tmp_path / "launch.py"),
            f"model.name_or_path={model_dir}", f"cache_dir={tmp_path / 'cache'}", *RUN, *overrides]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def records_in(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in folder.glob("*.json")]


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path, no_dropout_bert, one_thread):
    result = launch(tmp_path, no_dropout_bert, "method=full", "train.distributed=ddp", f"runs_dir={tmp_path / 'two'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [two] = records_in(tmp_path / "two")
    assert (tmp_path / "lock_holders").read_text() == "0\n"  # one process held the run's lock (and wrote the one record)
    one = experiment.run(compose(f"model.name_or_path={no_dropout_bert}", f"cache_dir={tmp_path / 'cache'}", *RUN,
                                 "method=full", f"runs_dir={tmp_path / 'one'}"))
    assert two["run_id"] == one["run_id"] and two["status"] == one["status"] == "done"
    assert two["processes"] == {"mode": "ddp", "world_size": 2, "per_process_batch": 4, "grad_accum": 1, "global_batch": 8}
    assert one["processes"]["world_size"] == 1

    steps, losses = zip(*two["loss_curve"])
    assert list(steps) == [s for s, _ in one["loss_curve"]] == list(range(1, 7))
    np.testing.assert_allclose(losses, [loss for _, loss in one["loss_curve"]], rtol=LOSS_RTOL)
    # the same examples, counted over both processes; each half batch is padded to its own longest example
    assert two["tokens"]["train"]["real_tokens"] == one["tokens"]["train"]["real_tokens"]
    assert two["tokens"]["train"]["computed_tokens"] < one["tokens"]["train"]["computed_tokens"]
    for split in ("dev", "tune"):  # every example evaluated once, in the split's order
        assert two["examples"][split]["ids"] == one["examples"][split]["ids"]
        assert len(set(two["examples"][split]["ids"])) == len(two["examples"][split]["ids"])
        np.testing.assert_allclose(two["examples"][split]["outputs"], one["examples"][split]["outputs"], atol=OUTPUT_ATOL)
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-6)

    peaks = two["memory"]["per_process_peak_bytes"]
    assert len(peaks) == 2 and two["memory"]["peak_bytes"] == max(peaks)
    # DDP: each process holds all weights, gradients and AdamW state, and DDP's buckets, one more copy of the gradients
    split, alone = two["memory"]["split_bytes"], one["memory"]["split_bytes"]
    assert {k: split[k] for k in ("weights", "gradients", "optimizer")} == {k: alone[k] for k in ("weights", "gradients", "optimizer")}
    assert two["memory"]["peak_bytes"] - one["memory"]["peak_bytes"] == split["gradients"]

    # a LoRA run in one process pairs with the baseline the two processes trained
    lora = experiment.run(compose(f"model.name_or_path={no_dropout_bert}", f"cache_dir={tmp_path / 'cache'}", *RUN,
                                  f"runs_dir={tmp_path / 'two'}"))
    assert lora["status"] == "done" and lora["baseline_run_id"] == two["run_id"] and lora["baseline_status"] == "done"


@pytest.mark.slow
def test_a_failing_process_leaves_a_failed_record(tmp_path, tiny_bert_dir):
    result = launch(tmp_path, tiny_bert_dir, "method=full", "train.distributed=ddp", f"runs_dir={tmp_path / 'runs'}", fail_rank=1)
    assert result.returncode != 0
    [record] = records_in(tmp_path / "runs")
    assert record["status"] == "failed", record["status"]
    assert "injected failure in one process" in (tmp_path / "runs" / record["log"]).read_text()


def test_several_processes_need_a_distributed_mode_and_a_batch_they_can_share(monkeypatch):
    with pytest.raises(UserError, match="train.distributed=ddp but this run is one process: start it with torchrun"):
        distributed.start(TrainSettings(distributed="ddp"), "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="started as 2 processes but train.distributed=none"):
        distributed.start(TrainSettings(), "cpu")
    with pytest.raises(UserError, match="train.batch_size=7 cannot be shared out evenly among 2 processes"):
        distributed.start(TrainSettings(batch_size=7, distributed="ddp"), "cpu")
    with pytest.raises(UserError, match="train.distributed=fsdp needs GPUs"):
        distributed.start(TrainSettings(distributed="fsdp"), "cpu")
    with pytest.raises(UserError, match="task.generate_examples=4 is not supported with several processes"):
        distributed.start(TrainSettings(distributed="ddp"), "cpu", generate_examples=4)


def test_fsdp_composes_into_a_sharding_plugin():
    """accelerate runs FSDP on GPUs only: what can be checked here is the configuration (the GPU run: docs/configuration.md)."""
    settings = compose("method=full", "train.distributed=fsdp")
    plugin = distributed.fsdp_plugin()
    assert settings.train.distributed == "fsdp" and plugin.fsdp_version == 2 and plugin.reshard_after_forward
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    with pytest.raises(UserError, match="train.distributed='zero' is not allowed; use none, ddp, fsdp"):
        compose("train.distributed=zero")


@pytest.mark.slow
def test_a_submitit_job_of_two_tasks_is_one_run_of_two_processes(tmp_path, tiny_bert_dir):
    """The SLURM path on this machine: submitit's local executor starts the job's two tasks, which find their
    rank and world size in submitit's variables as they would in SLURM's."""
    result = sweep(tmp_path, tiny_bert_dir, "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "method=full",
                   "train.distributed=ddp", "train.threads=1", "train.seed=0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [record] = records_in(tmp_path / "runs")
    assert record["status"] == "done" and record["processes"]["world_size"] == 2
    assert len(record["memory"]["per_process_peak_bytes"]) == 2


@pytest.mark.parametrize("batch,parts", [([5, 6, 7], [([5], 2 / 3), ([6, 7], 4 / 3)]),
                                         ([9], [([9], 0.0), ([9], 2.0)])])  # rank 0 has nothing: it computes at weight 0
def test_a_batch_is_shared_out_with_weights_that_keep_its_mean_loss(monkeypatch, batch, parts):
    for rank, expected in enumerate(parts):
        monkeypatch.setattr(distributed, "processes", lambda rank=rank: (rank, 2))
        assert distributed.shard(batch) == expected
    # the mean over processes of weight x (the part's mean loss) is the batch's mean loss
    losses = {5: 1.0, 6: 2.0, 7: 6.0, 9: 4.0}
    per_process = [weight * np.mean([losses[i] for i in part]) for part, weight in parts]
    assert np.mean(per_process) == pytest.approx(np.mean([losses[i] for i in batch]))


def test_a_token_averaged_loss_is_shared_out_by_tokens(monkeypatch):
    """A causal LM's loss is a mean over the batch's predicted tokens: each process's weight is its share of those."""
    batch, tokens = [0, 1, 2], [1, 3, 4]  # per-example (token losses) below: the batch's mean is over all 8 tokens
    token_losses = {0: [2.0], 1: [1.0, 1.0, 1.0], 2: [5.0, 5.0, 5.0, 5.0]}
    per_process = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "processes", lambda rank=rank: (rank, 2))
        part, weight = distributed.shard(batch, tokens)
        per_process.append(weight * np.mean([v for i in part for v in token_losses[i]]))
    assert np.mean(per_process) == pytest.approx(np.mean([v for i in batch for v in token_losses[i]]))
    labels = [[-100, -100, 7], [-100, 7, 7, 7], [-100, 7, 7, 7, 7]]  # a causal LM predicts label t from token t-1
    assert train.loss_units(datasets.Dataset.from_dict({"labels": labels}), [0, 1, 2]) == tokens
