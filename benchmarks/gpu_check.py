"""One prepared check of the CUDA path and of the memory model, run in one command the first time a GPU is lent.

A GPU is lent to this project rarely, for minutes, on a bare machine with no network. So everything the check needs
travels with the tree in `wheels/` (`--prepare`: the wheels that machine lacks, the embedded models' configs, MiniLM's
tokenizer and a few hundred GLUE lines), and every section records its own failure in the JSON and lets the others
run. Sections, in order:

1. peak: the dense matmul rate measured in this process (CUDA: bf16 8192^3), the ceiling utilization is read against.
2. small: MiniLM- and SmolLM2-shaped models (their shipped configs, random weights), LoRA r=8 and r=64 on q,v and full
   FT, a few dozen steps each in bf16 autocast over fp32 weights (as lora-sweep trains on a GPU; CPU: fp32): the memory
   probe's peak and split, torch.cuda.max_memory_allocated and lora-estimate's prediction, step time, tokens/s and
   achieved TFLOP/s as a fraction of the measured peak.
3. large: Llama-3.2-1B from conf/architectures with random bf16 weights, LoRA r=16 and r=64 on q,v and full FT at
   --batch x --seq-len, the same figures.
4. cli: a +sweep=quick-sized paired sweep through the real command line (`python -m lora_sweep`, a random
   MiniLM-shaped model saved to a folder, the GLUE lines of `--prepare`), analysis included.
5. ddp: one run under torchrun with train.distributed=ddp (one process per GPU; on CPU two, gloo).
6. large 3B: Llama-3.2-3B, last, only if the time budget (--budget) leaves room for it.

The training step is train.fit's (forward, backward, clipping, AdamW step, zero_grad) written out, as
benchmarks/memory_model.py writes it: accelerate fixes the mixed precision once per process, and this process
measures both autocast and bf16 weights. Every example is `seq` real tokens, so the estimate applies exactly.
Figures go to <out>/gpu_check.json and <out>/gpu_check.md; the CLI runs' own folders stay in --work (the GPU machine
sends back at most 8 files), summarised in the JSON.

    python benchmarks/gpu_check.py --prepare wheels                      # here: what travels (make gpu-wheels)
    make gpu-check                                                       # there: install wheels/, write results/gpu/
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu    # the same path on CPU, tiny models (~1 min)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

import common
from lora_sweep import adapters, estimate, memory
from lora_sweep.task_family import family_for
from lora_sweep.hub import resolve_model
from lora_sweep.settings import CONF_DIR, compose

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# What the GPU machine lacks (or has at another version than this environment): wheels at this environment's versions.
WHEELS = ("hydra-core", "omegaconf", "datasets", "dill", "multiprocess", "fsspec", "gguf", "transformers", "peft",
          "accelerate", "regex")
SDIST_ONLY = ("antlr4-python3-runtime",)  # built into a wheel here (pure Python)
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64"]
GLUE_LINES = {"SST-2/train.tsv": 1200, "SST-2/dev.tsv": 256, "STS-B/dev.tsv": 200}  # data lines (plus the header)
SMALL = {"minilm_l6": ("task=glue/sst2", (32, 128), (8, 32)), "smollm2_135m": ("task=instruct/alpaca", (8, 256), (4, 32))}
SMALL_METHODS = (("method.r=8",), ("method.r=64",), ("method=full",))
LARGE = ("llama3_2_1b", "llama3_2_3b")
LARGE_METHODS = (("method.r=16",), ("method.r=64",), ("method=full",))
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 32}
# Quick-sized runs (conf/sweep/quick.yaml's budget, 1,000 training examples here) and their tiny CPU version.
CLI_RUN = ("task.tune_examples=200", "train.max_steps=40")
CLI_TINY = ("method.r=8", "task.tune_examples=32", "task.max_train_examples=64", "task.max_eval_examples=32",
            "train.max_steps=4", "train.batch_size=8", "train.min_micro_batch=4", "train.eval_batch_size=32",
            "train.curve_points=[]", "train.forgetting_examples=16", "train.threads=1")


class Check:
    """The run's settings, its deadline and everything measured so far (the JSON)."""

    def __init__(self, args: argparse.Namespace):
        self.device = args.device
        self.tiny = args.tiny
        self.assets = Path(args.assets)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
        self.out = Path(args.out)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.steps = (2, 3) if self.tiny else (3, 24)  # (warm-up, timed) steps per configuration
        self.large_steps = (2, 3) if self.tiny else (2, 8)
        self.large_shape = (args.batch or (2 if self.tiny else 4), args.seq_len or (32 if self.tiny else 1024))
        self.results: dict = {"device": device_name(self.device), "tiny": self.tiny, "environment": environment(),
                              "budget_s": args.budget, "sections": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, run) -> None:
        """Run one section; its failure is recorded under its name and the next section runs."""
        start = time.monotonic()
        print(f"[gpu-check] {name} ({self.left():.0f} s left)", flush=True)
        try:
            self.results["sections"][name] = run()
        except Exception as exc:
            self.results["sections"][name] = {"error": failure(exc)}
        self.results["sections"][name]["seconds"] = round(time.monotonic() - start, 1)
        self.save()

    def save(self) -> None:
        """Write the JSON and the table after every section: a check stopped from outside keeps what it measured."""
        self.results["seconds"] = round(time.monotonic() - self.start, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.results))


