"""One experiment from validated settings to one record: the path a rank takes from the command line to a plot.

run() ensures the paired full-FT baseline, skips work already done, holds the run's lock, and writes
exactly one record whatever happens (done, diverged or failed), atomically.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, set_seed

from lora_sweep import adapters, batching, data, distributed, forgetting, identity, memory, records
from lora_sweep.errors import UserError, file_errors, one_line
from lora_sweep.evaluation import evaluate_split
from lora_sweep.hub import model_source, resolve_model
from lora_sweep.records import CurvePoint, Memory, RunRecord, Times
from lora_sweep.runtime import resolve_device, resolve_threads
from lora_sweep.settings import MethodSettings, Settings
from lora_sweep.task_family import TaskFamily, family_for
from lora_sweep.tracking import Tracker
from lora_sweep.train import fit, loss_trend

@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run is before it runs: its id and the facts its id depends on."""

    settings: Settings
    method: MethodSettings  # as trained: the rank resolved where method.match_budget asks for one
    family: TaskFamily
    model_path: str
    device: str
    source: str
    identity: dict[str, Any]  # lora_sweep.identity: the one definition of what this experiment is
    run_id: str


def plan(settings: Settings) -> Plan:
    """Resolve and check everything a run needs before it trains: model, data source, device, targets and rank."""
    family = family_for(settings)
    path = resolve_model(settings.model.name_or_path, settings.cache_dir)
    device = resolve_device(settings.train.device)
    source = family.resolve_source(settings.task)
    skeleton = family.load_model(path, settings, meta=True)
    _check_positions(skeleton.config, settings)
    method, targets, ranks = settings.method, None, None
    if method.name != "full":
        lora = adapters.resolve_lora(skeleton, method)
        method, targets, ranks = lora.method, lora.targets, lora.method.rank_pattern
    ident = identity.experiment_identity(settings, method, targets, model_source(settings.model.name_or_path, path, settings.model.revision),
                                         family.data_identity(settings.task, source), device, ranks)
    return Plan(settings, method, family, path, device, source, ident, identity.run_id(ident))


def _check_positions(config, settings: Settings) -> None:
    """Examples longer than the model's position embeddings train, then crash in evaluation on a long example."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions and settings.train.max_seq_len > positions:
        raise UserError(f"train.max_seq_len={settings.train.max_seq_len} is longer than the model's {positions} positions "
                        f"(max_position_embeddings in its config.json); use train.max_seq_len <= {positions}")


def baseline_settings(settings: Settings) -> Settings:
    """The full-FT run a LoRA run is compared with: same model, task, seed and training budget."""
    return dataclasses.replace(settings, method=settings.baseline, pair_baseline=False)


def run(settings: Settings, parallel_jobs: int = 1, sweep: str | None = None) -> RunRecord:
    """Run one experiment (and first its baseline) unless a `done` record exists; return its record.

    `sweep` names the sweep this run belongs to: a run already attempted in this sweep (a baseline shared by
    several LoRA runs) is not attempted again, whatever its status or `rerun`; in a later sweep it may be.
    A run of several processes (train.distributed) is run by all of them; process 0 alone holds its lock, decides
    whether it is skipped and writes its record."""
    p = plan(settings)
    distributed.start(settings.train, p.device, settings.task.generate_examples)
    baseline = None
    if settings.method.name != "full" and settings.pair_baseline:
        baseline = run(baseline_settings(settings), parallel_jobs, sweep)
    with distributed.main_only(records.run_lock(settings.runs_dir, p.run_id)):
        existing = distributed.from_main(records.read_record(settings.runs_dir, p.run_id) if distributed.is_main() else None)
        if existing and ((sweep and existing.get("sweep") == sweep) or (existing["status"] == "done" and not settings.rerun)):
            print(f"[lora-sweep] {p.run_id} ({describe(p)}) already {existing['status']}: skipped")
            return existing
        print(f"[lora-sweep] {p.run_id} ({describe(p)}) starting")
        record = execute(p, baseline, resolve_threads(settings.train.threads, parallel_jobs), sweep)
        if distributed.is_main():
            records.write_record(settings.runs_dir, record)
    return record


def adapter_label(method: MethodSettings) -> str:
    """How a run's adapter is named in logs: LoRA, LoRA (EVA init) or AdaLoRA."""
    return {"adalora": "AdaLoRA"}.get(method.name, "LoRA (EVA init)" if method.eva else "LoRA")


def describe(p: Plan) -> str:
    settings, m = p.settings, p.method
    what = "full FT" if m.name == "full" else f"{adapter_label(m)} r={m.r} {m.scaling_label} targets={m.targets}"
    return f"{settings.model.name} {settings.task.name} {what} lr={m.lr:g} seed={settings.train.seed}"


