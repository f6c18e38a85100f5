"""Local GLUE files parse to the counts in ../shared/data/README.md; malformed files fail with file and line."""

from pathlib import Path

import pytest

from lora_sweep import glue
from lora_sweep.errors import UserError
from tests.conftest import SHARED_DATA

GLUE = SHARED_DATA / "glue"
COUNTS = {"sst2": (67_349, 872), "mrpc": (3_668, 408), "cola": (8_551, 1_043), "rte": (2_490, 277), "stsb": (5_749, 1_500)}
POSITIVES = {"sst2": 37_569, "mrpc": 2_474, "cola": 6_023}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_local_files_parse_to_readme_counts(name):
    spec = glue.TASKS[name]
    train = glue.read_tsv(spec, GLUE / spec.folder / "train.tsv")
    dev = glue.read_tsv(spec, GLUE / spec.folder / spec.dev_file)
    assert (len(train), len(dev)) == COUNTS[name]
    if name in POSITIVES:
        assert sum(train["label"]) == POSITIVES[name]
    if name == "rte":  # string labels mapped to the hub's ids
        assert set(train["label"]) == {0, 1}
    if name == "stsb":
        assert min(train["label"]) == 0.0 and max(train["label"]) == 5.0
    assert all(isinstance(t, str) and t for t in train["text_a"][:100])


def test_mrpc_bom_and_quotes_are_kept_verbatim():
    spec = glue.TASKS["mrpc"]
    train = glue.read_tsv(spec, GLUE / spec.folder / "train.tsv")
    assert train[0]["text_a"].startswith('Amrozi accused his brother, whom he called "the witness"')
    assert train[0]["label"] == 1


def _write(tmp_path: Path, folder: str, text: str, name: str = "train.tsv") -> Path:
    (tmp_path / folder).mkdir(exist_ok=True)
    path = tmp_path / folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_wrong_column_count_names_file_and_line(tmp_path):
    path = _write(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(UserError, match=r"train\.tsv line 3: expected 4 tab-separated columns, found 3"):
        glue.read_tsv(glue.TASKS["rte"], path)


def test_unparseable_label_names_file_line_and_allowed_values(tmp_path):
    path = _write(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(UserError, match=r"line 2: label 'maybe' cannot be parsed; allowed: entailment, not_entailment"):
        glue.read_tsv(glue.TASKS["rte"], path)
    path = _write(tmp_path, "SST-2", "sentence\tlabel\ngood\t7\n")
    with pytest.raises(UserError, match=r"line 2: label '7' cannot be parsed; allowed: 0, 1"):
        glue.read_tsv(glue.TASKS["sst2"], path)


def test_empty_and_missing_files(tmp_path):
    path = _write(tmp_path, "SST-2", "sentence\tlabel\n")
    with pytest.raises(UserError, match="has no data rows"):
        glue.read_tsv(glue.TASKS["sst2"], path)
    with pytest.raises(UserError, match="not found; set task.data_dir or GLUE_DIR"):
        glue.read_tsv(glue.TASKS["sst2"], tmp_path / "nowhere.tsv")


@pytest.mark.parametrize("name,header,row,expected", [
    ("qnli", "index\tquestion\tsentence\tlabel", "0\tq?\ts.\tnot_entailment", ("q?", "s.", 1)),
    ("qqp", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\ta?\tb?\t1", ("a?", "b?", 1)),
])
def test_layouts_of_the_larger_tasks(tmp_path, name, header, row, expected):
    spec = glue.TASKS[name]
    path = _write(tmp_path, spec.folder, f"{header}\n{row}\n")
    example = glue.read_tsv(spec, path)[0]
    assert (example["text_a"], example["text_b"], example["label"]) == expected


def test_source_resolution_prefers_the_local_folder(tmp_path, monkeypatch):
    from lora_sweep.settings import compose as compose_settings

    assert glue.resolve_source(compose_settings("task=glue/sst2").task) == "local"
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    assert glue.resolve_source(compose_settings("task=glue/sst2").task) == "hub"
    assert glue.resolve_source(compose_settings("task=glue/sst2", f"task.data_dir={GLUE}").task) == "local"
