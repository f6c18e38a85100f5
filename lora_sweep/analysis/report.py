"""A results folder -> runs table (Parquet, CSV), summary tables (Markdown, CSV), plots and report.md."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lora_sweep.analysis import Analysis, adaptive, allocators, curves, deploy, diagnostics, plots
from lora_sweep.analysis.load import IN_MEMORY_ONLY
from lora_sweep.analysis.plots import GIB
from lora_sweep.analysis.tables import compare_batching, formatted, tuned


def _slug(*parts) -> str:
    return "_".join(str(p).replace("/", "-") for p in parts)


def _rank_table(ranks: pd.DataFrame) -> pd.DataFrame:
    first = ranks.iloc[0]
    scale, unit = first["primary_scale"], first["primary_unit"]

    def pm(mean, ci):
        return f"{scale * mean:.2f}" + (f" ± {scale * ci:.2f}" if pd.notna(ci) else "")

    def interval(row, prefix):
        low, high = row.get(f"{prefix}_low"), row.get(f"{prefix}_high")
        return f"{row[prefix]:+.2f} [{low:+.2f}, {high:+.2f}]" if pd.notna(row.get(prefix)) else "-"

    optional = ["full_mean", "full_ci95", "delta", "delta_low", "delta_high", "verdict", "vs_lower_delta",
                "vs_lower_delta_low", "vs_lower_delta_high", "vs_lower_differs", "param_ratio", "memory_ratio"]
    rows = ranks.reindex(columns=[*ranks.columns, *(c for c in optional if c not in ranks)]).sort_values(["targets", "r"])
    table = pd.DataFrame({
        "targets": rows["targets"], "r": rows["r"].astype(int), "lr (tuned)": rows["lr"].map("{:g}".format),
        "seeds": rows["seeds"].map(len),
        "trainable": rows["params_trainable_mean"].map("{:,.0f}".format),
        "tune": [f"{scale * v:.2f}" for v in rows["tune_value_mean"]],
        "eval (± 95% CI over seeds)": [pm(m, c) for m, c in zip(rows["primary_value_mean"], rows["primary_value_ci95"])],
        "full FT eval": [pm(m, c) for m, c in zip(rows["full_mean"], rows["full_ci95"])],
        f"Δ vs full FT, {unit} [95% CI]": [interval(r, "delta") for _, r in rows.iterrows()],
        "verdict": rows["verdict"].astype(object).fillna("-"),
        "vs next lower rank": [interval(r, "vs_lower_delta") + (" *" if r.get("vs_lower_differs") is True else "")
                               if pd.notna(r.get("vs_lower_delta")) else "-" for _, r in rows.iterrows()],
        "params vs full": rows["param_ratio"].map(formatted(".2%")),
        "memory vs full": rows["memory_ratio"].map(formatted(".0%")),
        "peak MiB": rows["peak_mib_mean"].map("{:.0f}".format),
        "still improving": [f"{n}/{len(s)}" for n, s in zip(rows["still_improving"], rows["seeds"])],
    })
    if first["higher_is_better"]:  # a share of full FT's score means something for a score, not for a loss
        table.insert(9, "% of full", (100 * rows["primary_value_mean"] / rows["full_mean"]).map(formatted(".1f")))
    return table


METHOD_NOTE = (
    "Every choice (each rank's learning rate or alpha policy, and the full-FT learning rate) is made on the tuning "
    "split carved from the training data; the eval split is only reported. Δ is LoRA minus full FT on the eval split "
    "(positive: LoRA better), paired by seed and example; its 95% interval combines the between-seed variance of the "
    "per-seed differences with a paired bootstrap over eval examples (metric recomputed on each resample) through a "
    "Welch–Satterthwaite t interval (lora_sweep/analysis/stats.py). A rank qualifies when the interval's low end is above −margin; "
    "with one seed training noise is unknown and nothing qualifies. `*` in 'vs next lower rank': the two ranks differ "
    "significantly.")


@dataclass(frozen=True)
class AtScale:
    """The memory and time estimate (lora_sweep.estimate, made on the run side) of one context and targets preset's
    chosen rank, of full FT and of every swept rank, on the user's model: the "At your scale" section."""

    target: str  # the model preset estimated
    recommended: pd.Series  # the recommendation's row
    run: pd.Series  # a run of the context: its task and budget
    rank: int
    why: str
    ranks: list[int]
    per_rank: list[Any]  # an estimate.Estimate per rank
    full: Any  # full FT's estimate.Estimate
    settings: Any  # the settings.EstimateSettings used: precision, device, optimizer, rate
    refused: str | None = None  # why there is no estimate


