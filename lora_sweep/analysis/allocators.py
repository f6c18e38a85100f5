"""Automatic rank allocation put to the test against the grid (`+sweep=autorank`): the report's section.

An allocator chooses each module's rank instead of one r for all: EVA before training (from activations), AdaLoRA
during it (by pruning singular triplets), or a rank pattern given up front (the rank advisor's, from full FT's ΔW).
Each is compared, paired by seed and example, with uniform LoRA at the same budget (the same r, the same targets,
the same context) and with full FT; beside that, what it costs on top, the ranks it chose next to full FT's ΔW
effective ranks, whether the allocators agree on where rank is needed, and each run's ranks as a rank-pattern file
that `method.rank_pattern=` re-trains as plain LoRA.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats as scipy_stats

from lora_sweep.analysis import plots, stats, tables
from lora_sweep.analysis.diagnostics import layer_and_matrix, write_pattern
from lora_sweep.settings import CONF_DIR

UNIFORM = "uniform"
GRID = Path(CONF_DIR) / "sweep" / "rank.yaml"  # the main job's grid of ranks: what an allocator would spare


def _grid_size() -> int:
    """How many ranks the main job's grid sweeps (conf/sweep/rank.yaml)."""
    ranks = yaml.safe_load(GRID.read_text(encoding="utf-8"))["hydra"]["sweeper"]["params"]["method.r"]
    return len(str(ranks).split(","))


def _interval(result) -> str:
    return f"{result.delta:+.2f} [{result.low:+.2f}, {result.high:+.2f}]" if result is not None else "–"


def _mean_ranks(runs: pd.DataFrame, config_id: str) -> pd.Series:
    """Each module's rank, mean over the configuration's done runs."""
    done = runs[(runs["config_id"] == config_id) & (runs["status"] == "done") & runs["module_ranks"].notna()]
    return pd.DataFrame(list(done["module_ranks"])).mean()


def section(runs: pd.DataFrame, agg: pd.DataFrame, ranks: pd.DataFrame, updates: dict[str, pd.DataFrame] | None, out: Path) -> list[str]:
    """The section, for every context, targets and budget rank where an allocator ran beside uniform LoRA."""
    if agg.empty or "allocator" not in agg:
        return []
    adapters = tables.tuned(agg[agg["method"] != "full"], ["context_id", "targets", "r"])
    lines = []
    for (context, targets, r), group in adapters.groupby(["context_id", "base_targets", "r"], sort=True):
        uniform = group[group["allocator"] == UNIFORM]
        allocated = group[group["allocator"] != UNIFORM]
        if uniform.empty or allocated.empty:
            continue
        lines += _comparison(runs, agg, uniform.iloc[0], allocated, ranks, updates, out)
    if not lines:
        return []
    return ["## Automatic rank allocation against the grid", "",
            "Each allocator chooses every module's rank at the budget of uniform rank r on the same targets: EVA from the SVD "
            "of activations on the run's first training batches, before training; AdaLoRA by pruning singular triplets during "
            "training; a rank pattern given up front (the rank advisor's, made by lora-analyze from the grid's full-FT ΔW "
            "spectra). Δ is paired by seed and example on the eval split (positive: the allocator is better), as in the rank "
            "table; \"differs\": the interval excludes 0, one comparison at a time (with three allocators, one of the three "
            "intervals may miss by chance). Every allocator and uniform LoRA run at the learning rates given (AdaLoRA is "
            "another parametrisation than LoRA's), and each one's is chosen on the tuning split, never on the eval split.", "",
            *lines]