def failure(exc: BaseException) -> str:
    """The error and where it was raised, in one short string for the JSON."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {message} ({Path(where.filename).name}:{where.lineno})"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({common.cpu_name()})"


def environment() -> dict:
    """Versions actually imported: on the GPU machine the wheels of --prepare shadow the preinstalled packages."""
    versions = {}
    for package in ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "omegaconf", "fsspec",
                    "huggingface-hub", "pyarrow", "lora-sweep"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "packages": versions, "cuda": torch.version.cuda,
            "transformers_from": str(Path(sys.modules["transformers"].__file__).parent.parent)}


# --- models -----------------------------------------------------------------------------------------------------------

def config_folder(check: Check, name: str) -> Path:
    """A folder holding the model's config.json (shrunk in --tiny): what lora-estimate and the model are built from.
    Llama-3.2 comes from conf/architectures, MiniLM and SmolLM2 from the configs --prepare copied."""
    folder = check.work / "configs" / name
    if (folder / "config.json").is_file():
        return folder
    preset = compose(f"model={name}").model
    source = Path(CONF_DIR) / preset.architecture if preset.architecture else check.assets / "models" / name
    config = AutoConfig.from_pretrained(source)
    if check.tiny:
        config.update({k: v for k, v in TINY.items() if k != "head_dim" or hasattr(config, "head_dim")})
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = 2  # keep grouped-query attention (K and V 64 wide: r=64 still fits)
    config.save_pretrained(folder)
    return folder


def random_model(settings, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model a run of `settings` trains, with random weights drawn directly on `device` in `dtype` (no file read):
    the family's own loader gives the class and config (head included), as for lora-estimate."""
    meta = family_for(settings).load_model(settings.model.name_or_path, settings, meta=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            return type(meta)(meta.config)
    finally:
        torch.set_default_dtype(default)


def measure(check: Check, name: str, overrides: tuple[str, ...], shape: tuple[int, int], precision: str,
            steps: tuple[int, int], peak_tflops: float | None) -> dict:
    """One configuration: lora-estimate's prediction, then warm-up steps, one probed step and timed steps."""
    batch, seq = shape
    folder = config_folder(check, name)
    task = SMALL[name][0] if name in SMALL else "task=instruct/alpaca"
    settings = compose(f"model={name}", task, *overrides, f"model.name_or_path={folder}", "model.architecture=null",
                       f"estimate.device={check.device}", f"estimate.precision={precision}",
                       f"estimate.batch_size={batch}", f"estimate.seq_len={seq}",
                       *([f"estimate.device_tflops={peak_tflops}"] if peak_tflops else []))
    method = common.trained_method(settings)
    row: dict = {"model": name, "method": common.method_label(method), "precision": precision, "batch": batch, "seq": seq}
    try:
        predicted = estimate.estimate(settings, method)
        row["estimate"] = {"peak": predicted.peak, **predicted.components(), "peak_at": predicted.peak_at,
                           "flops": predicted.flops, "seconds": predicted.seconds}
    except Exception as exc:
        row["estimate"] = {"error": failure(exc)}
    if check.device == "cuda" and "peak" in row["estimate"] and row["estimate"]["peak"] > 0.95 * torch.cuda.mem_get_info()[0]:
        row["skipped"] = f"estimated {row['estimate']['peak'] / 2**30:.1f} GiB does not fit the free memory"
        return row
    try:
        row.update(train_steps(check, settings, method, shape, precision, steps))
    except Exception as exc:
        row["error"] = failure(exc)
    finally:
        gc.collect()
        if check.device == "cuda":
            torch.cuda.empty_cache()
    compare(row, peak_tflops)
    return row


def train_steps(check: Check, settings, method, shape: tuple[int, int], precision: str, steps: tuple[int, int]) -> dict:
    """train.fit's step on synthetic ids of exactly `shape`: the probe wraps the step after the warm-up (AdamW's state
    exists), torch.cuda.max_memory_allocated covers that step and the timed ones."""
    device, (warmup, timed) = check.device, steps
    weights = torch.bfloat16 if precision == "bf16" else torch.float32
    model, _ = adapters.apply_method(random_model(settings, device, weights), method, family_for(settings).TASK_TYPE)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16_autocast" else nullcontext()
    step, optimizer = common.synthetic_step(model, method, settings, shape, device, autocast)
    params = [p for p in model.parameters() if p.requires_grad]

    losses = [step() for _ in range(warmup)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with memory.probe(model, optimizer, torch.device(device)) as probe:
        losses.append(step())
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    out = {"params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params),
           "probe": {"peak": probe.peak_bytes, **probe.split}, "loss_first_last": [losses[0], losses[-1]],
           "step_s": statistics.median(times), "step_s_range": [min(times), max(times)]}
    if device == "cuda":
        out.update(cuda_peak=torch.cuda.max_memory_allocated(), cuda_reserved=torch.cuda.max_memory_reserved(), cuda_base=base)
    return out


def compare(row: dict, peak_tflops: float | None) -> None:
    """The ratios the issue asks for, where both sides were measured."""
    predicted = row["estimate"].get("peak")
    if "probe" in row:
        row["probe_split_sums_to_peak"] = sum(v for k, v in row["probe"].items() if k != "peak") == row["probe"]["peak"]
        row["tokens_per_s"] = row["batch"] * row["seq"] / row["step_s"]
    if predicted and "probe" in row:
        row["error_vs_probe"] = predicted / row["probe"]["peak"] - 1
    if predicted and "cuda_peak" in row:
        row["error_vs_cuda"] = predicted / row["cuda_peak"] - 1
    if "flops" in row["estimate"] and "step_s" in row:
        row["tflops"] = row["estimate"]["flops"] / row["step_s"] / 1e12
        if peak_tflops:
            row["peak_fraction"] = row["tflops"] / peak_tflops


def savings(rows: list[dict]) -> list[dict]:
    """Per model: each LoRA configuration's peak below full FT's, measured (CUDA allocator, else probe) and estimated."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and "probe" in r and "peak" in r["estimate"]]
        full = next((r for r in mine if r["method"] == "full FT"), None)
        for r in (r for r in mine if full and r is not full):
            measured = {k: full[k] - r[k] for k in ("cuda_peak",) if k in r}
            measured["probe"] = full["probe"]["peak"] - r["probe"]["peak"]
            out.append({"model": model, "method": r["method"], "measured": measured,
                        "estimated": full["estimate"]["peak"] - r["estimate"]["peak"]})
    return out


def small_models(check: Check, peak: float | None) -> dict:
    precision = "bf16_autocast" if check.device == "cuda" else "fp32"
    rows = [measure(check, name, overrides, tiny if check.tiny else shape, precision, check.steps, peak)
            for name, (_, shape, tiny) in SMALL.items() for overrides in SMALL_METHODS]
    return {"rows": rows, "lora_savings": savings(rows)}


def large_model(check: Check, name: str, peak: float | None) -> dict:
    rows = [measure(check, name, overrides, check.large_shape, "bf16", check.large_steps, peak) for overrides in LARGE_METHODS]
    return {"rows": rows, "lora_savings": savings(rows)}


def matmul_peak(check: Check) -> dict:
    n, dtype = (512, torch.float32) if check.tiny or check.device == "cpu" else (8192, torch.bfloat16)
    tflops = common.matmul_gflops(check.device, dtype, n, n, n) / 1000
    return {"tflops": tflops, "n": n, "dtype": str(dtype).removeprefix("torch.")}


# --- the command line, end to end --------------------------------------------------------------------------------------

def cli_model(check: Check) -> Path:
    """A random MiniLM-shaped model (tiny in --tiny) saved with MiniLM's tokenizer: a model folder as users give one."""
    folder = check.work / "cli_model"
    if not (folder / "config.json").is_file():
        settings = compose("model=minilm_l6", f"model.name_or_path={config_folder(check, 'minilm_l6')}")
        random_model(settings, "cpu", torch.float32).save_pretrained(folder)
        AutoTokenizer.from_pretrained(check.assets / "models" / "minilm_l6").save_pretrained(folder)
    return folder


def run_cli(check: Check, name: str, launcher: list[str], overrides: tuple[str, ...]) -> dict:
    """`lora-sweep` with `overrides` in its own results folder under --work; the records it wrote, summarised."""
    runs = check.work / name / "runs"
    command = [*launcher, "-m", "lora_sweep", f"model.name_or_path={cli_model(check)}", "model.name=minilm_random",
               f"runs_dir={runs}", f"cache_dir={check.work / 'cache'}", f"train.device={check.device}",
               *(CLI_TINY if check.tiny else CLI_RUN), *overrides]
    env = {**os.environ, "GLUE_DIR": str(check.assets / "glue"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=max(check.left(), 30))
            status = process.returncode
        except subprocess.TimeoutExpired:  # torchrun's workers too: the whole process group
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            status = "timeout"
    records = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
    result = {"command": " ".join(command[command.index("lora_sweep"):]), "exit_status": status,
              "wall_s": round(time.monotonic() - start, 1), "runs": [summary(r) for r in records]}
    if status != 0:  # the harness's own one-line error where it gave one
        result["error"] = next((line for line in output.splitlines() if line.startswith("error: ")), f"exit status {status}")
        result["output_tail"] = output[-3000:]
    return result


def summary(record: dict) -> dict:
    memory_ = record.get("memory") or {}
    timing = record.get("time") or {}
    return {"method": record["method"], "r": record.get("r"), "status": record["status"], "error": record.get("error"),
            "primary": record.get("primary_value"), "device": (record.get("environment") or {}).get("device"),
            "probe_peak": memory_.get("peak_bytes"), "cuda_peak": memory_.get("cuda_max_allocated_bytes"),
            "train_s": timing.get("train_s"), "tokens_per_s": timing.get("tokens_per_s"), "processes": record.get("processes")}


def cli_sweep(check: Check) -> dict:
    result = run_cli(check, "cli", [sys.executable], ("+sweep=quick",))
    report = check.work / "cli" / "report.md"
    result["report_written"] = report.is_file()
    return result


def ddp_run(check: Check) -> dict:
    processes = torch.cuda.device_count() if check.device == "cuda" else 2
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return run_cli(check, "ddp", launcher, ("train.distributed=ddp", "pair_baseline=false"))


# --- the report --------------------------------------------------------------------------------------------------------

def cell(x, fmt: str) -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else "–"


def mib(x) -> str:
    return cell(x / MIB if isinstance(x, (int, float)) else None, "{:,.1f}")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(results: dict) -> str:
    """The JSON's figures as tables: one row per configuration measured, per LoRA saving, per command-line run."""
    s, packages = results["sections"], results["environment"]["packages"]
    peak = s.get("peak", {})
    lines = [f"# GPU check: {results['device']}", "",
             f"{'Tiny CPU mode' if results['tiny'] else 'Full mode'}; torch {packages['torch']}, transformers {packages['transformers']}, "
             f"peft {packages['peft']}; {results['seconds']:.0f} s in all. Measured matmul peak: "
             + (f"{peak['tflops']:.3g} TFLOP/s ({peak['dtype']}, {peak['n']}³)." if "tflops" in peak else f"not measured ({peak.get('error')})."),
             "", "Memory in MiB; error = estimate / measured − 1; the probe's split is weights / gradients / optimizer state / "
             "activations / other at its peak; TFLOP/s = the estimate's training FLOPs of a step / the measured step time.", "",
             *table(["section", "model", "method", "precision", "batch × seq", "probe peak", "probe split", "CUDA max allocated",
                     "estimate", "vs CUDA", "vs probe", "step ms", "tokens/s", "TFLOP/s", "of peak", "note"], measured_rows(s)),
             "", "LoRA's peak below full FT's (MiB):", "",
             *table(["section", "model", "method", "measured (CUDA)", "measured (probe)", "estimated"], saving_rows(s)),
             "", "The command line (`lora-sweep` records):", "",
             *table(["section", "exit", "wall s", "method", "r", "status", "primary", "probe peak", "CUDA max allocated",
                     "train s", "tokens/s", "processes", "error"], cli_rows(s))]
    errors = [f"- {name}: {v.get('error') or v.get('skipped')}" for name, v in s.items() if "error" in v or "skipped" in v]
    if errors:
        lines += ["", "Sections that failed or were skipped:", "", *errors]
    return "\n".join(lines) + "\n"


def measured_rows(s: dict) -> list[list[str]]:
    """One row per configuration of the model sections: probe, CUDA allocator and estimate side by side."""
    pct = "{:+.1%}"
    rows = []
    for name in ("small", "large_1b", "large_3b"):
        for r in s.get(name, {}).get("rows", []):
            probe, est = r.get("probe", {}), r["estimate"]
            split = " / ".join(cell(probe.get(k, 0) / MIB, "{:,.0f}") for k in ("weights", "gradients", "optimizer", "activations", "other"))
            rows.append([name, r["model"], r["method"], r["precision"], f"{r['batch']} × {r['seq']}",
                         mib(probe.get("peak")), split if probe else "–",
                         mib(r.get("cuda_peak")), mib(est.get("peak")),
                         cell(r.get("error_vs_cuda"), pct), cell(r.get("error_vs_probe"), pct),
                         cell(1000 * r["step_s"] if "step_s" in r else None, "{:.1f}"), cell(r.get("tokens_per_s"), "{:,.0f}"),
                         cell(r.get("tflops"), "{:.2f}"), cell(r.get("peak_fraction"), "{:.1%}"),
                         r.get("skipped") or r.get("error") or est.get("error") or ""])
    return rows


def saving_rows(s: dict) -> list[list[str]]:
    return [[name, d["model"], d["method"], mib(d["measured"].get("cuda_peak")), mib(d["measured"]["probe"]), mib(d["estimated"])]
            for name in ("small", "large_1b", "large_3b") for d in s.get(name, {}).get("lora_savings", [])]


def cli_rows(s: dict) -> list[list[str]]:
    """One row per record the command-line sections wrote (one empty row for a section that wrote none)."""
    rows = []
    for name in ("cli", "ddp"):
        c = s.get(name, {})
        for run in c.get("runs") or [{}]:
            rows.append([name, str(c.get("exit_status", "–")), cell(c.get("wall_s"), "{:.0f}"), run.get("method", "–"),
                         cell(run.get("r"), "{}"), run.get("status", "–"), cell(run.get("primary"), "{:.4f}"),
                         mib(run.get("probe_peak")), mib(run.get("cuda_peak")), cell(run.get("train_s"), "{:.1f}"),
                         cell(run.get("tokens_per_s"), "{:,.0f}"), cell((run.get("processes") or {}).get("world_size"), "{}"),
                         run.get("error") or c.get("error") or ""])
    return rows


# --- what travels ------------------------------------------------------------------------------------------------------

def prepare(folder: Path, download: bool) -> None:
    """Write what the GPU machine lacks into `folder`: the wheels (this environment's versions, Python 3.12 manylinux),
    the embedded models' configs and MiniLM's tokenizer (the models themselves are too large to travel) and the first
    lines of the GLUE files the command-line sections read."""
    folder.mkdir(parents=True, exist_ok=True)
    if download:
        download_wheels(folder)
    copy_assets(folder / "assets")
    files = [p for p in folder.rglob("*") if p.is_file()]
    for p in sorted(f for f in files if f.suffix == ".whl"):
        print(f"  {p.stat().st_size / MIB:6.2f} MiB  {p.name}")
    print(f"{folder}: {sum(p.stat().st_size for p in files) / MIB:.1f} MiB in {len(files)} files")


def download_wheels(folder: Path) -> None:
    """The packages the GPU machine lacks at this environment's versions, this package and the sdist-only ones built here."""
    pinned = [f"{p}=={metadata.version(p)}" for p in WHEELS]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--only-binary=:all:", "--no-deps", *PLATFORM, "-d", str(folder), *pinned], check=True)
    built = [f"{p}=={metadata.version(p)}" for p in SDIST_ONLY]
    ours = not (ROOT / "build").exists()  # setuptools builds this package in <root>/build: remove it after
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(folder), *built, str(ROOT)], check=True)
    if ours:
        shutil.rmtree(ROOT / "build")


def copy_assets(assets: Path) -> None:
    """The embedded models' configs, MiniLM's tokenizer and the first lines of the GLUE files: the machine has no network."""
    minilm = resolve_model(compose("model=minilm_l6").model.name_or_path, ROOT / ".cache" / "lora_sweep")
    AutoConfig.from_pretrained(minilm).save_pretrained(assets / "models" / "minilm_l6")
    AutoTokenizer.from_pretrained(minilm).save_pretrained(assets / "models" / "minilm_l6")
    package, _, gguf = compose("model=smollm2_135m").model.name_or_path.removeprefix("gguf:").partition("/")
    smollm = importlib.util.find_spec(package).submodule_search_locations[0]  # found, not imported (its deps are absent)
    AutoConfig.from_pretrained(smollm, gguf_file=gguf).save_pretrained(assets / "models" / "smollm2_135m")
    glue = Path(os.environ.get("GLUE_DIR") or ROOT.parent / "shared" / "data" / "glue")
    for name, lines in GLUE_LINES.items():
        (assets / "glue" / name).parent.mkdir(parents=True, exist_ok=True)
        with open(glue / name, encoding="utf-8") as src:
            (assets / "glue" / name).write_text("".join(line for _, line in zip(range(lines + 1), src)), encoding="utf-8")


def arguments() -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--out", default="results/gpu", help="folder for gpu_check.json and gpu_check.md (default results/gpu)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: CUDA when present")
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same models (with --device cpu: about a minute)")
    parser.add_argument("--batch", type=int, help="Llama-3.2 batch size (default 4; --tiny 2)")
    parser.add_argument("--seq-len", type=int, help="Llama-3.2 tokens per example (default 1024; --tiny 32)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480); Llama-3.2-3B runs only if they allow")
    parser.add_argument("--assets", default=str(ROOT / "wheels" / "assets"), help="what --prepare wrote (default wheels/assets)")
    parser.add_argument("--work", help="folder for model folders and the CLI runs' records (default: a new temporary folder)")
    parser.add_argument("--prepare", metavar="FOLDER", help="write the wheels and assets the GPU machine needs into FOLDER, and stop")
    parser.add_argument("--no-download", action="store_true", help="with --prepare: the assets only, no wheels")
    return parser.parse_args()


def run_sections(check: Check) -> None:
    """The sections in order, each recorded as it ends; the 3B model last, only if the budget leaves it time."""
    check.section("peak", lambda: matmul_peak(check))
    peak = check.results["sections"]["peak"].get("tflops")
    check.section("small", lambda: small_models(check, peak))
    check.section("large_1b", lambda: large_model(check, LARGE[0], peak))
    check.section("cli", lambda: cli_sweep(check))
    check.section("ddp", lambda: ddp_run(check))
    one_b = check.results["sections"]["large_1b"]["seconds"]
    if check.tiny:
        check.results["sections"]["large_3b"] = {"skipped": "tiny mode: Llama-3.2-3B shrinks to Llama-3.2-1B's tiny shape"}
    elif check.left() > 3 * one_b:  # 3B takes about 2.6x the 1B's time
        check.section("large_3b", lambda: large_model(check, LARGE[1], peak))
    else:
        check.results["sections"]["large_3b"] = {"skipped": f"{check.left():.0f} s left, about {3 * one_b:.0f} s needed"}
    check.save()


def main() -> None:
    args = arguments()
    if args.prepare:
        prepare(Path(args.prepare), download=not args.no_download)
        return
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        torch.set_num_threads(1)
    check = Check(args)
    run_sections(check)
    print(markdown(check.results))
    print(f"[gpu-check] wrote {check.out / 'gpu_check.json'} and {check.out / 'gpu_check.md'}; work folder {check.work}")


if __name__ == "__main__":
    main()
