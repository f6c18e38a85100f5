"""A results folder -> runs table (Parquet, CSV), summary tables (Markdown, CSV), plots and report.md."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.load import load_records
from analysis.tables import aggregate, pair_with_baselines, recommend


def _slug(*parts) -> str:
    return "_".join(str(p).replace("/", "-") for p in parts)


def _baseline_row(agg: pd.DataFrame, task: str, model: str, baseline_ids: set[str]) -> pd.Series | None:
    """The full-FT configuration the LoRA runs of a task were paired with (or the only one there is)."""
    full = agg[(agg["method"] == "full") & (agg["task"] == task) & (agg["model"] == model)]
    paired = full[full["run_ids"].map(lambda ids: bool(baseline_ids & set(ids)))]
    chosen = paired if len(paired) else full
    return chosen.iloc[0] if len(chosen) else None


def _rank_table(paired: pd.DataFrame) -> pd.DataFrame:
    scale = paired["primary_scale"].iloc[0]

    def pm(mean, ci):
        return f"{scale * mean:.3f}" + (f" ± {scale * ci:.3f}" if pd.notna(ci) else "")

    rows = paired.sort_values(["targets", "scaling", "lr", "r"])
    return pd.DataFrame({
        "targets": rows["targets"], "scaling": rows["scaling"], "lr": rows["lr"].map("{:g}".format), "r": rows["r"].astype(int),
        "seeds": rows["seeds"].map(len),
        "trainable": rows["params_trainable_mean"].map("{:,.0f}".format),
        "metric (± 95% CI)": [pm(m, c) for m, c in zip(rows["primary_value_mean"], rows["primary_value_ci95"])],
        "full FT": [pm(m, c) for m, c in zip(rows["full_mean"], rows["full_ci95"])],
        f"Δ {rows['primary_unit'].iloc[0]} (+ = better)": rows["delta"].map("{:+.3f}".format),
        "% of full": rows["pct_of_full"].map("{:.1f}".format),
        "params vs full": rows["param_ratio"].map("{:.3%}".format),
        "memory vs full": rows["memory_ratio"].map("{:.0%}".format),
        "peak MiB": rows["peak_mib_mean"].map("{:.0f}".format),
        "train s": rows["train_s_mean"].map("{:.0f}".format),
    })


def write(records_dir: str | Path, tolerance: float | None = None) -> Path:
    """Analyse the records in `records_dir` and write everything beside it (its parent folder); returns the report's path.

    Everything is written into a hidden folder there first and moved into place at the end, so a killed analysis
    leaves either the earlier outputs or no report at all, never a report that disagrees with its tables."""
    df, skipped = load_records(records_dir)
    dest = Path(records_dir).parent
    stage = Path(tempfile.mkdtemp(dir=dest, prefix=".analysis-"))
    try:
        _write(df, skipped, stage, tolerance)
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


def _write(df: pd.DataFrame, skipped: list[str], out: Path, tolerance: float | None) -> Path:
    df.to_parquet(out / "runs.parquet", index=False)
    df.to_csv(out / "runs.csv", index=False)
    agg = aggregate(df)
    paired = pair_with_baselines(df, agg) if len(agg) else agg
    tables_dir, plots_dir = out / "tables", out / "plots"
    tables_dir.mkdir(exist_ok=True)
    recommendation = recommend(paired, tolerance) if len(paired) else pd.DataFrame()
    for name, table in {"aggregate": agg, "paired": paired, "recommendation": recommendation}.items():
        table.to_csv(tables_dir / f"{name}.csv", index=False)

    lines = ["# lora-sweep report", ""]
    lines += _what_ran(df)
    lines += ["## Rank recommendation", "",
              "The smallest rank within the tolerance of full fine-tuning (with several seeds: the worse end of its 95% CI).", ""]
    lines += [recommendation[["task", "model", "targets", "tolerance", "unit", "recommendation"]].to_markdown(index=False, disable_numparse=True) if len(recommendation) else "No LoRA run finished.", ""]
    (tables_dir / "recommendation.md").write_text(lines[-2] + "\n")

    panels = []
    for (task, model), runs in df.groupby(["task", "model"], sort=True):
        title = f"{task} · {model}"
        lines += [f"## {title}", ""]
        task_paired = paired[(paired["task"] == task) & (paired["model"] == model)] if len(paired) else paired
        task_agg = agg[(agg["task"] == task) & (agg["model"] == model)] if len(agg) else agg
        baseline_ids = set().union(*task_paired["baseline_ids"].map(set)) if len(task_paired) else set()
        full = _baseline_row(agg, task, model, baseline_ids) if len(agg) else None
        metric = runs["primary_metric"].dropna().iloc[0] if runs["primary_metric"].notna().any() else "metric"
        device = runs["device"].dropna().iloc[0] if runs["device"].notna().any() else "cpu"
        if full is None:
            lines += ["No full fine-tuning baseline finished for this task: differences from full FT cannot be shown.", ""]
        if len(task_paired):
            notes = sorted(set(task_paired["baseline_note"]) - {""})
            lines += [f"Note: {n}." for n in notes] + ([""] if notes else [])
            table = _rank_table(task_paired)
            slug = _slug(task, model)
            (tables_dir / f"{slug}.md").write_text(table.to_markdown(index=False, disable_numparse=True) + "\n")
            table.to_csv(tables_dir / f"{slug}.csv", index=False)
            lines += [table.to_markdown(index=False, disable_numparse=True), ""]
            points = plots.best_lr(task_paired)
            figures = [
                plots.metric_vs_params(points, full, title, metric, plots_dir, f"{slug}_metric_vs_params"),
                plots.metric_vs_memory(points, full, title, metric, device, plots_dir, f"{slug}_metric_vs_memory"),
                plots.memory_split(points, full, title, plots_dir, f"{slug}_memory_split"),
                plots.metric_vs_rank(task_paired, full, title, metric, plots_dir, f"{slug}_metric_vs_rank"),
                plots.loss_curves(runs[runs["status"] == "done"], title, plots_dir, f"{slug}_loss"),
            ]
            if task_agg.groupby("method")["lr"].nunique().max() > 1:
                figures.append(plots.metric_vs_lr(task_agg, title, metric, plots_dir, f"{slug}_metric_vs_lr"))
            lines += [f"![{f.stem}]({f.relative_to(out).as_posix()})" for f in figures] + [""]
            panels.append((title, points, full, metric))
        else:
            lines += ["No LoRA run of this task finished.", ""]
    if len(panels) > 1:
        figure = plots.overview(panels, plots_dir, "overview")
        lines += ["## Overview across tasks", "", f"![overview]({figure.relative_to(out).as_posix()})", ""]

    lines += _runs_not_done(df, skipped)
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _what_ran(df: pd.DataFrame) -> list[str]:
    counts = df["status"].value_counts().to_dict()
    budgets = df[["max_steps", "batch_size", "max_seq_len"]].drop_duplicates().astype("Int64").to_dict("records")
    versions = json.loads(df["versions"].iloc[-1]) if len(df) else {}
    return [
        "## What ran", "",
        f"- runs: {len(df)} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})",
        f"- models: {', '.join(sorted(df['model'].unique()))}; tasks: {', '.join(sorted(df['task'].unique()))}",
        "- training budget (optimizer steps × batch, max tokens): "
        + "; ".join(f"{b['max_steps']} × {b['batch_size']}, {b['max_seq_len']}" for b in budgets),
        f"- devices: {', '.join(sorted(df['device'].dropna().unique()))}; seeds: {', '.join(map(str, sorted(df['seed'].dropna().unique())))}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items() if v)}",
        "- metrics are on the GLUE dev split in points (× 100), or on held-out instruction examples (loss in nats per response token); "
        "memory is the peak of live tensor bytes during one training step",
        "",
    ]


def _runs_not_done(df: pd.DataFrame, skipped: list[str]) -> list[str]:
    lines = ["## Every run", ""]
    listing = df.sort_values(["task", "method", "r", "seed"])[["run_id", "task", "method", "targets", "r", "scaling", "lr", "seed", "status", "primary_value", "error"]]
    lines += [listing.astype(object).fillna("").to_markdown(index=False, disable_numparse=True), ""]
    if skipped:
        lines += ["Record files that were not read:", ""] + [f"- {s}" for s in skipped] + [""]
    return lines
