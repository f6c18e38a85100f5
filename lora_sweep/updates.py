"""ΔW of saved runs, measured from their artifacts: the tables the report's section on updates reads.

Run side: it loads saved adapters and models (PEFT's get_delta_weight for LoRA, W_fine-tuned − W₀ for full FT) and
measures each matrix's spectrum, effective rank and amplification, and φ between runs (lora_sweep.diagnostics does
the algebra). Artifacts are not committed, so what is measured is merged with the cached tables of an earlier analysis
(`tables/update_*.csv`, `tables/phi.parquet`): a clean clone still gets the section. The analysis reads the tables.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import PeftModel

from lora_sweep import adapters, diagnostics, records
from lora_sweep.analysis import tables
from lora_sweep.analysis.diagnostics import LOW_RANK, PHI_SEEDS_MAX, SPECTRUM_TOP, TABLES, layer_and_matrix
from lora_sweep.hub import resolve_model
from lora_sweep.records import RunRecord
from lora_sweep.task_family import family_for


def updates(record: RunRecord, records_dir: Path) -> tuple[dict[str, torch.Tensor], ...] | None:
    """(ΔW, W₀, LoRA's A) by module name for one run (no A for full FT), or None when its artifact is not on disk."""
    artifact = records.artifact_dir(record, records_dir)
    if artifact is None:
        return None
    settings = records.run_settings(record, records_dir)
    family, path = family_for(settings), resolve_model(settings.model.name_or_path, settings.cache_dir)
    base = family.load_model(path, settings)
    if record["method"] == "full":
        names = [n for n, m in adapters.adaptable_modules(base, adapters.architecture_of(base)).items() if isinstance(m, torch.nn.Linear)]
        tuned = family.load_model(str(artifact), settings)
        weights = {n: base.get_submodule(n).weight.detach().double() for n in names}
        return {n: tuned.get_submodule(n).weight.detach().double() - weights[n] for n in names}, weights, {}
    weights = {n: base.get_submodule(n).weight.detach().double().clone() for n in record["adapted_modules"]}
    model = PeftModel.from_pretrained(base, artifact)
    return diagnostics.lora_deltas(model), weights, diagnostics.lora_a(model)


def _describe(record: RunRecord) -> dict:
    targets = record["targets"]
    return {**{key: record[key] for key in ("run_id", "config_id", "context_id", "task", "model", "method", "r")},
            "targets": targets if isinstance(targets, str) or targets is None else ",".join(targets),
            "rank_pattern": bool(record["rank_pattern"] or record["allocated_ranks"]), "seed": record["seed"]}  # ranks not uniform


def measure(run_records: list[RunRecord], records_dir: Path, paired: set[str]) -> dict[str, pd.DataFrame]:
    """The three cached tables, measured from the runs' artifacts (every run given has one on disk); φ pairs runs of
    the configurations in `paired` only."""
    ranks, spectra, directions = [], [], {}
    for record in run_records:
        deltas, weights, a_matrices = updates(record, records_dir)
        about = _describe(record)
        for name, delta in deltas.items():
            factors = diagnostics.svd(delta)
            sigma = factors.S.numpy()
            layer, matrix = layer_and_matrix(name)
            lora = record["method"] == "lora"
            r = (record["allocated_ranks"] or record["rank_pattern"] or {}).get(name, record["r"]) if lora else None
            ranks.append({**about, "module": name, "layer": layer, "matrix": matrix, "d_out": delta.shape[0], "d_in": delta.shape[1],
                          "energy": float(np.square(sigma).sum()), "rank90": diagnostics.effective_rank(sigma, 0.9),
                          "rank99": diagnostics.effective_rank(sigma, 0.99),
                          "amplification": diagnostics.amplification(factors, weights[name], r) if lora else np.nan})
            kept = sigma[:min(SPECTRUM_TOP, r or SPECTRUM_TOP)]
            spectra += [{"run_id": record["run_id"], "module": name, "k": k + 1, "sigma": float(f"{s:.5g}")} for k, s in enumerate(kept)]
            if lora:
                directions[(record["run_id"], name)] = diagnostics.right_directions(a_matrices[name], min(r, SPECTRUM_TOP))
    tables = {"update_ranks": pd.DataFrame(ranks), "update_spectra": pd.DataFrame(spectra),
              "phi": _phi(pd.DataFrame(ranks), directions, paired)}
    return tables


def _phi(ranks: pd.DataFrame, directions: dict, paired: set[str]) -> pd.DataFrame:
    """φ(i, j) averaged over layers, then over run pairs (a low rank against the highest at the same seed, and seeds of
    the highest), with the lowest and highest pair's value beside it: the spread a handful of seeds gives. Only runs of
    `paired` configurations are paired, so that each rank is the configuration chosen on the tuning split (runs at
    another learning rate are not mixed in)."""
    if ranks.empty or not directions:
        return pd.DataFrame(columns=["context_id", "comparison", "matrix", "i", "j", "phi", "phi_low", "phi_high", "pairs", "layers", "d"])
    lora = ranks[(ranks["method"] == "lora") & ~ranks["rank_pattern"] & ranks["config_id"].isin(paired)]
    rows = []
    for (context, _), group in lora.groupby(["context_id", "targets"]):
        present = sorted(group["r"].unique())
        high = present[-1]
        low = next((r for r in present if r >= LOW_RANK and r < high), present[0])
        runs = group.drop_duplicates("run_id").set_index("run_id")
        low, high = int(low), int(high)
        pairs = {f"r={low} vs r={high}, same seed": [(a, b) for a, b in itertools.product(runs.index[runs["r"] == low], runs.index[runs["r"] == high])
                                                     if runs.at[a, "seed"] == runs.at[b, "seed"]] if low != high else [],
                 f"r={high}: seed vs seed": list(itertools.combinations(sorted(runs.index[runs["r"] == high]), 2))}
        for label, run_pairs in pairs.items():
            for matrix, modules in group.groupby("matrix"):
                names = modules["module"].unique()
                per_pair = [np.mean([diagnostics.phi_grid(directions[(a, m)], directions[(b, m)]) for m in names], axis=0)
                            for a, b in run_pairs if all((a, m) in directions and (b, m) in directions for m in names)]
                if not per_pair:
                    continue
                stacked = np.stack(per_pair)
                if "seed vs seed" in label:
                    stacked = stacked[:, :PHI_SEEDS_MAX, :PHI_SEEDS_MAX]
                grid, low_grid, high_grid = stacked.mean(axis=0), stacked.min(axis=0), stacked.max(axis=0)
                rows += [{"context_id": context, "comparison": label, "matrix": matrix, "i": i + 1, "j": j + 1, "phi": float(f"{grid[i, j]:.4g}"),
                          "phi_low": float(f"{low_grid[i, j]:.4g}"), "phi_high": float(f"{high_grid[i, j]:.4g}"),
                          "pairs": len(per_pair), "layers": len(names), "d": int(directions[run_pairs[0][0], names[0]].shape[0])}
                         for i in range(grid.shape[0]) for j in range(grid.shape[1])]
    return pd.DataFrame(rows)


def load_or_measure(df: pd.DataFrame, agg: pd.DataFrame, records_dir: Path) -> tuple[dict[str, pd.DataFrame] | None, str]:
    """The tables measured from the artifacts on disk, with the rows of the other runs from the cached tables of an
    earlier analysis beside the records (all limited to these runs); None and why when there is neither. φ pairs runs
    (of the uniform-rank configurations chosen on the tuning split), so it is measured whole or read whole: from the
    artifacts when every run it pairs has one on disk, else from the cache where there is one. The note says where
    everything came from."""
    done = df[(df["status"] == "done") & df["method"].isin(["lora", "full"])]
    run_records = [records.read_fields(records.load(records_dir / f"{rid}.json")) for rid in done["run_id"]]
    have = [r for r in run_records if records.artifact_dir(r, records_dir)]
    cache = records_dir.parent / "tables"
    cached = ({name: pd.read_csv(cache / f"{name}.csv") if kind == "csv" else pd.read_parquet(cache / f"{name}.{kind}")
               for name, kind in TABLES.items()} if all((cache / f"{name}.{kind}").is_file() for name, kind in TABLES.items()) else None)
    if not have and cached is None:
        return None, "No saved adapters or models are on disk (artifacts are not committed) and no cached tables exist: no update analyses."
    paired = set(tables.tuned(agg[agg["method"] == "lora"], ["context_id", "targets", "r"])["config_id"]) if len(agg) else set()
    found = _measure_on_one_thread(have, records_dir, paired) if have else dict(cached)
    from_cache = set(done["run_id"]) - {r["run_id"] for r in have}
    phi_runs = done[(done["allocator"] == "uniform") & done["config_id"].isin(paired)]
    phi_cached = bool(have) and cached is not None and bool(from_cache & set(phi_runs["run_id"]))
    if phi_cached:
        found["phi"] = cached["phi"]
    reused = 0
    for name in ("update_ranks", "update_spectra"):
        if have and cached is not None:
            extra = cached[name][cached[name]["run_id"].isin(from_cache)]
            reused = extra["run_id"].nunique()
            found[name] = pd.concat([found[name], extra], ignore_index=True)
        found[name] = found[name][found[name]["run_id"].isin(set(done["run_id"]))]
    note = (f"measured from the saved artifacts of {len(have)} runs" if have else "read from the cached tables of an earlier analysis"
            + " (the saved artifacts are not on disk)")
    if reused:
        note += f"; {reused} runs' rows read from the cached tables of an earlier analysis (their artifacts are not on disk)"
    if phi_cached:
        note += "; φ read from the cached tables (some of the runs it pairs have no artifact on disk)"
    return found, note


def _measure_on_one_thread(run_records: list[RunRecord], records_dir: Path, paired: set[str]) -> dict[str, pd.DataFrame]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float64 SVDs on cores shared with other work: ~25x faster on one thread than on two (measured)
    try:
        return measure(run_records, records_dir, paired)
    finally:
        torch.set_num_threads(threads)