@dataclass(frozen=True)
class Measured:
    """What the run side measured for the report beyond the records."""

    updates: dict[str, pd.DataFrame] | None  # lora_sweep.updates' tables, None where there are none
    updates_note: str  # where they came from
    at_scale: list[AtScale] | None = None  # analysis.target_model's estimates, None when not asked for


def write(analysis: Analysis, runs_dir: Path, measured: Measured) -> Path:
    """Write the tables, plots and report of `analysis` beside the runs folder (its parent); returns the report's path.

    Everything is written into a hidden folder there first and moved into place at the end, so a killed analysis
    leaves either the earlier outputs or no report at all, never a report that disagrees with its tables."""
    dest = runs_dir.parent
    stage = Path(tempfile.mkdtemp(dir=dest, prefix=".analysis-"))
    try:
        _export(analysis, stage)
        lines = _sections(analysis, measured, stage, runs_dir)
        (stage / "report.md").write_text("\n".join(lines))
        _publish(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dest / "report.md"


def _publish(stage: Path, dest: Path) -> None:
    """Move the staged outputs into `dest`: the old report.md goes first and the new one comes last."""
    (dest / "report.md").unlink(missing_ok=True)
    for item in sorted(stage.iterdir(), key=lambda p: p.name == "report.md"):
        if item.is_dir() and (dest / item.name).is_dir():
            os.replace(dest / item.name, stage / f".old-{item.name}")  # a folder replaces a folder whole: no stale plots
        os.replace(item, dest / item.name)


def _export(a: Analysis, out: Path) -> None:
    """The runs table (Parquet, CSV) and the summary tables (CSV)."""
    a.runs.drop(columns=IN_MEMORY_ONLY).to_parquet(out / "runs.parquet", index=False)
    a.runs.drop(columns=IN_MEMORY_ONLY).to_csv(out / "runs.csv", index=False)
    (out / "tables").mkdir(exist_ok=True)
    for name, table in {"aggregate": a.agg, "ranks": a.ranks, "recommendation": a.recommendation, "flags": a.flags}.items():
        table.to_csv(out / "tables" / f"{name}.csv", index=False)


def _sections(a: Analysis, measured: Measured, out: Path, runs_dir: Path) -> list[str]:
    """The report's markdown, section by section (each section writes its own tables and plots)."""
    lines = ["# lora-sweep report", ""]
    lines += _what_ran(a.runs, a.agg)
    lines += _recommendation(a.recommendation, out / "tables")
    lines += adaptive.section(runs_dir)  # an adaptive sweep's rounds and sequential verdicts, from its log
    if len(a.flags):
        lines += ["## Runs to look at", "", "Runs that finished but may not be what they seem (kept in every table, flagged here):", "",
                  a.flags.to_markdown(index=False, disable_numparse=True), ""]
    lines += _batching(a.runs, a.agg, out / "tables")
    lines += _per_task(a, out)
    if measured.at_scale:
        lines += _at_your_scale(measured.at_scale, out, out / "plots")
    lines += allocators.section(a.runs, a.agg, a.ranks, measured.updates, out)
    lines += diagnostics.section(a.runs, a.agg, a.recommendation, measured.updates, measured.updates_note, out)
    lines += deploy.section(runs_dir.parent, out / "plots", out)
    lines += _runs_not_done(a.runs, a.skipped)
    return lines


def _recommendation(recommendation: pd.DataFrame, tables_dir: Path) -> list[str]:
    recommended = (recommendation[["task", "model", "targets", "margin", "unit", "recommendation"]].to_markdown(index=False, disable_numparse=True)
                   if len(recommendation) else "No LoRA configuration finished.")
    (tables_dir / "recommendation.md").write_text(recommended + "\n")
    return ["## Rank recommendation", "", METHOD_NOTE, "", recommended, ""]


def _per_task(a: Analysis, out: Path) -> list[str]:
    """A section per task and model: the rank table, the trade-off plots and the learning curves; then an overview
    across tasks where there are several."""
    lines, panels = [], []
    tables_dir, plots_dir = out / "tables", out / "plots"
    agg, ranks = a.agg, a.ranks
    for (task, model), runs in a.runs.groupby(["task", "model"], sort=True):
        title = f"{task} · {model}"
        lines += [f"## {title}", ""]
        task_agg = agg[(agg["task"] == task) & (agg["model"] == model)] if len(agg) else agg
        task_ranks = ranks[(ranks["task"] == task) & (ranks["model"] == model)] if len(ranks) else ranks
        full_rows = tuned(task_agg[task_agg["method"] == "full"], ["context_id"]) if len(task_agg) else task_agg
        full = full_rows.iloc[0] if len(full_rows) else None
        metric = runs["primary_metric"].dropna().iloc[0] if runs["primary_metric"].notna().any() else "metric"
        if full is None:
            lines += ["No full fine-tuning baseline finished for this task: differences from full FT cannot be shown.", ""]
        if not len(task_ranks):
            lines += ["No LoRA run of this task finished.", ""]
            continue
        slug = _slug(task, model)
        table = _rank_table(task_ranks)
        (tables_dir / f"{slug}.md").write_text(table.to_markdown(index=False, disable_numparse=True) + "\n")
        table.to_csv(tables_dir / f"{slug}.csv", index=False)
        lines += [table.to_markdown(index=False, disable_numparse=True), ""]
        points = plots.best_lr(task_agg[task_agg["method"] != "full"])
        figures = _trade_off_plots(runs, task_agg, points, full, title, metric, slug, plots_dir)
        lines += [f"![{f.stem}]({f.relative_to(out).as_posix()})" for f in figures] + [""]
        lines += _learning_curves(runs, task_ranks, title, metric, slug, tables_dir, plots_dir, out)
        panels.append((title, points, full, metric))
    if len(panels) > 1:
        figure = plots.overview(panels, plots_dir, "overview")
        lines += ["## Overview across tasks", "", f"![overview]({figure.relative_to(out).as_posix()})", ""]
    return lines


def _trade_off_plots(runs, task_agg, points, full, title, metric, slug, plots_dir) -> list[Path]:
    """Metric against trainable parameters, peak memory and rank; the memory split; the loss curves; the lr sweep."""
    device = runs["device"].dropna().iloc[0] if runs["device"].notna().any() else "cpu"
    figures = [
        plots.metric_vs_params(points, full, title, metric, plots_dir, f"{slug}_metric_vs_params"),
        plots.metric_vs_memory(points, full, title, metric, device, plots_dir, f"{slug}_metric_vs_memory"),
        plots.memory_split(points, full, title, plots_dir, f"{slug}_memory_split"),
        plots.metric_vs_rank(task_agg[task_agg["method"] != "full"], full, title, metric, plots_dir, f"{slug}_metric_vs_rank"),
        plots.loss_curves(runs[runs["status"] == "done"], title, plots_dir, f"{slug}_loss"),
    ]
    if task_agg.groupby("method")["lr"].nunique().max() > 1:
        figures.append(plots.metric_vs_lr(task_agg, title, metric, plots_dir, f"{slug}_metric_vs_lr"))
    return figures


def _batching(df: pd.DataFrame, agg: pd.DataFrame, tables_dir: Path) -> list[str]:
    """Where one configuration ran with several train.batching: each against random batches, paired (lora_sweep.batching)."""
    compared = compare_batching(df, agg) if len(agg) else pd.DataFrame()
    if compared.empty:
        return []
    compared.to_csv(tables_dir / "batching.csv", index=False)
    shown = pd.DataFrame({
        "method": [f"LoRA r={int(r)} {t}" if m == "lora" else "full FT" for m, r, t in zip(compared["method"], compared["r"], compared["targets"])],
        "batching": compared["batching"],
        "eval metric (95 % CI)": [f"{s * m:.2f} ± {s * c:.2f}" for s, m, c in zip(compared["scale"], compared["mean"], compared["ci95"])],
        "seed std": [f"{s * v:.2f}" for s, v in zip(compared["scale"], compared["seed_std"])],
        "Δ vs random [95 % CI]": [f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (" differs" if diff else "") if pd.notna(d) else "–"
                                  for d, lo, hi, diff in zip(compared["delta"], compared["delta_low"], compared["delta_high"], compared["differs"])],
        "train s": compared["train_s"].map(formatted(".0f")),
    })
    return ["## Batching: does the way batches are drawn move the result?", "",
            "Each configuration against itself on random batches, paired by seed and example on the eval split (the same test "
            "as the rank verdicts). Sorted micro-batches take each step's random batch and only cut it by length, so they should "
            "not differ; length-grouped batches change which examples share a step. \"differs\": the interval excludes 0.", "",
            shown.to_markdown(index=False, disable_numparse=True), ""]


def _learning_curves(runs: pd.DataFrame, ranks: pd.DataFrame, title: str, metric: str, slug: str, tables_dir: Path,
                     plots_dir: Path, out: Path) -> list[str]:
    """The learning-curve section of one task and model: the gap to full FT at each checkpoint, its trend, and
    whether the tuning metric was still rising at the end (lora_sweep/analysis/curves.py)."""
    gaps = curves.gaps(runs, ranks)
    if gaps.empty:
        return []
    lines = ["### Learning curves (tuning split)", "",
             "The paired LoRA − full FT difference on the tuning split at each checkpoint of the budget (95 % interval over "
             "seeds and examples; with one seed, over examples only), and the tuning metric's change from the last "
             "checkpoint to the end (\"rising\": its interval is above 0). A diagnostic: the verdict above is the eval split's.", ""]
    for k, ((context, targets), group) in enumerate(gaps.groupby(["context_id", "targets"], sort=True)):
        chosen = ranks[(ranks["context_id"] == context) & (ranks["targets"] == targets)].set_index("r")
        shown = pd.DataFrame({"rank": [f"r={r}" for r in sorted(group["r"].unique())], "seeds": group.groupby("r")["seeds"].max().tolist()})
        for fraction, at in group.groupby("fraction", sort=True):
            at = at.set_index("r")
            shown[f"Δ at {100 * fraction:.0f} %"] = [f"{at.loc[r, 'delta']:+.2f} [{at.loc[r, 'delta_low']:+.2f}, {at.loc[r, 'delta_high']:+.2f}]"
                                                     if r in at.index else "–" for r in sorted(group["r"].unique())]
        late = [curves.still_improving(runs, chosen.loc[r, "config_id"], metric) for r in sorted(group["r"].unique())]
        shown["tuning change, last stretch"] = [f"{x['change']:+.2f} [{x['low']:+.2f}, {x['high']:+.2f}]" + (" rising" if x["improving"] else "")
                                                if x else "–" for x in late]
        name = re.sub(r"[^\w.-]+", "-", f"{slug}_{targets}_learning_curve{f'_{k}' if k else ''}")
        shown.to_csv(tables_dir / f"{name}.csv", index=False)
        lines += [f"Targets {targets}:", "", shown.to_markdown(index=False, disable_numparse=True), ""]
        full_late = curves.still_improving(runs, chosen["full_config_id"].iloc[0], metric)
        if full_late:
            lines += [f"Full FT's tuning change over the last stretch: {full_late['change']:+.2f} [{full_late['low']:+.2f}, "
                      f"{full_late['high']:+.2f}]" + (" (still rising)." if full_late["improving"] else "."), ""]
        moved = curves.trend(group)
        if moved:
            lines += [f"**The gap to full FT was {moved['word']}** from step {moved['from_step']} to step {moved['to_step']}: Δ averaged "
                      f"over ranks went from {moved['delta_from']:+.2f} to {moved['delta_to']:+.2f}, a change of {moved['change']:+.2f} "
                      f"[{moved['low']:+.2f}, {moved['high']:+.2f}] over {moved['seeds']} seeds"
                      + (" (its interval contains 0)." if moved["word"] == "steady" else "."), ""]
        figure = plots.learning_curves(group, float(chosen["margin"].iloc[0]), f"{title} · {targets}", metric, plots_dir, name)
        lines += [f"![{figure.stem}]({figure.relative_to(out).as_posix()})", ""]
    return lines


def _at_your_scale(estimates: list[AtScale], out: Path, plots_dir: Path) -> list[str]:
    """For each context and targets preset of the sweep: the estimate of its chosen rank and of full FT on the user's
    model, at that context's task and budget, and the estimated peak by component at every rank it swept."""
    lines = [f"## At your scale: {estimates[0].target}", ""]
    for e in estimates:
        if len(estimates) > 1:
            lines += [f"### {e.recommended['task']} · {e.recommended['model']}, {e.recommended['targets']}", ""]
        lines += [e.refused, ""] if e.refused else _estimate_section(e, out, plots_dir)
    return lines


def _estimate_section(at: AtScale, out: Path, plots_dir: Path) -> list[str]:
    run, targets, e = at.run, at.recommended["targets"], at.settings
    chosen = at.per_rank[at.ranks.index(at.rank)]
    device = e.device_bytes
    table = pd.DataFrame([{
        "method": x.label, "trainable": f"{x.trainable:,}", **{k: f"{v / GIB:.2f}" for k, v in x.components().items()},
        "peak GiB": f"{x.peak / GIB:.2f}", "peak at": x.peak_at, "step s": f"{x.seconds:.3f}",
        f"fits {device / GIB:.0f} GiB": "yes" if x.fits(device) else f"no: needs {x.peak / GIB:.1f} GiB"} for x in (chosen, at.full)])
    figure = plots.estimated_memory_vs_rank(at.ranks, at.per_rank, at.full, device, at.target, plots_dir,
                                            _slug("estimate", at.target, run["task"], run["model"], targets))
    return [f"Estimated, not measured (lora_sweep.estimate; its error against measurements is in docs/memory_model.md): one "
            f"training step of {at.target} on this sweep's task and budget (batch {int(run['batch_size'])}, every example at "
            f"the {int(run['max_seq_len'])}-token maximum), {e.resolved_precision} on {e.device}, {e.optimizer}; "
            f"r={at.rank} on {targets} ({at.why}). Memory in GiB; step time at {e.device_tflops:g} TFLOP/s x {e.utilization:g} "
            f"utilization (`lora-estimate model={at.target} ...` for other settings).", "",
            table.to_markdown(index=False, disable_numparse=True), "",
            f"![{figure.stem}]({figure.relative_to(out).as_posix()})", ""]


def _what_ran(df: pd.DataFrame, agg: pd.DataFrame) -> list[str]:
    counts = df["status"].value_counts().to_dict()
    budgets = df[["max_steps", "batch_size", "max_seq_len"]].drop_duplicates().astype("Int64").to_dict("records")
    versions = json.loads(df["versions"].iloc[-1]) if len(df) else {}
    notes = sorted({n for n in agg.get("versions_note", pd.Series(dtype=str)) if n})
    return [
        "## What ran", "",
        f"- runs: {len(df)} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}) in {len(agg)} configurations",
        f"- models: {', '.join(sorted(df['model'].unique()))}; tasks: {', '.join(sorted(df['task'].unique()))}",
        "- training budget (optimizer steps × batch, max tokens): "
        + "; ".join(f"{b['max_steps']} × {b['batch_size']}, {b['max_seq_len']}" for b in budgets),
        f"- devices: {', '.join(sorted(df['device'].dropna().unique()))}; seeds: {', '.join(map(str, sorted(df['seed'].dropna().unique())))}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items() if v)}",
        *[f"- **warning**: {n} (within one configuration)" for n in notes],
        "- metrics are on the GLUE dev split in points (× 100), or on held-out instruction examples (loss in nats per response token); "
        "memory is the peak of live tensor bytes during the training step with the longest batch",
        "",
    ]


def _runs_not_done(df: pd.DataFrame, skipped: list[str]) -> list[str]:
    lines = ["## Every run", ""]
    listing = df.sort_values(["task", "method", "r", "seed"])[["run_id", "task", "method", "targets", "r", "scaling", "lr", "seed", "status", "primary_value", "error"]]
    lines += [listing.astype(object).fillna("").to_markdown(index=False, disable_numparse=True), ""]
    if skipped:
        lines += ["Record files that were not read:", ""] + [f"- {s}" for s in skipped] + [""]
    return lines