def _base_record(p: Plan, baseline: RunRecord | None, threads: int, sweep: str | None) -> RunRecord:
    s, m = p.settings, p.method
    lora = m.name != "full"
    return {
        "schema_version": records.SCHEMA_VERSION,
        "run_id": p.run_id,
        "config_id": identity.config_id(p.identity),
        "context_id": identity.context_id(p.identity),
        "sweep": sweep,
        "status": "running",
        "error": None,
        "diverged_at_step": None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": s.model.name,
        "model_name_or_path": records.portable_model(s.model.name_or_path, s.runs_dir),
        "task": s.task.name,
        "task_family": s.task.family,
        "data_source": p.source,
        "method": m.name,
        "r": m.r if lora else None,
        "alpha": m.effective_alpha if lora else None,
        "alpha_policy": ("rslora" if m.use_rslora else m.alpha_policy) if lora else None,
        "scaling": m.scaling_label if lora else None,
        "targets": (m.targets if isinstance(m.targets, str) else list(m.targets)) if lora else None,
        "match_budget": s.method.match_budget if lora else None,
        "rank_pattern": m.rank_pattern if lora else None,  # each adapted module's rank, where not all are `r`
        "rank_pattern_source": (Path(s.method.rank_pattern).stem if isinstance(s.method.rank_pattern, str) else "inline")
                               if lora and m.rank_pattern else None,  # a preset's name, or a file's
        "lr": m.lr,
        "seed": s.train.seed,
        "baseline_run_id": baseline["run_id"] if baseline else None,
        "baseline_status": baseline["status"] if baseline else None,
        "identity": p.identity,
        "config": _recorded_config(s),
        "environment": records.environment(p.device, threads),
    }


def _recorded_config(s: Settings) -> dict[str, Any]:
    """The settings as a record keeps them: its folders relative to the record's own (records.portable)."""
    config = dataclasses.asdict(s)
    for key in ("runs_dir", "cache_dir", "artifacts_dir"):
        config[key] = records.portable(config[key], s.runs_dir)
    config["model"]["name_or_path"] = records.portable_model(s.model.name_or_path, s.runs_dir)
    config["task"]["data_dir"] = records.portable(s.task.data_dir, s.runs_dir)
    config["train"]["forgetting_file"] = records.portable(s.train.forgetting_file, s.runs_dir)
    for key in ("train_file", "eval_file"):  # the user's own data
        config["task"][key] = records.portable(getattr(s.task, key), s.runs_dir)
    pattern = s.method.rank_pattern
    if isinstance(pattern, str) and not (adapters.RANK_PATTERN_DIR / f"{pattern}.yaml").is_file():
        config["method"]["rank_pattern"] = records.portable(pattern, s.runs_dir)
    return config


def execute(p: Plan, baseline: RunRecord | None, threads: int, sweep: str | None = None) -> RunRecord:
    """Train and evaluate; always returns a record. Bad input (a full disk included) is recorded as failed, then re-raised."""
    record = _base_record(p, baseline, threads, sweep)
    tracker = None
    try:
        with file_errors():
            torch.set_num_threads(threads)
            tracker = Tracker(p.settings, p.run_id, record["config"])
            record.update(_train_and_measure(p, tracker))
    except UserError as exc:
        record.update(status="failed", error=str(exc))
        if distributed.is_main():
            records.write_record(p.settings.runs_dir, _finished(record))
        raise
    except Exception as exc:  # an error in one run is its result; the sweep goes on. Its traceback goes to a log.
        record.update(status="failed", error=f"{type(exc).__name__}: {one_line(exc)}",
                      log=records.write_log(p.settings.runs_dir, p.run_id, traceback.format_exc()))
    _finished(record)
    if tracker:
        tracker.finish(record)
    return record


def _finished(record: RunRecord) -> RunRecord:
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


