"""Why a rank is enough: the report's section on the updates themselves, from the tables lora_sweep.updates measures.

- LoRA runs: ΔW of every adapted module (PEFT's get_delta_weight on the saved adapter), its spectrum, effective rank
  and amplification factor; subspace similarity φ between a low and a high rank (same seed) and between seeds of the
  high rank, averaged over layers (the LoRA paper's Figures 3-4).
- Full FT runs: ΔW = W_fine-tuned − W₀ for every matrix a LoRA preset can target (W₀ from the model's source).
- The rank advisor: per-module ranks from full FT's ΔW spectra at the parameter budget of a uniform rank.

Artifacts are not committed, so the tables are kept beside the report (`tables/update_*.csv`, `tables/phi.parquet`,
top SPECTRUM_TOP singular values per matrix): a clean clone rebuilds the section from them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats as scipy_stats

from lora_sweep.analysis import plots, tables
from lora_sweep.metrics import metric_info
from lora_sweep.settings import FALLBACK_RANK

SPECTRUM_TOP = 64  # singular values kept per matrix in the cached table
PHI_SEEDS_MAX = 32  # φ between seeds: i, j up to this
LOW_RANK = 8  # φ between ranks: this rank (or the smallest above it) against the highest
TABLES = {"update_ranks": "csv", "update_spectra": "parquet", "phi": "parquet"}  # cached tables and their formats


def layer_and_matrix(name: str) -> tuple[int, str]:
    """'bert.encoder.layer.3.attention.self.query' -> (3, 'attention.self.query')."""
    match = re.search(r"\.(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else (-1, name)


def save(tables: dict[str, pd.DataFrame], folder: Path) -> None:
    for name, kind in TABLES.items():
        tables[name].to_csv(folder / f"{name}.csv", index=False) if kind == "csv" else tables[name].to_parquet(folder / f"{name}.{kind}", index=False)


def energy_curve(ranks: pd.DataFrame, spectra: pd.DataFrame, k_max: int = SPECTRUM_TOP) -> pd.DataFrame:
    """Per (run, module): the share of ‖ΔW‖²_F held by the top k singular values, k = 1..k_max (from the kept values)."""
    merged = spectra.merge(ranks[["run_id", "module", "energy"]], on=["run_id", "module"])
    merged = merged.sort_values(["run_id", "module", "k"])
    merged["share"] = merged.groupby(["run_id", "module"])["sigma"].transform(lambda s: np.square(s).cumsum()) / merged["energy"]
    return merged[merged["k"] <= k_max]


def advise(ranks: pd.DataFrame, spectra: pd.DataFrame, modules: list[str], r: int) -> dict[str, int]:
    """Per-module ranks from full FT's ΔW spectra (mean σ² over its seeds) at exactly the adapter parameters of
    uniform rank r on `modules`. Rank moves only between matrices of the same shape, so integer ranks meet the
    budget exactly: within each shape the greedy choice (the next largest σ² of any module) is optimal for the
    captured energy Σ_m Σ_{k ≤ r_m} σ²_{m,k}, since each module's σ² are non-increasing. Every module keeps rank
    ≥ 1; ranks are capped at SPECTRUM_TOP, the singular values kept."""
    full = ranks[(ranks["method"] == "full") & ranks["module"].isin(modules)]
    energy = (spectra[spectra["run_id"].isin(full["run_id"]) & spectra["module"].isin(modules)]
              .assign(sigma2=lambda t: np.square(t["sigma"])).groupby(["module", "k"])["sigma2"].mean())
    shapes = full.drop_duplicates("module").set_index("module")[["d_out", "d_in"]]
    missing = sorted(set(modules) - set(shapes.index))
    if missing:
        raise ValueError(f"no full FT update for {', '.join(missing[:3])}")
    pattern: dict[str, int] = {}
    for _, same in shapes.groupby(["d_out", "d_in"]):
        names = list(same.index)
        cap = min(SPECTRUM_TOP, *same.min(axis=1))
        alloc = dict.fromkeys(names, 1)
        for _ in range(r * len(names) - len(names)):
            gains = {n: energy.get((n, alloc[n] + 1), 0.0) if alloc[n] < cap else -1.0 for n in names}
            best = max(names, key=lambda n: gains[n])
            alloc[best] += 1
        pattern.update(alloc)
    return pattern


def adapter_parameters(pattern: dict[str, int], shapes: pd.DataFrame) -> int:
    """LoRA parameters of a rank pattern: r (d_in + d_out) per module."""
    return int(sum(rank * (shapes.at[m, "d_in"] + shapes.at[m, "d_out"]) for m, rank in pattern.items()))


def write_pattern(pattern: dict[str, int], path: Path, header: str) -> Path:
    path.write_text("".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(pattern, sort_keys=False))
    return path


def spectrum_vs_rank(ranks_table: pd.DataFrame, curve: pd.DataFrame, modules: list[str], points: pd.DataFrame) -> dict[str, Any] | None:
    """Full FT's ΔW energy captured at rank r (mean over `modules` and seeds) against the measured metric at r
    (the rank's tuned configuration): Spearman's ρ and its exact permutation p-value over the ranks swept (a handful of
    points: scipy's t approximation would call a perfect ρ on four points p = 0.00; exactly it is 2/4! = 0.08)."""
    full_ids = ranks_table.loc[ranks_table["method"] == "full", "run_id"].unique()
    full = curve[curve["run_id"].isin(full_ids) & curve["module"].isin(modules)]
    share = full.groupby("k")["share"].mean()
    rows = [(int(r), float(share.get(int(r), np.nan)), float(v)) for r, v in zip(points["r"], points["primary_value_mean"])]
    rows = [row for row in rows if not np.isnan(row[1])]
    if len(rows) < 3:
        return None
    energy, metric = np.array([e for _, e, _ in rows]), np.array([v for _, _, v in rows])
    test = scipy_stats.permutation_test((energy, metric), lambda x, y: scipy_stats.spearmanr(x, y)[0],
                                        permutation_type="pairings", n_resamples=10_000, random_state=0)
    return {"points": rows, "rho": float(test.statistic), "p": float(test.pvalue), "n": len(rows)}




def _ci(values: pd.Series) -> str:
    values = values.dropna()
    half = tables.ci95(values)
    return f"{values.mean():.1f}" + (f" ± {half:.1f}" if np.isfinite(half) else "")


def _rank_summary(ranks: pd.DataFrame) -> pd.DataFrame:
    """Per method, rank and matrix type: effective ranks and amplification, mean over layers per seed, then mean ± 95 % CI over seeds."""
    per_seed = (ranks[~ranks["rank_pattern"]].assign(order=lambda t: t["r"].fillna(0))
                .groupby(["order", "method", "matrix", "seed"])[["rank90", "rank99", "amplification", "d_in", "d_out"]].mean().reset_index())
    rows = []
    for (order, method, matrix), group in per_seed.groupby(["order", "method", "matrix"], sort=True):  # full FT first, then by rank
        rows.append({"method": "full FT" if method == "full" else f"LoRA r={int(order)}", "matrix": matrix,
                     "size": f"{int(group['d_out'].iloc[0])}×{int(group['d_in'].iloc[0])}", "seeds": len(group),
                     "rank 90 %": _ci(group["rank90"]), "rank 99 %": _ci(group["rank99"]),
                     "amplification": _ci(group["amplification"]) if method == "lora" else "-"})
    return pd.DataFrame(rows)


def section(df: pd.DataFrame, agg: pd.DataFrame, recommendation: pd.DataFrame, found: dict[str, pd.DataFrame] | None, note: str,
            out: Path) -> list[str]:
    """The report's section on the updates (the tables lora_sweep.updates measured, and where from: `note`), the rank
    advisor (at the budget of the rank `recommendation` names, else settings.FALLBACK_RANK's), the spectrum against the
    rank curve, and forgetting."""
    lines = ["## Why a rank is enough: the updates, the rank advisor, forgetting", ""]
    lines += _forgetting(df, agg, out)
    if found is None:
        return lines + [note, ""]
    save(found, out / "tables")
    lines += [f"Update analyses {note}; cached in `tables/update_ranks.csv`, `tables/update_spectra.parquet`, `tables/phi.parquet` "
              f"(top {SPECTRUM_TOP} singular values per matrix), so a clone without artifacts rebuilds this section.", ""]
    ranks, spectra, phi = found["update_ranks"], found["update_spectra"], found["phi"]
    if len(agg):  # each rank (and full FT) at the configuration chosen on the tuning split, as φ pairs them
        chosen = pd.concat([tables.tuned(agg[agg["method"] != "full"], ["context_id", "targets", "r"]),
                            tables.tuned(agg[agg["method"] == "full"], ["context_id"])])
        ranks = ranks[ranks["config_id"].isin(chosen["config_id"])]
    if ranks.empty:
        return lines + ["No update could be measured.", ""]
    curve = energy_curve(ranks, spectra)
    for (task, model), by_model in ranks.groupby(["task", "model"]):
        contexts = sorted(by_model["context_id"].unique())
        for k, context in enumerate(contexts):  # one section per context: runs of another budget or batching are not pooled
            part = by_model[by_model["context_id"] == context]
            title = f"{task} · {model}" + (f" · context {k + 1} of {len(contexts)}" if len(contexts) > 1 else "")
            context_phi = phi[phi["context_id"] == context] if "context_id" in phi else phi  # tables cached before it was kept
            lines += _updates(part, spectra, curve, context_phi, agg[agg["context_id"] == context], df, recommendation, title, out)
    return lines


def _phi_spread(row: pd.Series) -> str:
    """' (0.22–0.31 over 3 run pairs, 6 layers each)': the spread of φ over the run pairs it averages."""
    return f" ({row['phi_low']:.2f}–{row['phi_high']:.2f} over {int(row['pairs'])} run pairs, {int(row['layers'])} layers each)"


def _updates(ranks, spectra, curve, phi, agg, df, recommendation, title, out) -> list[str]:
    slug = title.replace(" · ", "_").replace("/", "-").replace(" ", "_")
    plots_dir = out / "plots"
    summary = _rank_summary(ranks)
    lines = [f"### {title}", "", summary.to_markdown(index=False, disable_numparse=True), ""]
    full, lora = ranks[ranks["method"] == "full"], ranks[(ranks["method"] == "lora") & ~ranks["rank_pattern"]]
    figures = [plots.update_spectra(curve[curve["run_id"].isin(ranks["run_id"])], ranks, title, plots_dir, f"{slug}_update_spectra"),
               plots.effective_rank_heatmaps(ranks, title, plots_dir, f"{slug}_effective_rank")]
    lines += ["Effective rank = the fewest singular values holding 90 % (99 %) of ‖ΔW‖²_F; amplification = ‖ΔW‖_F / ‖UᵀW₀V‖_F "
              "with U, V ΔW's top-r singular vectors (LoRA paper §7.3); ± is the 95 % interval over seeds of the layer means."]
    if len(full) and len(lora):
        targeted = sorted(lora["matrix"].unique())
        high = lora["r"].max()
        full_rank = full[full["matrix"].isin(targeted)].groupby("seed")["rank90"].mean()
        lora_rank = lora[lora["r"] == high].groupby("seed")["rank90"].mean()
        lines += [f"**Reading**: on the matrices LoRA adapts ({', '.join(targeted)}), full FT's update needs {_ci(full_rank)} directions "
                  f"for 90 % of its energy, LoRA r={int(high)}'s only {_ci(lora_rank)}: full FT learns a high-rank update, while "
                  "LoRA, even when allowed many directions, concentrates its update in a few."]
    lines += [""] + [f"![{f.stem}]({f.relative_to(out).as_posix()})" for f in figures] + [""]
    part_phi = phi[phi["comparison"].notna()] if len(phi) else phi
    if len(part_phi):
        figure = plots.phi_heatmaps(part_phi, title, plots_dir, f"{slug}_phi")
        top = part_phi[(part_phi["i"] == 1) & (part_phi["j"] == 1)]
        reading = "; ".join(f"{row['comparison']}, {row['matrix']}: φ(1,1) = {row['phi']:.2f}{_phi_spread(row)} "
                            f"(unrelated random directions: {1 / row['d']:.3f})" for _, row in top.iterrows())
        lines += ["φ(i, j) = ‖V₁,ᵢᵀ V₂,ⱼ‖²_F / min(i, j) of the top right singular vectors of the adapters' A matrices (LoRA paper §7.2): 1 where one "
                  "subspace holds the other, max(i, j)/d for unrelated ones. " + reading + ". A top direction shared far above "
                  "chance means a low rank already finds what a higher rank (or another seed) finds.", "",
                  f"![{figure.stem}]({figure.relative_to(out).as_posix()})", ""]
    if len(full) and len(lora):
        lines += _advisor(ranks, spectra, lora, agg, df, _budget_rank(recommendation, lora), out, slug)
        lines += _spectrum_vs_rank(ranks, curve, lora, agg)
    return lines


def _budget_rank(recommendation: pd.DataFrame, lora: pd.DataFrame) -> int:
    """The uniform rank the advisor matches: the grid's recommended rank for these targets, else FALLBACK_RANK (the same
    choice as conf/sweep/autorank.yaml's, settings.recommended_rank)."""
    first = lora.iloc[0]
    if len(recommendation) and "r" in recommendation:
        rows = recommendation[(recommendation["task"] == first["task"]) & (recommendation["model"] == first["model"])
                              & (recommendation["targets"] == first["targets"]) & recommendation["r"].notna()]
        if len(rows):
            return int(rows["r"].iloc[0])
    return FALLBACK_RANK


def _advisor(ranks, spectra, lora, agg, df, budget_r, out, slug) -> list[str]:
    targets = lora["targets"].iloc[0]
    modules = sorted(lora.loc[lora["targets"] == targets, "module"].unique())
    pattern = advise(ranks, spectra, modules, budget_r)
    shapes = ranks.drop_duplicates("module").set_index("module")[["d_in", "d_out"]]
    uniform = adapter_parameters(dict.fromkeys(modules, budget_r), shapes)
    path = write_pattern(pattern, out / "tables" / f"rank_pattern_{slug}_{targets}_r{budget_r}.yaml",
                         f"Advised by lora-analyze from full FT's ΔW spectra ({ranks.loc[ranks['method'] == 'full', 'seed'].nunique()} seeds):\n"
                         f"{adapter_parameters(pattern, shapes)} adapter parameters = uniform r={budget_r} on {targets}")
    by_matrix = pd.Series({m: r for m, r in pattern.items()}).groupby(lambda m: layer_and_matrix(m)[1]).apply(list)
    lines = [f"**Rank advisor** (`{path.relative_to(out).as_posix()}`, use with `method.rank_pattern=<that file>`): per-layer ranks "
             f"from full FT's ΔW spectra at the budget of uniform r={budget_r} on {targets} "
             f"({adapter_parameters(pattern, shapes):,} = {uniform:,} adapter parameters). By layer: "
             + "; ".join(f"{m} {ranks_}" for m, ranks_ in by_matrix.items()) + ". Full FT's spectra are the probe because the "
             "baseline already ran (no extra training), they show where the full update puts its energy without a rank cap, "
             "and, unlike one high-rank LoRA run, they are not shaped by the LoRA parametrisation being tuned.", ""]
    # each at the learning rate chosen on the tuning split, as in the rank table
    advised = tables.tuned(agg[(agg["method"] == "lora") & agg["rank_pattern"].notna()], ["context_id", "targets"])
    plain = tables.tuned(agg[(agg["method"] == "lora") & (agg["targets"] == targets) & (agg["r"] == budget_r)], ["context_id"])
    for _, row in advised.iterrows():
        base = plain[plain["context_id"] == row["context_id"]]
        if base.empty:
            continue
        result = tables.compare(df, row, base.iloc[0])
        if result is None:
            continue
        verdict = "better" if result.low > 0 else "worse" if result.high < 0 else "not distinguishable at these seeds"
        lines += [f"Advised ({row['targets']}, {int(row['params_adapter_mean']):,} adapter parameters) against uniform r={budget_r} "
                  f"({int(base.iloc[0]['params_adapter_mean']):,}): Δ = {result.delta:+.2f} [{result.low:+.2f}, {result.high:+.2f}] "
                  f"{row['primary_unit']} (paired over {result.n_seeds} seeds and the eval examples, lora_sweep/analysis/stats.py): {verdict}.", ""]
    if advised.empty:
        lines += [f"No advised run yet: `lora-sweep +sweep=advisor` trains it against uniform r={budget_r} at the same budget over 3 seeds.", ""]
    return lines


def _spectrum_vs_rank(ranks, curve, lora, agg) -> list[str]:
    targets = lora["targets"].iloc[0]
    modules = sorted(lora.loc[lora["targets"] == targets, "module"].unique())
    points = tables.tuned(agg[(agg["method"] == "lora") & (agg["targets"] == targets)], ["context_id", "r"])
    found = spectrum_vs_rank(ranks, curve, modules, points)
    if found is None:
        return []
    metric = points["primary_metric"].iloc[0]
    scale, better = metric_info(metric).scale, "higher" if metric_info(metric).higher_is_better else "lower"
    pairs = ", ".join(f"r={r}: {100 * e:.0f} % / {scale * v:.{2 if scale == 1 else 1}f}" for r, e, v in found["points"])
    return [f"**Does the spectrum predict the rank curve?** Share of full FT's ΔW energy (on {targets}) at rank r against the "
            f"measured {metric} at r ({pairs}; {better} is better): Spearman ρ = {found['rho']:+.2f} (p = {found['p']:.2f}, "
            f"n = {found['n']} ranks). Caveat: a handful of points, and the captured energy grows with r by construction, so ρ "
            "here only asks whether the metric moves with r as the energy does; the seed noise of each point (see the rank "
            "table) is not in ρ.", ""]


def _with_interval(mean: float, half: float) -> str:
    """'+0.12 ± 0.30', or '+0.12 (one seed: no interval)' where the interval is undefined."""
    return f"{mean:+.2f} ± {half:.2f}" if np.isfinite(half) else f"{mean:+.2f} (one seed: no interval)"


def _forgetting(df: pd.DataFrame, agg: pd.DataFrame, out: Path) -> list[str]:
    measured = df[df["forgetting"].notna()]
    if measured.empty:
        return ["Forgetting: no record here holds the forgetting probe (records written before it existed); re-run the sweep "
                "with `rerun=true` to measure it.", ""]
    lines = ["Forgetting (`lora_sweep.forgetting`): for an encoder, zero-shot STS-B Spearman (points) of mean-pooled embeddings "
             "before minus after training; for a decoder, per-token cross-entropy on held-out general text after minus before. "
             "Positive = the run lost some of what the base model could do.", ""]
    for (task, model), runs in measured.groupby(["task", "model"]):
        title = f"{task} · {model}"
        part = agg[(agg["task"] == task) & (agg["model"] == model) & agg["forgetting_mean"].notna()]
        points = plots.best_lr(part[part["method"] != "full"])
        full_rows = tables.tuned(part[part["method"] == "full"], ["context_id"])
        full = full_rows.iloc[0] if len(full_rows) else None
        metric = runs["primary_metric"].dropna().iloc[0]
        figure = plots.learning_vs_forgetting(points, full, title, metric, out / "plots", f"{title.replace(' · ', '_').replace('/', '-')}_forgetting")
        described = [f"r={int(r['r'])} {_with_interval(r['forgetting_mean'], r['forgetting_ci95'])}" for _, r in points.sort_values("r").iterrows()]
        if full is not None:
            described.insert(0, f"full FT {_with_interval(full['forgetting_mean'], full['forgetting_ci95'])}")
        single = (part["forgetting_n"] < 2).any()
        reading = (" With one seed there is no interval: these values cannot say which method forgot more." if single else
                   " Where the intervals of two methods do not overlap, one forgot more than the other.")
        lines += [f"{title}: forgetting (mean ± 95 % interval over seeds; base value {runs['forgetting_before'].iloc[0]:.2f}): "
                  + "; ".join(described) + "." + reading, "",
                  f"![{figure.stem}]({figure.relative_to(out).as_posix()})", ""]
    return lines
