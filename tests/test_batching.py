"""lora_sweep.batching: length-grouped training plans, length-sorted evaluation, and the token counts both report."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lora_sweep import batching, distributed, evaluation, glue
from lora_sweep.settings import BATCHING, MethodSettings, TrainSettings, compose
from lora_sweep.train import fit
from tests.conftest import SHARED_DATA

SST2 = SHARED_DATA / "glue" / "SST-2"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir):
    return AutoTokenizer.from_pretrained(tiny_bert_dir)  # the embedded MiniLM's tokenizer


@pytest.fixture(scope="module")
def sst2_lengths(tokenizer) -> list[int]:
    """Token counts (max 64, as the default run) of the first 4,000 real SST-2 training sentences."""
    lines = SST2.joinpath("train.tsv").read_text(encoding="utf-8").splitlines()[1:4001]
    sentences = [line.rsplit("\t", 1)[0] for line in lines]
    return [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=64)["input_ids"]]


def sst2_dataset(tokenizer, split: str, n: int) -> datasets.Dataset:
    """n real SST-2 examples tokenized as glue.build does, with their `id`."""
    rows = glue.read_tsv(glue.TASKS["sst2"], SST2 / f"{split}.tsv").select(range(n)).add_column("id", list(range(n)))
    return rows.map(lambda b: tokenizer(b["text_a"], truncation=True, max_length=64), batched=True, remove_columns=["text_a"])


def epochs_of(batches: list[list[int]], n: int) -> list[list[int]]:
    """The plan's indices cut into consecutive passes of n examples."""
    flat = [i for b in batches for i in b]
    return [flat[k:k + n] for k in range(0, len(flat), n)]


@pytest.mark.parametrize("mode", ["grouped", "random"])
def test_every_example_once_per_epoch_across_a_wrap(mode):
    lengths = [int(x) for x in np.random.default_rng(0).integers(3, 60, size=250)]
    plan = batching.train_plan(lengths, batch_size=8, steps=20, grad_accum=2, seed=3, batching=mode, min_micro_batch=4)
    assert len(plan.batches) == 40 and all(1 <= len(b) <= 8 for b in plan.batches)
    first, second = epochs_of(plan.batches, 250)  # 32 micro-batches (the last of 2) per epoch, then 8 of the next
    assert sorted(first) == list(range(250))
    assert len(second) == 8 * 8 and len(set(second)) == len(second)  # a fresh pass: no example twice
    first_epoch = plan.batches[:32]
    assert not any(b in first_epoch for b in plan.batches[32:])  # a new permutation: none of the first epoch's batches again
    assert sum(len(b) for b in plan.batches[:32]) == 250  # no batch straddles two epochs
    assert len(plan.batches[31]) == 250 - 31 * 8


def test_grouped_batches_are_length_homogeneous_on_real_sst2(sst2_lengths):
    kwargs = dict(batch_size=32, steps=100, grad_accum=1, seed=0, min_micro_batch=4)
    grouped = batching.token_counts(batching.train_plan(sst2_lengths, batching="grouped", **kwargs).batches, sst2_lengths)
    random = batching.token_counts(batching.train_plan(sst2_lengths, batching="random", **kwargs).batches, sst2_lengths)
    assert random["padding_fraction"] > 0.5  # SST-2's lengths vary a lot: random batches compute mostly padding (0.67)
    assert grouped["padding_fraction"] < 0.1  # 0.07
    assert grouped["padding_fraction"] < random["padding_fraction"] / 5


def test_the_seed_decides_the_order(sst2_lengths):
    def batches(seed, mode="grouped"):
        return batching.train_plan(sst2_lengths, 32, 50, 1, seed, mode, 4).batches

    for mode in BATCHING:
        assert batches(0, mode) == batches(0, mode) and batches(0, mode) != batches(1, mode)
    assert batches(0, "grouped") != batches(0, "random") != batches(0, "sorted")


