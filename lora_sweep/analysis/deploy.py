"""The report's "Deployment" section from the records `lora-deploy` writes in <results>/deploy/: one table row per
measured run and one figure (latency base / unmerged / merged; load time checkpoint / adapter swap; size on disk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from lora_sweep.analysis.plots import save
from lora_sweep import records
from lora_sweep.metrics import metric_info

MIB = 2**20
HOW = "No deployment measurements: run `lora-deploy RESULTS_DIR` (`make sweep` does) to add them."
NOTE = ("Times are medians over interleaved repeats with their interval for the median ([low, high]); each ratio is taken "
        "within a repeat. Latency: the base model (no adapter), the unmerged adapter and the merged model on real "
        "eval batches. Swap: PEFT `load_adapter` + `set_adapter` of another run's adapter (another seed or rank of the "
        "same task: the load time depends on the adapter's size, not its task) against `from_pretrained` of the paired "
        "full-FT checkpoint into a fresh model object; warm: the files are in the page cache, cold: their pages were "
        "evicted first. Many adapters: one base serving a mixed batch of 32 (PEFT `adapter_names`) against N merged models.")


def load(results_dir: Path) -> list[dict[str, Any]]:
    """The deploy records of a results folder (lora-deploy writes them in <results>/deploy/)."""
    folder = results_dir / "deploy"
    return [r for r in (records.read_record(folder, p.stem) for p in sorted(folder.glob("*.json"))) if r] if folder.is_dir() else []


def _shown(metric: str, value: float) -> str:
    """A metric in its display units (accuracy in points, a loss as it is)."""
    info = metric_info(metric)
    return f"{info.scale * value:.{2 if info.scale != 1 else 3}f}"


def _interval(summary: dict[str, float], fmt: str) -> str:
    return f"{summary['median']:{fmt}} [{summary['low']:{fmt}}, {summary['high']:{fmt}}]"


def table(deployed: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for d in deployed:
        merge, swap, latency = d["merge"], d["swap"] or {}, d["latency"]
        many = {m["n"]: m for m in d["many"]}
        top = many[max(many)]
        rows.append({
            "run": f"r={d['r']} seed {d['seed']} ({d['run_id']})",
            "chosen": d["chosen"],
            "merge: max abs Δ output": f"{merge['max_abs_diff']:.1e}",
            "metric before → after merge": f"{merge['metric']} {_shown(merge['metric'], merge['before'])} → {_shown(merge['metric'], merge['after'])}",
            "merged / base latency, batch 1": _interval(latency["batch_1"]["merged/base"], ".2f"),
            "merged / base latency, batch 32": _interval(latency["batch_32"]["merged/base"], ".2f"),
            "unmerged / base, batch 32": _interval(latency["batch_32"]["unmerged/base"], ".2f"),
            "swap / checkpoint load, warm": _interval(swap["swap/checkpoint (warm)"], ".2f") if swap else "-",
            "swap / checkpoint load, cold": _interval(swap["swap/checkpoint (cold)"], ".2f") if swap else "-",
            "hotswap": swap.get("hotswap", "-"),
            "adapter / checkpoint size": f"{d['adapter_bytes'] / MIB:.1f} / {d['checkpoint_bytes'] / MIB:.1f} MiB",
            f"N={top['n']}: mixed / merged examples/s": (f"{top['examples_per_s']['mixed batch']['median']:.0f} / "
                                                         f"{top['examples_per_s']['merged models']['median']:.0f}"),
            f"N={top['n']}: mixed / merged tensor MiB": (f"{top['tensor_bytes']['mixed batch'] / MIB:.0f} / "
                                                         f"{top['tensor_bytes']['merged models'] / MIB:.0f}"),
        })
    return pd.DataFrame(rows)


def figure(deployed: list[dict[str, Any]], folder: Path, name: str) -> Path:
    """Three panels for the first measured run: latency per batch, load time, size on disk (bars: medians; whiskers:
    the interval for the median)."""
    d = deployed[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

    def bars(ax, labels, summaries, scale, unit, title, colors, log=False):
        medians = [scale * s["median"] for s in summaries]
        errors = [[m - scale * s["low"] for m, s in zip(medians, summaries)], [scale * s["high"] - m for m, s in zip(medians, summaries)]]
        ax.bar(labels, medians, yerr=errors, capsize=3, color=colors)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelsize=8, labelrotation=15)

    latency = d["latency"]
    labels = [f"{v} b{size}" for size in (1, 32) for v in ("base", "unmerged", "merged")]
    summaries = [latency[f"batch_{size}"]["seconds_per_batch"][v] for size in (1, 32) for v in ("base", "unmerged", "merged")]
    bars(axes[0], labels, summaries, 1000, "ms per batch", "latency (batch 1 and 32)", ["tab:gray", "tab:orange", "tab:blue"] * 2, log=True)
    if d["swap"]:
        seconds = d["swap"]["seconds"]
        names = [n for n in ("checkpoint load (warm)", "checkpoint load (cold)", "adapter swap (warm)", "adapter swap (cold)",
                             "hotswap (warm)") if n in seconds]
        bars(axes[1], [n.replace(" (", "\n(") for n in names], [seconds[n] for n in names], 1000, "ms", "load time",
             ["tab:gray" if n.startswith("checkpoint") else "tab:blue" for n in names])
    sizes = {"full-FT checkpoint": d["checkpoint_bytes"], "adapter": d["adapter_bytes"]}
    axes[2].bar(list(sizes), [b / MIB for b in sizes.values()], color=["tab:gray", "tab:blue"])
    axes[2].set_yscale("log")
    axes[2].set_ylabel("MiB on disk")
    axes[2].set_title("size on disk", fontsize=10)
    fig.suptitle(f"deployment: {d['model']} {d['task']} LoRA r={d['r']} seed {d['seed']}", fontsize=11)
    return save(fig, folder, name)


def section(results_dir: Path, plots_dir: Path, report_dir: Path) -> list[str]:
    """The report's lines: the table and the figure, or how to produce them."""
    deployed = load(results_dir)
    lines = ["## Deployment", ""]
    if not deployed:
        return lines + [HOW, ""]
    plot = figure(deployed, plots_dir, "deployment")
    return lines + [NOTE, "", table(deployed).to_markdown(index=False, disable_numparse=True), "",
                    f"![deployment]({plot.relative_to(report_dir).as_posix()})", ""]