def _comparison(runs, agg, uniform: pd.Series, allocated: pd.DataFrame, ranks: pd.DataFrame, updates, out: Path) -> list[str]:
    r, unit = int(uniform["r"]), uniform["primary_unit"]
    full = ranks.set_index("config_id") if len(ranks) else pd.DataFrame()
    paired = full.loc[uniform["config_id"]] if uniform["config_id"] in full.index else None
    full_runs = agg[agg["config_id"] == paired["full_config_id"]] if paired is not None and "full_config_id" in paired else agg.iloc[0:0]
    full_seconds = full_runs["train_s_mean"].iloc[0] if len(full_runs) else None
    grid_seconds = _grid_size() * uniform["train_s_mean"]
    rows = []
    for _, row in allocated.sort_values("allocator").iterrows():
        versus = tables.compare(runs, row, uniform)
        against_full = full.loc[row["config_id"]] if row["config_id"] in full.index else None
        chosen = _mean_ranks(runs, row["config_id"])
        rows.append({
            "allocator": row["allocator"], "lr (tuned)": f"{row['lr']:g}", "seeds": len(row["seeds"]),
            "ranks (mean; min–max)": f"{chosen.sum():.0f} in all; {chosen.min():.0f}–{chosen.max():.0f}",
            "trained params": f"{row['params_adapter_mean']:,.0f}",
            "kept params (= uniform?)": f"{row['params_kept_mean']:,.0f} ({'=' if row['params_kept_mean'] == uniform['params_kept_mean'] else '≠'})",
            f"Δ vs uniform r={r}, {unit}": _interval(versus) + (" differs" if versus is not None and stats.differs(versus) else ""),
            f"Δ vs full FT, {unit}": (f"{against_full['delta']:+.2f} [{against_full['delta_low']:+.2f}, {against_full['delta_high']:+.2f}] "
                                      f"{against_full['verdict']}" if against_full is not None and pd.notna(against_full.get("delta")) else "–"),
            "train s (× uniform)": f"{row['train_s_mean']:.0f} (×{row['train_s_mean'] / uniform['train_s_mean']:.2f})",
            "extra cost": _extra_cost(row, uniform, full_seconds),
        })
    table = pd.DataFrame(rows)
    slug = f"{uniform['task']}_{uniform['model']}_{uniform['base_targets']}_r{r}".replace("/", "-").replace(",", "-")
    table.to_csv(out / "tables" / f"allocators_{slug}.csv", index=False)
    exported = _export(runs, allocated, r, out / "tables" / "allocated")
    heatmap = _heatmap(runs, allocated, updates, f"{uniform['task']} · {uniform['model']} · {uniform['base_targets']} at the budget of r={r}",
                       out / "plots", f"allocators_{slug}")
    return [f"### {uniform['task']} · {uniform['model']}, {uniform['base_targets']}, budget of uniform r={r}", "",
            f"Uniform r={r} (lr {uniform['lr']:g}, chosen on the tuning split): {uniform['primary_value_mean'] * uniform['primary_scale']:.2f} ± "
            f"{uniform['primary_value_ci95'] * uniform['primary_scale']:.2f} {unit} over {len(uniform['seeds'])} seeds"
            + (f", Δ vs full FT {paired['delta']:+.2f} [{paired['delta_low']:+.2f}, {paired['delta_high']:+.2f}] {paired['verdict']}"
               if paired is not None and pd.notna(paired.get("delta")) else "") + ", "
            f"{uniform['params_adapter_mean']:,.0f} adapter parameters, {uniform['train_s_mean']:.0f} s of training a run. "
            f"The grid an allocator would spare (the main job's {_grid_size()} ranks) costs about {_grid_size()} × that = "
            f"{grid_seconds:.0f} s of training per seed.", "",
            table.to_markdown(index=False, disable_numparse=True), "",
            "Trained: the adapter parameters trained (AdaLoRA: its initial budget, with the singular values); kept: Σ rank × (d + k) "
            "over the final ranks, what the exported pattern trains as plain LoRA. Extra cost: EVA's data pass before training "
            "(two forwards of it probed for memory, as training probes one step); AdaLoRA's is inside its training time (its importance "
            "scores and masks at every step); a rank pattern's is what made it (the advisor: full FT's runs, which every sweep here "
            "trains anyway as the baselines). Times are means of wall-clock seconds with the sweep's runs sharing the machine's cores: "
            "a rough guide; benchmarks/allocators.py measures AdaLoRA's step and EVA's pass against uniform LoRA side by side.", "",
            *_agreement(runs, allocated, updates), "",
            f"![{heatmap.stem}]({heatmap.relative_to(out).as_posix()})", "",
            f"Each run's ranks as a rank pattern (`method.rank_pattern=<file> method.r={r}` re-trains that choice as plain LoRA; "
            f"rank 0 leaves a module unadapted): {', '.join(f'`{p.relative_to(out).as_posix()}`' for p in exported)}.", ""]


def _extra_cost(row: pd.Series, uniform: pd.Series, full_seconds: float | None) -> str:
    """What the allocator costs on top of a uniform run: EVA's pass, AdaLoRA's extra training time, or for a rank
    pattern the full-FT runs the advisor reads (the baselines, trained anyway)."""
    if row["allocator"] == "eva":
        return f"EVA pass {row['init_s_mean']:.0f} s a run"
    if row["allocator"] == "adalora":
        return f"{row['train_s_mean'] - uniform['train_s_mean']:+.0f} s of training a run"
    return "its making: the advisor's reads full FT's runs" + (f" ({full_seconds:.0f} s each, trained anyway as the baselines)"
                                                               if full_seconds is not None else "")


