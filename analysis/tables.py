"""Tables from the run DataFrame: the end-of-sweep summary, seed aggregates paired with full FT, and the rank recommendation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.load import load_records
from lora_sweep.metrics import metric_info

# A configuration is everything that defines a run except its seed.
CONFIG = ["task", "model", "method", "targets", "scaling", "r", "lr", "max_steps", "batch_size", "max_seq_len"]
MEASURES = ["primary_value", "params_trainable", "peak_mib", "train_s"]
METRIC_FIELDS = ["primary_metric", "higher_is_better", "primary_scale", "primary_unit"]


def oriented(values, higher_is_better):
    """Values turned so that larger is better (a loss is negated)."""
    return np.where(higher_is_better, 1.0, -1.0) * values


def _fmt(fmt: str):
    return lambda v: format(v, fmt) if pd.notna(v) else "-"


def sweep_summary(records_dir: str | Path, run_ids: list[str]) -> str:
    """The compact table printed at the end of a sweep: one line per run, against its full-FT baseline."""
    df, _ = load_records(records_dir, [rid for rid in run_ids if (Path(records_dir) / f"{rid}.json").is_file()])
    base = df.set_index("run_id")["primary_value"]
    table = pd.DataFrame({
        "run": np.where(df["method"] == "full", "full FT", "LoRA r=" + df["r"].astype("Int64").astype(str)),
        "targets": df["targets"].fillna("all"),
        "trainable": df["params_trainable"].map(_fmt(",.0f")),
        "metric": df["primary_metric"].fillna("") + "=" + df["primary_value"].map(_fmt(".4f")),
        "vs full FT (+ = better)": (df["primary_scale"] * oriented(df["primary_value"] - df["baseline_run_id"].map(base),
                                                                   df["higher_is_better"])).map(_fmt("+.2f")),
        "peak MiB": df["peak_mib"].map(_fmt(".0f")),
        "train s": df["train_s"].map(_fmt(".0f")),
        "status": df["status"],
    })
    order = np.lexsort((df["r"].fillna(0).to_numpy(), (df["method"] != "full").to_numpy()))
    return table.iloc[order].to_string(index=False)


def ci95(values: pd.Series) -> float:
    """Half-width of the 95 % confidence interval of the mean (Student t); NaN for fewer than two values."""
    values = values.dropna()
    if len(values) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration that finished: mean, std, 95 % CI half-width and n of each measure over seeds."""
    done = df[df["status"] == "done"]
    measures = MEASURES + [c for c in done.columns if c.startswith(("metric_", "mem_"))]
    rows = []
    for _, group in done.groupby(CONFIG, dropna=False, sort=True):
        row = group.iloc[0][CONFIG + METRIC_FIELDS + ["alpha_policy", "params_total"]].to_dict()
        row["seeds"] = sorted(group["seed"].tolist())
        row["run_ids"] = sorted(group["run_id"])
        row["baseline_ids"] = sorted(group["baseline_run_id"].dropna().unique())
        for column in measures:
            values = group[column].astype(float)
            row.update({f"{column}_mean": values.mean(), f"{column}_std": values.std(ddof=1),
                        f"{column}_ci95": ci95(values), f"{column}_n": int(values.count())})
        rows.append(row)
    return pd.DataFrame(rows)


def pair_with_baselines(df: pd.DataFrame, agg: pd.DataFrame) -> pd.DataFrame:
    """LoRA configurations joined to the full-FT runs their records name: differences and ratios against full FT."""
    done = df[df["status"] == "done"].set_index("run_id")
    lora = agg[agg["method"] == "lora"].copy()
    columns = {"full_mean": [], "full_ci95": [], "full_n": [], "full_trainable": [], "full_peak_mib": [], "baseline_note": []}
    for ids in lora["baseline_ids"]:
        found = done.loc[done.index.intersection(ids)]
        missing = len(ids) - len(found)
        columns["full_mean"].append(found["primary_value"].mean())
        columns["full_ci95"].append(ci95(found["primary_value"]))
        columns["full_n"].append(len(found))
        columns["full_trainable"].append(found["params_trainable"].mean())
        columns["full_peak_mib"].append(found["peak_mib"].mean())
        columns["baseline_note"].append("" if not missing else f"{missing} of {len(ids)} baseline run(s) missing or not done")
    for name, values in columns.items():
        lora[name] = values
    # in the metric's display units (points for fractions), positive when LoRA is better
    lora["delta"] = lora["primary_scale"] * oriented(lora["primary_value_mean"] - lora["full_mean"], lora["higher_is_better"])
    lora["pct_of_full"] = 100 * lora["primary_value_mean"] / lora["full_mean"]
    lora["param_ratio"] = lora["params_trainable_mean"] / lora["full_trainable"]
    lora["memory_ratio"] = lora["peak_mib_mean"] / lora["full_peak_mib"]
    return lora


def recommend(paired: pd.DataFrame, tolerance: float | None = None) -> pd.DataFrame:
    """Per task, model and targets preset: the smallest rank within `tolerance` of full FT.

    The tolerance is in the metric's display units (points for accuracy-like metrics); by default the
    metric's own (1 point; 0.02 nats for a loss). With several seeds a rank qualifies only if the worse
    end of its 95 % CI is within tolerance of the full-FT mean; with one seed, its single value is
    compared. Among configurations at the same rank (alpha policies, learning rates) the best mean
    wins; ties go to the lower learning rate."""
    rows = []
    for (task, model, targets), group in paired.groupby(["task", "model", "targets"], sort=True):
        first = group.iloc[0]
        tol = metric_info(first["primary_metric"]).tolerance if tolerance is None else tolerance
        unit = first["primary_unit"]
        score = oriented(group["primary_value_mean"], group["higher_is_better"])
        worst = score - group["primary_value_ci95"].fillna(0)
        full = oriented(group["full_mean"], group["higher_is_better"])
        qualifies = group["primary_scale"] * (worst - full) >= -tol
        ranked = group.assign(score=score).sort_values(["r", "score", "lr"], ascending=[True, False, True])
        candidates = ranked[qualifies.loc[ranked.index] & ranked["full_mean"].notna()]
        row = {"task": task, "model": model, "targets": targets, "tolerance": tol, "unit": unit}
        if group["full_mean"].isna().all():
            row["recommendation"] = "no full-FT baseline finished: nothing to compare with"
        elif candidates.empty:
            best = ranked.sort_values("score", ascending=False).iloc[0]
            row["recommendation"] = f"none within tolerance (best: r={int(best['r'])}, {best['delta']:+.2f} {unit} against full FT)"
        else:
            best = candidates.iloc[0]
            row.update(r=int(best["r"]), scaling=best["scaling"], lr=best["lr"], delta=best["delta"],
                       param_ratio=best["param_ratio"], memory_ratio=best["memory_ratio"], seeds=len(best["seeds"]))
            row["recommendation"] = (f"r={int(best['r'])} ({best['scaling']}, lr={best['lr']:g}): {best['delta']:+.2f} {unit} "
                                     f"against full FT with {100 * best['param_ratio']:.2f}% of its trainable parameters "
                                     f"and {100 * best['memory_ratio']:.0f}% of its peak memory")
        rows.append(row)
    return pd.DataFrame(rows)