def _train_and_measure(p: Plan, tracker: Tracker) -> RunRecord:
    """The measured half of the record: build the model, train it on the run's batches, evaluate it, save it."""
    s = p.settings
    tokenizer = AutoTokenizer.from_pretrained(p.model_path, revision=s.model.revision)
    start = time.perf_counter()
    tokens, cached = data.prepare(p.family, s, p.source, tokenizer, data.tokenizer_id(s))
    prep_seconds = time.perf_counter() - start
    collate = p.family.collator(tokenizer)
    train_set = tokens["train"].remove_columns("id")
    steps = s.train.total_steps(len(train_set))
    schedule = batching.train_plan([len(ids) for ids in train_set["input_ids"]], s.train.batch_size, steps, s.train.grad_accum,
                                   s.train.seed, s.train.batching, s.train.micro_batch_floor)
    accelerator = distributed.make_accelerator(p.device, s.train.distributed)
    model, adapted, base_total, probe = _model(p, tokenizer, steps)
    if p.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    eva = eva_pass(p, model, train_set, schedule, collate, accelerator.device) if p.method.eva else {}
    distributed.seed_dropout(s.train.seed)
    curve: list[CurvePoint] = []

    def tune_checkpoint(step: int) -> None:
        split = evaluate_split(accelerator, model, p.family, tokens["tune"], collate, s)
        curve.append({"step": step, "metrics": split["metrics"], "outputs": split["examples"]["outputs"]})

    result = fit(accelerator, model, train_set, collate, schedule, p.method, s.train, on_log=tracker.log_loss,
                 checkpoints=curve_steps(s.train.curve_points, steps), on_checkpoint=tune_checkpoint,
                 after_update=adapters.adalora_step(model, p.method))
    allocated = adapters.allocated_ranks(model, p.method, adapted) if adapted else None
    final = allocated or p.method.rank_pattern or dict.fromkeys(adapted, p.method.r)
    counts = adapters.count_parameters(model, base_total, p.method.name, final if adapted else None)
    out: RunRecord = {
        "adapted_modules": adapted, "allocated_ranks": allocated, "params": dataclasses.asdict(counts),
        "loss_curve": result.loss_curve, "budget": loss_trend(result.step_losses),
        "memory": {**_memory_fields(accelerator, p.device, result), **eva.get("memory", {})},
        "processes": {"mode": s.train.distributed, "world_size": accelerator.num_processes,
                      "per_process_batch": s.train.batch_size // accelerator.num_processes, "grad_accum": s.train.grad_accum,
                      "global_batch": s.train.batch_size * s.train.grad_accum},
        "train_examples": len(train_set), "tune_examples": len(tokens["tune"]), "eval_examples": len(tokens["dev"]),
        "tokens": {"train": batching.token_summary(result.real_tokens, result.computed_tokens)},
        "micro_batches": len(schedule.batches), "time": {**_times(result, prep_seconds, cached), **eva.get("time", {})},
    }
    if result.diverged_at is not None:
        return {**out, "status": "diverged", "diverged_at_step": result.diverged_at, "error": result.divergence}
    out.update(_evaluate(p, accelerator, model, tokenizer, tokens, collate, curve, result, out))
    out["forgetting"] = probe.measure(accelerator.unwrap_model(model), tokenizer)
    out["artifact"] = _save(accelerator, model, p) if s.train.save_adapter else None
    out["status"] = "done"
    return out


def _model(p: Plan, tokenizer, steps: int) -> tuple[torch.nn.Module, list[str], int, forgetting.Probe]:
    """The model as the method trains it for `steps` (seeded before the head and the adapter are drawn: same seed, same
    run), the adapted modules, the base model's parameter count, and the forgetting probe measured on the base weights."""
    s = p.settings
    set_seed(s.train.seed)
    model = p.family.load_model(p.model_path, s)
    base_total = sum(p_.numel() for p_ in model.parameters())
    probe = forgetting.Probe(s, p.identity["config"]["model"], p.device)
    probe.before(model.to(p.device), tokenizer)
    model, adapted = adapters.apply_method(model, p.method, p.family.TASK_TYPE, steps)
    return model, adapted, base_total, probe


def eva_pass(p: Plan, model: torch.nn.Module, train_set, schedule: batching.Plan, collate, device) -> dict[str, Any]:
    """EVA's data pass on the run's own first training batches (the plan's order, up to method.eva_examples examples;
    never tuning or eval data), its time and (with train.memory_probe) its peak tensor memory recorded as part of the
    run's cost.

    As training probes one step, the pass probes few forwards: its first SVD update (forward 1), and the first SVD
    update of its costliest batch (the most computed tokens) if the pass reaches it before it converges; the peak is
    the larger. Probing every forward put MemTracker's bookkeeping into the time (it doubled the pass); reordering
    the batches to probe the costliest first changed EVA's initialisation and so the run's result."""
    order = [i for step in schedule.steps for micro in step for i in micro][:p.method.eva_examples]
    size = p.settings.train.batch_size
    batches = [dict(batching.load_batch(train_set, order[i:i + size], collate, device)) for i in range(0, len(order), size)]
    costliest = max(batch["input_ids"].numel() for batch in batches)
    peaks: list[int] = []
    costliest_probed = False

    @contextmanager
    def around_forward(k: int, inputs: dict[str, torch.Tensor]):
        nonlocal costliest_probed
        is_costliest = inputs["input_ids"].numel() == costliest
        probed = k == 1 or (k > 1 and is_costliest and not costliest_probed)  # forward 0 only hashes
        if not (p.settings.train.memory_probe and probed):
            yield
            return
        costliest_probed |= is_costliest
        with memory.probe(model, None, torch.device(device)) as peak:
            yield
        peaks.append(peak.peak_bytes)

    start = time.perf_counter()
    adapters.initialize_eva(model, batches, around_forward)
    seconds = time.perf_counter() - start
    return {"time": {"init_s": seconds}, **({"memory": {"init_peak_bytes": max(peaks)}} if peaks else {})}