def _agreement(runs: pd.DataFrame, allocated: pd.DataFrame, updates) -> list[str]:
    """Spearman's ρ between the allocators' mean per-module ranks (and full FT's ΔW effective rank, where measured), and
    between the seeds of each allocator: do they put rank in the same places, and does one allocator, seed to seed?"""
    means = {row["allocator"]: _mean_ranks(runs, row["config_id"]) for _, row in allocated.iterrows()}
    effective = _full_effective_ranks(updates)
    if effective is not None:
        means["full FT ΔW rank (90 %)"] = effective
    parts = []
    for (a, x), (b, y) in itertools.combinations(means.items(), 2):
        common = x.index.intersection(y.index)
        if len(common) >= 3 and x[common].nunique() > 1 and y[common].nunique() > 1:
            rho, p = scipy_stats.spearmanr(x[common], y[common])
            parts.append(f"{a} vs {b}: ρ = {rho:+.2f} (p = {p:.2f})")
    within = []
    for _, row in allocated.iterrows():
        done = runs[(runs["config_id"] == row["config_id"]) & (runs["status"] == "done") & runs["module_ranks"].notna()]
        seeds = [pd.Series(m) for m in done["module_ranks"]]
        rhos = [scipy_stats.spearmanr(a, b[a.index])[0] for a, b in itertools.combinations(seeds, 2) if a.nunique() > 1 and b.nunique() > 1]
        if rhos:
            within.append(f"{row['allocator']} {np.mean(rhos):+.2f}")
    if not parts and not within:
        return ["Agreement: too few modules with differing ranks to compare."]
    return ["**Do the allocators agree on where rank is needed?** Spearman's ρ between their per-module ranks (mean over seeds; "
            "p from scipy, with few modules a rough guide): " + ("; ".join(parts) or "no pair with varying ranks") + ". "
            "Seed to seed, mean ρ within each allocator: " + ("; ".join(within) or "–") + "."]


def _full_effective_ranks(updates) -> pd.Series | None:
    """Full FT's ΔW effective rank (90 % of the energy) per module, mean over its seeds (lora_sweep.updates' table)."""
    if not updates or updates["update_ranks"].empty:
        return None
    full = updates["update_ranks"][updates["update_ranks"]["method"] == "full"]
    return full.groupby("module")["rank90"].mean() if len(full) else None


def _heatmap(runs, allocated: pd.DataFrame, updates, title: str, folder: Path, name: str) -> Path:
    """One figure: each allocator's mean rank per layer and matrix, beside full FT's ΔW effective rank on the same modules."""
    panels = [(f"{row['allocator']}: rank, mean over seeds", _mean_ranks(runs, row["config_id"]))
              for _, row in allocated.sort_values("allocator").iterrows()]
    effective = _full_effective_ranks(updates)
    if effective is not None:
        modules = panels[0][1].index
        panels.append(("full FT ΔW rank (90 %)", effective[effective.index.isin(modules)]))
    grids = [(label, _layers_by_matrix(values)) for label, values in panels]
    return plots.rank_heatmaps(grids, title, folder, name)


def _layers_by_matrix(values: pd.Series) -> pd.DataFrame:
    keys = [layer_and_matrix(m) for m in values.index]
    frame = pd.DataFrame({"layer": [k[0] for k in keys], "matrix": [k[1] for k in keys], "rank": values.to_numpy()})
    return frame.pivot_table(index="layer", columns="matrix", values="rank", aggfunc="mean")


def _export(runs: pd.DataFrame, allocated: pd.DataFrame, r: int, folder: Path) -> list[Path]:
    """Every allocator run's final ranks as a rank-pattern file (every target module, 0 where it was dropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for _, row in allocated.sort_values("allocator").iterrows():
        done = runs[(runs["config_id"] == row["config_id"]) & (runs["status"] == "done") & runs["module_ranks"].notna()]
        for _, run in done.sort_values("seed").iterrows():
            who = run["rank_pattern"] if isinstance(run["rank_pattern"], str) else row["allocator"]  # a pattern by its file's name
            name = re.sub(r"[^\w.-]+", "-", f"{who}_r{r}_seed{int(run['seed'])}")
            paths.append(write_pattern(dict(run["module_ranks"]), folder / f"{name}.yaml",
                                       f"{row['allocator']} ranks of run {run['run_id']} (seed {int(run['seed'])}), budget of uniform r={r}:\n"
                                       f"{int(run['params_kept']):,} adapter parameters as plain LoRA; "
                                       f"train with method.rank_pattern=<this file> method.r={r}"))
    return paths
