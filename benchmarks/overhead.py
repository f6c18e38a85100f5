"""Time the harness's training steps against a bare PyTorch + PEFT loop doing the same steps, in one process.

Same model (the embedded MiniLM), same real SST-2 batches, same LoRA and optimizer settings, same
threads; legs alternate (bare, harness, bare, harness, ...) so drift on a shared machine hits both.
Prints the ratio harness / bare of the time for all steps (target <= 1.05), with and without the
one-step memory probe that every harness run makes by default.

    python benchmarks/overhead.py [--steps 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, get_linear_schedule_with_warmup, set_seed

from lora_sweep import adapters, data, experiment, glue
from lora_sweep.settings import compose
from lora_sweep.train import fit, make_accelerator


def loader(tokens, settings, tokenizer) -> DataLoader:
    generator = torch.Generator().manual_seed(settings.train.seed)
    return DataLoader(tokens["train"], batch_size=settings.train.batch_size, shuffle=True,
                      collate_fn=glue.collator(tokenizer), generator=generator)


def fresh_model(plan):
    set_seed(plan.settings.train.seed)
    return glue.load_model(plan.model_path, plan.settings)


def bare_loop(plan, tokens, tokenizer) -> float:
    """What a user would write by hand: PEFT model, AdamW, linear schedule, the steps."""
    s = plan.settings
    base = fresh_model(plan)
    targets = adapters.check_lora(base, s.method)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=s.method.r, lora_alpha=s.method.effective_alpha,
                                            lora_dropout=s.method.dropout, target_modules=targets,
                                            modules_to_save=adapters.HEADS["bert"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.method.lr, weight_decay=s.train.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(s.train.warmup_ratio * s.train.max_steps), s.train.max_steps)
    model.train()
    batches = iter(loader(tokens, s, tokenizer))
    start = time.perf_counter()
    for _ in range(s.train.max_steps):
        loss = model(**next(batches)).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return time.perf_counter() - start


def harness(plan, tokens, tokenizer, probe: bool) -> float:
    s = dataclasses.replace(plan.settings, train=dataclasses.replace(plan.settings.train, memory_probe=probe))
    model, _ = adapters.apply_method(fresh_model(plan), s.method, glue.TASK_TYPE)
    result = fit(make_accelerator(s.train, plan.device), model, loader(tokens, s, tokenizer), s.method, s.train)
    return result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    settings = compose(f"train.max_steps={args.steps}", "task.max_train_examples=4096", "pair_baseline=false")
    plan = experiment.plan(settings)
    torch.set_num_threads(experiment.resolve_threads(settings.train.threads))
    tokenizer = AutoTokenizer.from_pretrained(plan.model_path)
    tokens, _ = data.prepare(glue, settings, plan.source, tokenizer, f"{settings.model.name_or_path}@{settings.model.revision}")
    timings = {"bare": [], "harness": [], "harness+probe": []}
    for _ in range(args.repeats):
        timings["bare"].append(bare_loop(plan, tokens, tokenizer))
        timings["harness"].append(harness(plan, tokens, tokenizer, probe=False))
        timings["harness+probe"].append(harness(plan, tokens, tokenizer, probe=True))
    bare = statistics.median(timings["bare"])
    print(f"{args.steps} LoRA steps (r={settings.method.r}, targets={settings.method.targets}, batch {settings.train.batch_size}, "
          f"{torch.get_num_threads()} threads), median of {args.repeats}:")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"  {name:14s} {median:7.2f} s  {median / args.steps:6.3f} s/step  ratio to bare {median / bare:5.3f}")


if __name__ == "__main__":
    main()
