"""Learning curves on the tuning split: is the budget, or the rank, what separates LoRA from full FT?

Every run evaluates its tuning split at a few fractions of its budget (train.curve_points) and at the end. For each
rank chosen on the tuning split (analysis/tables.compare_ranks) this gives, at every checkpoint, the paired
LoRA − full FT difference with its interval (the same paired test as the verdict, lora_sweep/analysis/stats.py, on the
tuning split's examples and the seeds both have), and the tuning metric's change over the last stretch of training.
It is a diagnostic: the choice of rank is made, and the verdict reported, as before (never from these curves on
the eval split).

The trend of the gap is the change of Δ from the checkpoint nearest half the budget to the end, averaged over the
ranks seed by seed, with a t interval over seeds: "closing" when it moves significantly towards 0, "widening"
when it moves significantly away, else "steady".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lora_sweep.analysis import stats
from lora_sweep.analysis.tables import as_array, ci95
from lora_sweep.metrics import metric_info


def _points(df: pd.DataFrame, config_id: str) -> dict[int, dict]:
    """seed -> the run's tuning curve (ids, labels and points), for the configuration's finished runs that have one."""
    runs = df[(df["config_id"] == config_id) & (df["status"] == "done") & df["tune_curve"].notna()]
    return {int(r["seed"]): r["tune_curve"] for _, r in runs.iterrows()}


def _at(curve: dict, step: int) -> dict | None:
    return next((p for p in curve["points"] if p["step"] == step), None)


def gaps(df: pd.DataFrame, ranks: pd.DataFrame) -> pd.DataFrame:
    """One row per rank (as chosen in `ranks`) and checkpoint step both it and its full-FT baseline reached at every
    common seed: the tuning metric of each (mean over seeds) and the paired Δ with its interval."""
    if "tune_curve" not in df or not len(ranks) or "full_config_id" not in ranks:
        return pd.DataFrame()
    rows = []
    for _, rank in ranks[ranks["full_config_id"].notna()].iterrows():
        lora, full = _points(df, rank["config_id"]), _points(df, rank["full_config_id"])
        seeds = sorted(s for s in set(lora) & set(full) if lora[s]["ids"] == full[s]["ids"])
        if not seeds:
            continue
        info = metric_info(rank["primary_metric"])
        steps = sorted(set.intersection(*({p["step"] for p in c["points"]} for c in [*(lora[s] for s in seeds), *(full[s] for s in seeds)])))
        labels = lora[seeds[0]]["labels"]
        budget = max(steps)
        for step in steps:
            a = [_at(lora[s], step) for s in seeds]
            b = [_at(full[s], step) for s in seeds]
            result = stats.paired_difference([as_array(p["outputs"]) for p in a], [as_array(p["outputs"]) for p in b],
                                             None if labels is None else np.asarray(labels), rank["primary_metric"],
                                             higher_is_better=info.higher_is_better, scale=info.scale)
            metric = rank["primary_metric"]
            rows.append({"context_id": rank["context_id"], "task": rank["task"], "model": rank["model"], "targets": rank["targets"],
                         "r": int(rank["r"]), "step": step, "fraction": step / budget, "seeds": len(seeds),
                         "lora": info.scale * float(np.mean([p["metrics"][metric] for p in a])),
                         "full": info.scale * float(np.mean([p["metrics"][metric] for p in b])),
                         "delta": result.delta, "delta_low": result.low, "delta_high": result.high,
                         "per_seed": dict(zip(seeds, result.per_seed)), "unit": info.unit})
    return pd.DataFrame(rows)


def trend(group: pd.DataFrame) -> dict[str, float | str] | None:
    """How Δ moved from the checkpoint nearest half the budget to the end, over the ranks of one context and
    targets preset: the mean change per seed (averaged over ranks), its 95 % t interval over seeds, and the word."""
    steps = sorted(group["step"].unique())
    if len(steps) < 2:
        return None
    end = steps[-1]
    mid = min(steps[:-1], key=lambda s: abs(s / end - 0.5))
    change: dict[int, list[float]] = {}
    for _, by_rank in group.groupby("r"):
        at = by_rank.set_index("step")
        if mid in at.index and end in at.index:
            for seed, value in at.loc[end, "per_seed"].items():
                if seed in at.loc[mid, "per_seed"]:
                    change.setdefault(seed, []).append(value - at.loc[mid, "per_seed"][seed])
    per_seed = pd.Series({seed: float(np.mean(v)) for seed, v in change.items()})
    if len(per_seed) < 2:
        return None
    mean, half = float(per_seed.mean()), ci95(per_seed)
    start = float(group[group["step"] == mid]["delta"].mean())
    if mean - half <= 0 <= mean + half:
        word = "steady"
    else:
        word = "closing" if np.sign(mean) == -np.sign(start) else "widening"
    return {"from_step": int(mid), "to_step": int(end), "delta_from": start, "delta_to": float(group[group["step"] == end]["delta"].mean()),
            "change": mean, "low": mean - half, "high": mean + half, "seeds": len(per_seed), "word": word}


def still_improving(df: pd.DataFrame, config_id: str, metric: str) -> dict[str, float] | None:
    """The tuning metric's change over the last stretch of training (last checkpoint before the end -> end), in display
    units oriented so that positive is better, mean over seeds with its 95 % t interval."""
    info = metric_info(metric)
    changes = []
    for curve in _points(df, config_id).values():
        points = sorted(curve["points"], key=lambda p: p["step"])
        if len(points) >= 2:
            sign = info.scale if info.higher_is_better else -info.scale
            changes.append(sign * (points[-1]["metrics"][metric] - points[-2]["metrics"][metric]))
    if len(changes) < 2:
        return None
    values = pd.Series(changes)
    mean, half = float(values.mean()), ci95(values)
    return {"change": mean, "low": mean - half, "high": mean + half, "improving": bool(mean - half > 0)}