@pytest.mark.parametrize("grad_accum", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_the_probe_step_holds_the_longest_micro_batch_and_is_never_step_one(sst2_lengths, seed, grad_accum):
    plan = batching.train_plan(sst2_lengths, batch_size=16, steps=30, grad_accum=grad_accum, seed=seed, batching="grouped", min_micro_batch=4)
    cost = [batching.padded_tokens(b, sst2_lengths) for b in plan.batches]
    probed = cost[(plan.probe_step - 1) * grad_accum:plan.probe_step * grad_accum]
    assert max(probed) == max(cost) == probed[-1]  # the probe wraps the step's last micro-batch: its longest
    assert plan.probe_step > 1
    # the sampler puts the longest example first: the longest batch was at step 1 and was moved to step 2
    unswapped = batching.train_plan(sst2_lengths, batch_size=16, steps=1, grad_accum=grad_accum, seed=seed, batching="grouped", min_micro_batch=4)
    assert unswapped.probe_step == 1 and plan.probe_step == 2
    assert plan.batches[grad_accum:2 * grad_accum] == unswapped.batches  # moved whole, its micro-batches in order
    flat = Counter(i for b in plan.batches for i in b)
    assert max(flat.values()) == 1  # 30 x 16 x grad_accum <= 4,000: still within the first epoch, nothing repeated


def test_the_probe_step_on_random_batches_is_the_costliest_one():
    lengths = [10] * 64
    lengths[5] = 50  # one long example: whichever step holds it is the costliest
    plan = batching.train_plan(lengths, batch_size=8, steps=8, grad_accum=1, seed=0, batching="random", min_micro_batch=4)
    holder = next(s for s, b in enumerate(plan.batches, start=1) if 5 in b)
    assert plan.probe_step == holder > 1


def test_token_counts_add_up():
    lengths = [3, 7, 5, 5, 9, 1]
    counts = batching.token_counts([[0, 1], [2, 3, 4], [5]], lengths)
    assert counts["real_tokens"] == 30
    assert counts["computed_tokens"] == 2 * 7 + 3 * 9 + 1 * 1 == 42
    assert counts["padding_fraction"] == pytest.approx(1 - 30 / 42)
    assert batching.token_counts([], lengths)["padding_fraction"] == 0.0


def test_eval_order_sorts_longest_first_and_covers_every_example_once():
    lengths = [4, 9, 1, 9, 6, 2, 8]
    batches = batching.eval_order(lengths, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(7)) and [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_sorted_evaluation_gives_the_outputs_and_metrics_of_one_example_at_a_time(tiny_bert_dir, tokenizer):
    dev = sst2_dataset(tokenizer, "dev", 60)
    lengths = [len(ids) for ids in dev["input_ids"]]
    assert [i for b in batching.eval_order(lengths, 16) for i in b] != list(range(60))  # sorting really reorders
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    accelerator, collate = distributed.make_accelerator("cpu", "none"), glue.collator(tokenizer)
    with torch.no_grad():  # a random tiny BERT's logits differ between examples by ~1e-4: spread and centre them
        model.classifier.weight.mul_(1000.0)
        model.classifier.bias.sub_(model(**batching.load_batch(dev, list(range(60)), collate, "cpu")).logits.median(dim=0).values)
    outputs, tokens = evaluation.predict(accelerator, model, glue, dev, collate, batch_size=16)
    with torch.no_grad():
        reference = np.concatenate([glue.batch_outputs(model, batching.load_batch(dev, [i], collate, "cpu")).numpy()
                                    for i in range(len(dev))])
    assert outputs.shape == (60, 2)
    np.testing.assert_allclose(outputs, reference, atol=1e-4, rtol=0)
    order = [i for b in batching.eval_order(lengths, 16) for i in b]
    assert np.abs(reference[order] - reference).max() > 100 * 1e-4  # outputs left in sorted order would fail above
    assert 0 < (reference.argmax(axis=1) == 1).mean() < 1  # both classes predicted: the accuracy check below can fail
    assert tokens == batching.token_counts(batching.eval_order(lengths, 16), lengths)
    unsorted = batching.token_counts([list(range(i, min(i + 16, 60))) for i in range(0, 60, 16)], lengths)
    assert tokens["real_tokens"] == unsorted["real_tokens"] == sum(lengths)
    assert tokens["computed_tokens"] < 0.75 * unsorted["computed_tokens"]

    settings = compose(f"model.name_or_path={tiny_bert_dir}", "train.eval_batch_size=16")
    split = evaluation.evaluate_split(accelerator, model, glue, dev, collate, settings)
    labels = np.asarray(dev["label"])
    expected, primary = glue.split_metrics(reference, labels, settings)
    assert primary == split["primary_metric"] == "accuracy"
    assert split["metrics"] == pytest.approx(expected)
    assert split["metrics"]["accuracy"] == pytest.approx(np.mean(reference.argmax(axis=1) == labels))
    assert split["examples"]["ids"] == list(range(60)) and split["examples"]["labels"] == labels.tolist()
    np.testing.assert_allclose(split["examples"]["outputs"], reference, atol=1e-4, rtol=0)
    assert split["tokens"] == tokens


def test_fit_counts_the_tokens_of_the_plan(tiny_bert_dir, tokenizer):
    train_set = sst2_dataset(tokenizer, "train", 40).remove_columns("id")
    lengths = [len(ids) for ids in train_set["input_ids"]]
    plan = batching.train_plan(lengths, batch_size=8, steps=4, grad_accum=2, seed=0, batching="grouped", min_micro_batch=4)  # wraps once
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    train = TrainSettings(batch_size=8, grad_accum=2, max_steps=4, memory_probe=False, log_every=1)
    result = fit(distributed.make_accelerator("cpu", "none"), model, train_set, glue.collator(tokenizer), plan, MethodSettings(name="full", lr=1e-4), train)
    expected = batching.token_counts(plan.batches, lengths)
    assert result.steps == 4 and result.samples == sum(len(b) for b in plan.batches) == 64
    assert result.real_tokens == expected["real_tokens"]
    assert result.computed_tokens == expected["computed_tokens"]
    assert result.computed_tokens > result.real_tokens


def _all_cuts(order: list[int], smallest: int, largest: int):
    """Every way to cut `order` into consecutive pieces of smallest..largest (brute force, small inputs only)."""
    if not order:
        yield []
        return
    for size in range(smallest, min(largest, len(order)) + 1):
        for rest in _all_cuts(order[size:], smallest, largest):
            yield [order[:size], *rest]


@pytest.mark.parametrize("seed", range(20))
def test_sorted_cut_points_compute_the_fewest_padded_tokens(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(1, 64, size=int(rng.integers(6, 13)))]
    smallest, largest = int(rng.integers(1, 4)), int(rng.integers(4, 9))
    micros = batching.cut_sorted(list(range(len(lengths))), lengths, smallest, largest)
    assert sorted(i for m in micros for i in m) == list(range(len(lengths)))
    assert all(smallest <= len(m) <= largest for m in micros)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = min(sum(batching.padded_tokens(m, lengths) for m in cut) for cut in _all_cuts(order, smallest, largest))
    assert sum(batching.padded_tokens(m, lengths) for m in micros) == best


def test_sorted_plans_take_random_batches_examples_and_cut_most_padding_on_real_sst2(sst2_lengths):
    kwargs = dict(batch_size=32, steps=100, grad_accum=1, seed=0, min_micro_batch=4)
    random, sorted_ = (batching.train_plan(sst2_lengths, batching=mode, **kwargs) for mode in ("random", "sorted"))
    for step_random, step_sorted in zip(random.steps, sorted_.steps):
        assert sorted(i for b in step_random for i in b) == sorted(i for b in step_sorted for i in b)
        assert all(4 <= len(b) <= 32 for b in step_sorted)
    real = 1 - batching.token_counts(sorted_.batches, sst2_lengths)["padding_fraction"]
    assert real > 0.8  # 0.88 on SST-2 (random batches: 0.33)
    assert 1 - batching.token_counts(random.batches, sst2_lengths)["padding_fraction"] < 0.4


def test_a_short_step_that_no_cut_fits_falls_back_to_whole_batches():
    lengths = [5, 9, 2, 7, 3, 8]  # 6 examples in pieces of exactly 4: no cut fits
    assert batching.cut_sorted(list(range(6)), lengths, 4, 4) == [[1, 5, 3, 0], [4, 2]]
