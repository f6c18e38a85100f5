"""Tables from the run DataFrame: seed aggregates per configuration, the choices made on the tuning split, paired
comparisons with full FT, the rank recommendation, flags on suspicious runs, and the end-of-sweep summary.

Runs are grouped by their configuration id (lora_sweep.identity: the identity minus the seed), never by a list of
columns kept here, and compared only within one context (the same model, data, budget and device). Every choice
(the learning rate or alpha policy of a rank, which full-FT configuration is the baseline) is made on the tuning
split (`tune_value`); the eval split (`primary_value`) is only reported.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from lora_sweep.analysis import stats
from lora_sweep.metrics import metric_info

# Shown beside a configuration; taken from its first run (the configuration id already says they agree).
DESCRIBE = ["config_id", "context_id", "task", "model", "method", "targets", "base_targets", "allocator", "rank_pattern", "scaling", "alpha_policy", "r", "lr",
            "max_steps", "batch_size", "max_seq_len", "batching", "batching_free_id", "device", "primary_metric", "higher_is_better", "primary_scale",
            "primary_unit", "params_total"]
MEASURES = ["primary_value", "tune_value", "params_trainable", "params_adapter", "params_kept", "peak_mib", "train_s", "init_s",
            "grad_after_backward_mib", "forgetting"]
CHANCE_MARGIN = 0.01  # a metric within one point of the best constant predictor's is flagged as chance level


def oriented(values, higher_is_better):
    """Values turned so that larger is better (a loss is negated)."""
    return np.where(higher_is_better, 1.0, -1.0) * values


def formatted(fmt: str):
    """A formatter for Series.map: the format spec for values, "-" for missing ones."""
    return lambda v: format(v, fmt) if pd.notna(v) else "-"


def sweep_summary(df: pd.DataFrame) -> str:
    """The compact table printed at the end of a sweep (`df`: its runs' rows): one line per run, against its own
    seed's baseline (single runs: the report, not this table, says what is significant)."""
    base = df.set_index("run_id")["primary_value"]
    table = pd.DataFrame({
        "run": np.where(df["method"] == "full", "full FT", "LoRA r=" + df["r"].astype("Int64").astype(str)),
        "targets": df["targets"].fillna("all"),
        "seed": df["seed"],
        "trainable": df["params_trainable"].map(formatted(",.0f")),
        "metric": df["primary_metric"].fillna("") + "=" + df["primary_value"].map(formatted(".4f")),
        "this seed vs full FT": (df["primary_scale"] * oriented(df["primary_value"] - df["baseline_run_id"].map(base),
                                                                df["higher_is_better"])).map(formatted("+.2f")),
        "peak MiB": df["peak_mib"].map(formatted(".0f")),
        "train s": df["train_s"].map(formatted(".0f")),
        "status": df["status"],
    })
    order = np.lexsort((df["run_id"].to_numpy(), df["seed"].fillna(0).to_numpy(), df["r"].fillna(0).to_numpy(),
                        (df["method"] != "full").to_numpy()))  # ties (same rank and seed) in run-id order, not load order
    return table.iloc[order].to_string(index=False)


def ci95(values: pd.Series) -> float:
    """Half-width of the 95 % confidence interval of the mean over seeds (Student t); NaN for fewer than two values."""
    values = values.dropna()
    if len(values) < 2:
        return float("nan")
    return float(scipy_stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration that finished: mean, std, 95 % CI half-width and n of each measure over seeds,
    and a note where its seeds ran different code or library versions."""
    measures = MEASURES + [c for c in df.columns if c.startswith(("metric_", "mem_"))]
    rows = []
    for _, runs in df.groupby("config_id", sort=True):
        group = runs[runs["status"] == "done"]
        if group.empty:
            continue
        row = group.iloc[0][DESCRIBE].to_dict()
        row["seeds_not_done"] = sorted(runs.loc[runs["status"] != "done", "seed"].tolist())  # diverged or failed
        row["seeds"] = sorted(group["seed"].tolist())
        row["run_ids"] = sorted(group["run_id"])
        row["still_improving"] = int(group["still_improving"].fillna(False).astype(bool).sum())
        commits = group["git_commit"].fillna("unknown")
        row["versions_note"] = "; ".join(note for note, bad in (
            ("seeds ran different library versions", group["versions"].nunique() > 1),
            ("seeds ran different code", commits.str.removesuffix("-dirty").nunique() > 1),
            ("run from a tree with uncommitted changes", commits.str.endswith("-dirty").any())) if bad)
        for column in measures:
            values = group[column].astype(float)
            row.update({f"{column}_mean": values.mean(), f"{column}_std": values.std(ddof=1),
                        f"{column}_ci95": ci95(values), f"{column}_n": int(values.count())})
        rows.append(row)
    return pd.DataFrame(rows)


def tuned(agg: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Within each group of `keys`, the configuration with the best mean on the tuning split (ties: lower lr).
    A configuration that diverged or failed at any seed is chosen only where every candidate did: its mean over
    the surviving seeds would flatter it."""
    if agg.empty:
        return agg
    score = oriented(agg["tune_value_mean"], agg["higher_is_better"])
    ranked = agg.assign(_score=score, _complete=agg["seeds_not_done"].map(len) == 0)
    ranked = ranked.sort_values(["_complete", "_score", "lr"], ascending=[False, False, True])
    return ranked.drop_duplicates(keys).drop(columns=["_score", "_complete"]).sort_values(keys).reset_index(drop=True)


def _outputs(df: pd.DataFrame, config_id: str) -> dict[int, dict]:
    runs = df[(df["config_id"] == config_id) & (df["status"] == "done") & df["examples"].notna()]
    return {int(r["seed"]): r["examples"] for _, r in runs.iterrows()}


def as_array(outputs: list) -> np.ndarray:
    array = np.asarray(outputs, dtype=float)
    return array[:, 0] if array.ndim == 2 and array.shape[1] == 1 else array  # a regression head's single output


def compare(df: pd.DataFrame, a: pd.Series, b: pd.Series) -> stats.PairedResult | None:
    """Paired difference of configuration `a` against `b` (positive: a better) over their common seeds, example by
    example; None when they share no seed with per-example outputs on the same examples."""
    out_a, out_b = _outputs(df, a["config_id"]), _outputs(df, b["config_id"])
    seeds = sorted(set(out_a) & set(out_b))
    seeds = [s for s in seeds if out_a[s]["ids"] == out_b[s]["ids"]]
    if not seeds:
        return None
    labels = out_a[seeds[0]]["labels"]
    info = metric_info(a["primary_metric"])
    return stats.paired_difference([as_array(out_a[s]["outputs"]) for s in seeds], [as_array(out_b[s]["outputs"]) for s in seeds],
                                   None if labels is None else np.asarray(labels), a["primary_metric"],
                                   higher_is_better=info.higher_is_better, scale=info.scale)


def compare_ranks(df: pd.DataFrame, agg: pd.DataFrame, margin: float | None = None) -> pd.DataFrame:
    """For each context, targets preset and rank: the configuration chosen on the tuning split, its paired
    difference from the full-FT configuration chosen the same way, the non-inferiority verdict, and whether it
    differs significantly from the next lower rank."""
    full = tuned(agg[agg["method"] == "full"], ["context_id"]).set_index("context_id")
    lora = tuned(agg[agg["method"] != "full"], ["context_id", "targets", "r"])
    rows = []
    for _, group in lora.groupby(["context_id", "targets"], sort=True):
        previous = None
        for _, row in group.sort_values("r").iterrows():
            out = row.to_dict()
            eps = metric_info(row["primary_metric"]).tolerance if margin is None else margin
            out["margin"] = eps
            if row["context_id"] in full.index:
                base = full.loc[row["context_id"]]
                result = compare(df, row, base)
                out.update(full_config_id=base["config_id"], full_lr=base["lr"], full_mean=base["primary_value_mean"],
                           full_ci95=base["primary_value_ci95"], full_seeds=base["seeds"],
                           param_ratio=row["params_trainable_mean"] / base["params_trainable_mean"],
                           memory_ratio=row["peak_mib_mean"] / base["peak_mib_mean"])
                if result is not None:
                    verdict = stats.non_inferiority(result, eps, unit=row["primary_unit"])
                    out.update(delta=result.delta, delta_low=result.low, delta_high=result.high, paired_seeds=result.n_seeds,
                               delta_var_seed=result.var_seed, delta_var_examples=result.var_examples,  # analysis.adaptive's looks
                               verdict=verdict.status, verdict_text=verdict.text,
                               seeds_needed=verdict.seeds_needed, examples_needed=verdict.examples_needed)
            if previous is not None:
                step = compare(df, row, previous)
                if step is not None:
                    out.update(vs_lower_rank=int(previous["r"]), vs_lower_delta=step.delta, vs_lower_delta_low=step.low,
                               vs_lower_delta_high=step.high, vs_lower_differs=stats.differs(step) if step.seed_noise_known else None)
            rows.append(out)
            previous = row
    return pd.DataFrame(rows)


def compare_batching(df: pd.DataFrame, agg: pd.DataFrame) -> pd.DataFrame:
    """Each configuration run with sorted or grouped batches against the same configuration on random batches
    (lora_sweep.batching), paired by seed and example: whether the faster batching moved the result."""
    rows = []
    for _, group in agg.groupby("batching_free_id", sort=True):
        random = group[group["batching"] == "random"]
        if random.empty or len(group) < 2:
            continue
        base = random.iloc[0]
        for _, row in group.sort_values("batching").iterrows():
            out = {"method": row["method"], "r": row["r"], "targets": row["targets"], "batching": row["batching"],
                   "mean": row["primary_value_mean"], "ci95": row["primary_value_ci95"], "seed_std": row["primary_value_std"],
                   "seeds": row["seeds"], "unit": row["primary_unit"], "scale": row["primary_scale"], "train_s": row["train_s_mean"],
                   "delta": None, "delta_low": None, "delta_high": None, "paired_seeds": None, "differs": None}
            result = compare(df, row, base) if row["batching"] != "random" else None
            if result is not None:
                out.update(delta=result.delta, delta_low=result.low, delta_high=result.high, paired_seeds=result.n_seeds,
                           differs=stats.differs(result) if result.seed_noise_known else None)
            rows.append(out)
    return pd.DataFrame(rows)


def recommend(ranks: pd.DataFrame) -> pd.DataFrame:
    """Per context and targets preset: the smallest rank that is non-inferior to full FT (the low end of the paired
    interval above −margin), or which case holds when none is: LoRA significantly worse, or too little evidence."""
    rows = []
    for (context, targets), group in ranks.groupby(["context_id", "targets"], sort=True):
        group = group.sort_values("r")
        first = group.iloc[0]
        row = {"context_id": context, "task": first["task"], "model": first["model"], "targets": targets,
               "rank_pattern": first["rank_pattern"],
               "margin": first["margin"], "unit": first["primary_unit"]}
        judged = group[group["verdict"].notna()] if "verdict" in group else group.iloc[0:0]
        if judged.empty:
            row["recommendation"] = "no paired full-FT baseline with per-example outputs: nothing to compare with"
        elif (judged["verdict"] == "qualifies").any():
            best = judged[judged["verdict"] == "qualifies"].iloc[0]
            row.update(r=int(best["r"]), lr=best["lr"], delta=best["delta"], delta_low=best["delta_low"], delta_high=best["delta_high"],
                       param_ratio=best["param_ratio"], memory_ratio=best["memory_ratio"], seeds=best["paired_seeds"])
            row["recommendation"] = (f"r={int(best['r'])} (lr={best['lr']:g}, chosen on the tuning split): Δ = {best['delta']:+.2f} "
                                     f"[{best['delta_low']:+.2f}, {best['delta_high']:+.2f}] {row['unit']} against full FT "
                                     f"(lr={best['full_lr']:g}), above −{row['margin']:g}, over {best['paired_seeds']} paired seeds; "
                                     f"{100 * best['param_ratio']:.2f}% of its trainable parameters, "
                                     f"{100 * best['memory_ratio']:.0f}% of its peak memory")
        elif (judged["verdict"] == "worse").all():
            row["recommendation"] = (f"none: LoRA is significantly worse than full FT by more than {row['margin']:g} {row['unit']} "
                                     f"at every rank tried (best: r={int(judged.loc[judged['delta'].idxmax(), 'r'])}, "
                                     f"Δ = {judged['delta'].max():+.2f})")
        else:
            open_ = judged[judged["verdict"] == "inconclusive"]
            best = open_.loc[open_["delta"].idxmax()]
            worse = judged[judged["verdict"] == "worse"]["r"].astype(int).tolist()
            row["recommendation"] = (f"none yet: the evidence is too weak at {', '.join(f'r={int(r)}' for r in open_['r'])}"
                                     + (f" (significantly worse at {', '.join(f'r={r}' for r in worse)})" if worse else "")
                                     + f"; closest: r={int(best['r'])}, {best['verdict_text']}")
        rows.append(row)
    return pd.DataFrame(rows)


def chance_level(metric: str, labels) -> float | None:
    """The metric of the best constant predictor (majority class; 0 for correlations); None for a loss."""
    if labels is None or metric_info(metric).higher_is_better is False:
        return None
    if metric in ("pearson", "spearman"):
        return 0.0
    labels = np.asarray(labels).astype(int)
    constant = np.full(len(labels), np.bincount(labels).argmax())
    return float(stats.METRICS[metric](constant, labels, np.arange(len(labels))[None])[0])


def run_flags(df: pd.DataFrame) -> pd.DataFrame:
    """`done` runs that should not be trusted as they are: training loss ending above where it started, or an eval
    metric at the level of a constant predictor; runs whose loss was still falling at the end of the budget; and LoRA
    runs whose own baseline read other data (a file changed between them): they are not paired."""
    rows = []
    contexts = df.set_index("run_id")["context_id"]
    for _, run in df[df["status"] == "done"].iterrows():
        notes = []
        baseline = run["baseline_run_id"]
        if isinstance(baseline, str) and baseline in contexts and contexts[baseline] != run["context_id"]:
            notes.append(f"its full-FT baseline {baseline} read other data (a data file changed between the two runs): "
                         f"not paired with it")
        if pd.notna(run["final_loss"]) and pd.notna(run["initial_loss"]) and run["final_loss"] > run["initial_loss"]:
            notes.append(f"final training loss {run['final_loss']:.3g} above the initial {run['initial_loss']:.3g}")
        chance = chance_level(run["primary_metric"], (run["examples"] or {}).get("labels")) if isinstance(run["examples"], dict) else None
        if chance is not None and run["primary_value"] <= chance + CHANCE_MARGIN:
            notes.append(f"{run['primary_metric']} {run['primary_value']:.3f} at chance level ({chance:.3f}, a constant predictor)")
        if run["still_improving"]:
            notes.append(f"loss still falling at the end ({run['loss_slope']:+.3f} ± {run['loss_slope_se']:.3f} per 100 steps)")
        if notes:
            rows.append({"run_id": run["run_id"], "method": run["method"], "r": run["r"], "lr": run["lr"], "seed": run["seed"],
                         "flags": "; ".join(notes)})
    return pd.DataFrame(rows, columns=["run_id", "method", "r", "lr", "seed", "flags"])
