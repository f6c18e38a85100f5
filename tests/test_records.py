"""Records on disk: damaged ones are moved aside and re-run, the analysis carries on without them, replaced ones are
kept, and what a record holds is portable and private."""

import errno
import json
import os
import re
from pathlib import Path

import pytest

from lora_sweep import reporting
from lora_sweep import reporting as analysis_cli
from lora_sweep import experiment, files, records
from lora_sweep.errors import UserError
from lora_sweep.settings import compose

REPO = Path(__file__).resolve().parents[1]
TINY = ["task.max_train_examples=32", "task.max_eval_examples=16", "train.max_steps=1", "train.batch_size=8",
        "train.max_seq_len=32", "train.save_adapter=false", "pair_baseline=false", "model.name=tiny",
        "train.threads=1"]  # one thread: a tiny model on two threads of cores shared with other work is many times slower


def settings_for(folder: Path, model_dir: Path, *overrides: str):
    return compose(*TINY, f"model.name_or_path={model_dir}", f"runs_dir={folder / 'runs'}",
                   f"cache_dir={folder / 'cache'}", *overrides)


@pytest.fixture(scope="module")
def done(tiny_bert_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A real done record of a tiny run, and the folder it was written in."""
    folder = tmp_path_factory.mktemp("done")
    return folder, experiment.run(settings_for(folder, tiny_bert_dir))


def damage(folder: Path, rid: str, content: bytes) -> Path:
    path = records.record_path(folder, rid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("tenths", range(10))
def test_a_record_truncated_anywhere_is_moved_aside_and_its_run_counts_as_not_done(tmp_path, done, capsys, tenths):
    _, record = done
    text = records.record_path(done[0] / "runs", record["run_id"]).read_bytes()
    damage(tmp_path, record["run_id"], text[:len(text) * tenths // 10])
    assert records.read_record(tmp_path, record["run_id"]) is None
    assert not records.record_path(tmp_path, record["run_id"]).exists()
    assert len(list((tmp_path / "corrupt").iterdir())) == 1
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1 and f"{record['run_id']}.json is not JSON" in lines[0] and "moved to corrupt/" in lines[0]


WRONG_SHAPES = {
    "a list": b"[]",
    "a string": b'"done"',
    "null": b"null",
    "an empty object": b"{}",
    "no status": json.dumps({"run_id": "RID", "task": "sst2", "model": "m", "method": "lora"}).encode(),
    "another run's record": json.dumps({"run_id": "0" * 16, "status": "done", "task": "sst2", "model": "m", "method": "lora"}).encode(),
    "an unknown status": json.dumps({"run_id": "RID", "status": "finished", "task": "sst2", "model": "m", "method": "lora"}).encode(),
    "not UTF-8": b"\xff\xfe\x00binary",
}


@pytest.mark.parametrize("shape", WRONG_SHAPES)
def test_valid_json_of_the_wrong_shape_is_moved_aside(tmp_path, capsys, shape):
    rid = "0123456789abcdef"
    damage(tmp_path, rid, WRONG_SHAPES[shape].replace(b"RID", rid.encode()))
    assert records.read_record(tmp_path, rid) is None
    assert [p.name.split(".")[0] for p in (tmp_path / "corrupt").iterdir()] == [rid]
    assert len(warnings_in(capsys.readouterr().err)) == 1


@pytest.mark.slow
def test_a_re_run_over_damaged_records_runs_again_and_keeps_the_damage_aside(tmp_path, done, tiny_bert_dir, capsys):
    _, record = done
    settings = settings_for(tmp_path, tiny_bert_dir)
    text = records.record_path(done[0] / "runs", record["run_id"]).read_bytes()
    for content in (text[:len(text) // 2], b"[]"):
        damage(tmp_path / "runs", record["run_id"], content)
        again = experiment.run(settings)
        assert again["run_id"] == record["run_id"] and again["status"] == "done"
        assert records.read_record(tmp_path / "runs", record["run_id"])["status"] == "done"
    assert len(list((tmp_path / "runs" / "corrupt").iterdir())) == 2
    assert capsys.readouterr().out.count(f"{record['run_id']} (tiny sst2 LoRA r=8 alpha=16 targets=qv lr=0.005 seed=0) starting") == 2


@pytest.mark.slow
def test_lora_analyze_lists_every_file_it_skipped_and_carries_on(tmp_path, done, capsys):
    folder, record = done
    runs = tmp_path / "runs"
    runs.mkdir()
    good = records.record_path(folder / "runs", record["run_id"]).read_bytes()
    records.record_path(runs, record["run_id"]).write_bytes(good)
    damage(runs, "a" * 16, good[: len(good) // 3])
    damage(runs, "b" * 16, b"[]")
    damage(runs, "c" * 16, json.dumps({"run_id": "c" * 16}).encode())
    analysis_cli.main([str(tmp_path)])
    captured = capsys.readouterr()
    lines = warnings_in(captured.err)
    assert len(lines) == 3 and all(line.startswith("warning: skipped ") for line in lines)
    assert "aaaaaaaaaaaaaaaa.json is not JSON" in captured.err and "bbbbbbbbbbbbbbbb.json holds [] instead of a record" in captured.err
    assert "cccccccccccccccc.json lacks status, task, model, method" in captured.err
    assert "wrote" in captured.out and record["run_id"] in (tmp_path / "report.md").read_text()
    assert sorted(p.name[0] for p in (runs / "corrupt").iterdir()) == ["a", "b", "c"]


def test_replaced_records_never_overwrite_each_other_in_history(tmp_path, done, monkeypatch):
    _, record = done
    monkeypatch.setattr(records.time, "strftime", lambda *_: "20250101T000000")  # same second, same process
    for _ in range(4):
        records.write_record(tmp_path, record)
    assert len(list((tmp_path / "history").glob("*.json"))) == 3


def test_a_failed_write_leaves_no_temporary_file(tmp_path, done, monkeypatch):
    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", full)
    with pytest.raises(OSError):
        records.write_record(tmp_path, done[1])
    assert list(tmp_path.iterdir()) == []


def test_records_follow_the_umask(tmp_path, done):
    files._umask.cache_clear()
    old = os.umask(0o027)
    try:
        path = records.write_record(tmp_path, done[1])
    finally:
        os.umask(old)
        files._umask.cache_clear()
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_record_names_no_absolute_path_or_host_and_keeps_tracebacks_in_a_log(tmp_path, tiny_bert_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line of the message")

    monkeypatch.setattr(experiment, "fit", boom)
    record = experiment.run(settings_for(tmp_path, tiny_bert_dir, f"task.data_dir={REPO.parent / 'shared' / 'data' / 'glue'}",
                                         f"artifacts_dir={tmp_path / 'saved'}"))
    assert record["status"] == "failed" and record["error"] == "RuntimeError: boom; second line of the message"
    assert "traceback" not in record and "Traceback (most recent call last)" in (tmp_path / "runs" / record["log"]).read_text()
    config = record["config"]
    assert (config["runs_dir"], config["cache_dir"], config["artifacts_dir"]) == (".", "../cache", "../saved")
    assert (tmp_path / "runs" / config["task"]["data_dir"]).resolve() == (REPO.parent / "shared" / "data" / "glue").resolve()
    assert "host" not in record["environment"]
    saved = {k: v for k, v in record.items() if k not in ("identity", "model_name_or_path")}  # the model path is the user's id of the model
    saved["config"] = {k: v for k, v in config.items() if k != "model"}
    assert str(tmp_path) not in json.dumps(saved)


@pytest.mark.slow
def test_artifacts_go_where_artifacts_dir_says_and_the_record_points_there(tmp_path, tiny_bert_dir):
    record = experiment.run(settings_for(tmp_path, tiny_bert_dir, "train.save_adapter=true"))
    assert record["artifact"]["path"] == f"artifacts/{record['run_id']}"
    assert (tmp_path / "runs" / record["artifact"]["path"] / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "runs"]  # nothing outside the folders named


@pytest.mark.slow
def test_a_killed_analysis_leaves_the_earlier_report_and_tables(tmp_path, done, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    record = done[1]
    records.record_path(runs, record["run_id"]).write_bytes(records.record_path(done[0] / "runs", record["run_id"]).read_bytes())
    first = reporting.write(runs).read_text()
    tables = {p.name: p.read_bytes() for p in (tmp_path / "tables").iterdir()}
    records.write_record(runs, {**record, "run_id": "f" * 16, "seed": 1})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reporting.report, "_runs_not_done", killed)  # late in the analysis: tables and plots are written
    with pytest.raises(KeyboardInterrupt):
        reporting.write(runs)
    assert (tmp_path / "report.md").read_text() == first and "f" * 16 not in first
    assert {p.name: p.read_bytes() for p in (tmp_path / "tables").iterdir()} == tables
    assert not list(tmp_path.glob(".analysis-*"))
    monkeypatch.undo()
    assert "f" * 16 in reporting.write(runs).read_text() and not list(tmp_path.glob(".analysis-*"))


ABSOLUTE = re.compile(r'"(/|[A-Za-z]:\\\\|~/)[^"]*"')


def test_no_committed_record_holds_an_absolute_path_or_a_host_name():
    found = sorted((REPO / "results").glob("**/*.json"))
    assert found
    for path in found:
        text = path.read_text()
        assert not ABSOLUTE.search(text), f"{path.relative_to(REPO)}: {ABSOLUTE.search(text).group(0)}"
        assert '"host"' not in text, f"{path.relative_to(REPO)} names its host"


def test_lora_analyze_that_cannot_write_says_so_in_one_line(tmp_path, done, capsys, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    record = done[1]
    records.record_path(runs, record["run_id"]).write_bytes(records.record_path(done[0] / "runs", record["run_id"]).read_bytes())

    def refuse(dir, **kwargs):  # chmod means nothing to root: the refusal anyone else gets, simulated
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(reporting.report.tempfile, "mkdtemp", refuse)
    with pytest.raises(SystemExit) as exit_info:
        analysis_cli.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {tmp_path}: Permission denied; point runs_dir, "
                                                            "cache_dir or artifacts_dir at a folder you can write"]


def test_results_dir_is_read_as_runs_dir_with_one_warning_line(capsys):
    """The old name of the runs folder still works for a release: the same folders, and a line that says what to use."""
    old = compose("results_dir=elsewhere/runs")
    assert (old.runs_dir, old.results_dir, old.artifacts_dir) == ("elsewhere/runs", None, "elsewhere/runs/artifacts")
    assert capsys.readouterr().err.splitlines() == [
        "warning: results_dir is deprecated and will be removed; use runs_dir=elsewhere/runs (the folder of the run records)"]
    with pytest.raises(UserError, match="results_dir=a and runs_dir=b disagree"):
        compose("results_dir=a", "runs_dir=b")


def test_lora_analyze_takes_the_results_folder_or_its_runs_folder(tmp_path, done):
    """`lora-analyze results/runs` (the folder a sweep was told to write to) and `lora-analyze results` are the same."""
    assert records.runs_folder(done[0]) == done[0] / "runs"
    assert records.runs_folder(done[0] / "runs") == done[0] / "runs"
    assert records.runs_folder(tmp_path / "nothing") == tmp_path / "nothing" / "runs"  # its error names the runs folder


def test_the_analysis_imports_only_the_base_modules():
    """Dependencies run one way: the analysis reads records and never reaches the run side or the model side."""
    import ast

    base = {"lora_sweep.records", "lora_sweep.metrics", "lora_sweep.identity", "lora_sweep.errors", "lora_sweep.settings"}
    found = {}
    for path in (Path(records.__file__).parent / "analysis").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_sweep"):
                modules = [node.module] if node.module != "lora_sweep" else [f"lora_sweep.{a.name}" for a in node.names]
                found.update({m: path.name for m in modules if not m.startswith("lora_sweep.analysis")})
            elif isinstance(node, ast.Import):
                found.update({a.name: path.name for a in node.names if a.name.startswith("lora_sweep") and
                              not a.name.startswith("lora_sweep.analysis")})
    assert set(found) <= base, {m: f for m, f in found.items() if m not in base}
    assert "lora_sweep.records" in found  # the test reads imports at all