def _evaluate(p: Plan, accelerator, model, tokenizer, tokens, collate, curve: list[CurvePoint], result,
              out: RunRecord) -> RunRecord:
    """The final evaluation: tuning and eval splits with their per-example outputs, the family's extra metrics, and
    the learning curve's last point."""
    s = p.settings
    start = time.perf_counter()
    tune = evaluate_split(accelerator, model, p.family, tokens["tune"], collate, s)
    dev = evaluate_split(accelerator, model, p.family, tokens["dev"], collate, s)
    metrics = {**dev["metrics"], **p.family.extra_metrics(accelerator, model, tokenizer, tokens["dev"], s)}
    curve.append({"step": result.steps, "metrics": tune["metrics"], "outputs": tune["examples"]["outputs"]})
    primary = dev["primary_metric"]
    return {"tokens": {**out["tokens"], "tune": tune["tokens"], "dev": dev["tokens"]}, "metrics": metrics,
            "primary_metric": primary, "primary_value": metrics[primary], "tune_metrics": tune["metrics"],
            "tune_value": tune["metrics"][primary], "examples": {"dev": dev["examples"], "tune": tune["examples"]},
            "tune_curve": curve,
            "time": {**out["time"], "eval_s": time.perf_counter() - start, "curve_eval_s": result.checkpoint_seconds}}


def _times(result, prep_seconds: float, from_cache: bool) -> Times:
    """Where the run's time went, and its throughput in examples and (real and computed) tokens per second."""
    def rate(amount: float) -> float | None:
        return amount / result.seconds if result.seconds else None

    return {"data_prep_s": prep_seconds, "data_from_cache": from_cache, "train_s": result.seconds, "steps": result.steps,
            "samples_per_s": rate(result.samples), "tokens_per_s": rate(result.real_tokens),
            "computed_tokens_per_s": rate(result.computed_tokens)}


def curve_steps(points: list[float], steps: int) -> list[int]:
    """The optimizer steps at which the tuning split is evaluated for the learning curve: each fraction of the budget,
    rounded, once, before the last step (whose evaluation every run makes anyway)."""
    return sorted({round(f * steps) for f in points} & set(range(1, steps)))


def _memory_fields(accelerator, device: str, result) -> Memory:
    """The probe's peak and split; with several processes, those of the process that peaked highest, and every process's peak."""
    fields: Memory = {"device": device, "peak_bytes": None, "split_bytes": None, "grad_bytes_after_backward": None,
                              "cuda_max_allocated_bytes": None, "cuda_max_reserved_bytes": None}
    if result.memory is not None:
        fields.update(peak_bytes=result.memory.peak_bytes, split_bytes=result.memory.split,
                      grad_bytes_after_backward=result.grad_bytes_after_backward)
    if device == "cuda":
        fields.update(cuda_max_allocated_bytes=torch.cuda.max_memory_allocated(), cuda_max_reserved_bytes=torch.cuda.max_memory_reserved())
    if accelerator.num_processes == 1:
        return fields
    per_process = distributed.everyone(fields)
    highest = max(per_process, key=lambda f: f["peak_bytes"] or 0)
    if device == "cuda":
        highest.update({key: max(f[key] for f in per_process) for key in ("cuda_max_allocated_bytes", "cuda_max_reserved_bytes")})
    return {**highest, "per_process_peak_bytes": [f["peak_bytes"] for f in per_process]}


def _save(accelerator, model: torch.nn.Module, p: Plan) -> dict[str, Any] | None:
    """Save the adapter (LoRA) or the whole model (full FT) in artifacts_dir; return where (relative to the record) and how many bytes.
    With several processes every one hands in its part of the weights (FSDP shards them) and process 0 writes."""
    state = accelerator.get_state_dict(model) if accelerator.num_processes > 1 else None
    if not accelerator.is_main_process:
        return None
    folder = Path(p.settings.artifacts_dir) / p.run_id
    unwrapped = accelerator.unwrap_model(model)
    for config in getattr(unwrapped, "peft_config", {}).values():  # the model as configured, not this machine's folder
        config.base_model_name_or_path = p.settings.model.name_or_path
    # The vocabulary is never resized here, so the base embeddings never need saving; saying so spares PEFT's check of
    # the base model's config on the hub (a `package:` name is no hub id: it warned, and online it would ask the hub).
    extra = {"save_embedding_layers": False} if hasattr(unwrapped, "peft_config") else {}
    unwrapped.save_pretrained(folder, state_dict=state, **extra)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))
    return {"path": records.portable(folder, p.settings.runs_dir), "bytes": size}
