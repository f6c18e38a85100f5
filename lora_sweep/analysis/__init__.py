"""What a folder of run records says: tables, a rank recommendation with its paired statistics, plots and a report.

This package reads records (and tables the run side measured, such as ΔW spectra) and imports only the base modules
(records, metrics, identity, errors): dependencies run one way. The end of a sweep, `lora-analyze` and `lora-deploy`
sit above it and ask `analyse` once for the decisions they need; `report` renders the same Analysis."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from lora_sweep.analysis.tables import aggregate, compare_ranks, recommend, run_flags


@dataclass(frozen=True)
class Analysis:
    """The decisions a folder of records supports, computed once."""

    runs: pd.DataFrame  # a row per readable record (lora_sweep.analysis.load)
    skipped: list[str]  # the record files not read, and why
    agg: pd.DataFrame  # a row per configuration: means and intervals over seeds
    ranks: pd.DataFrame  # a row per LoRA configuration chosen on the tuning split, paired against full FT
    recommendation: pd.DataFrame  # a row per context and targets: the smallest non-inferior rank, or why none
    flags: pd.DataFrame  # runs that finished but may not be what they seem

    def rank_to_use(self, recommended: pd.Series) -> tuple[pd.Series, str]:
        """(the configuration, why) to measure or estimate for one row of the recommendation: the recommended rank,
        else the rank closest to full FT (the largest Δ), else the lowest rank."""
        part = self.ranks[(self.ranks["context_id"] == recommended["context_id"]) & (self.ranks["targets"] == recommended["targets"])]
        if pd.notna(recommended.get("r")):
            return part[part["r"] == recommended["r"]].iloc[0], "the recommended rank"
        if "delta" in part and part["delta"].notna().any():
            return part.loc[part["delta"].idxmax()], "no rank is recommended: the rank closest to full FT"
        return part.sort_values("r").iloc[0], "no rank is recommended and none is paired with full FT: the lowest rank"


def analyse(runs: pd.DataFrame, skipped: list[str], tolerance: float | None = None) -> Analysis:
    """Aggregate over seeds, compare every rank with full FT (paired), and recommend (lora_sweep.analysis.tables)."""
    agg = aggregate(runs)
    ranks = compare_ranks(runs, agg, tolerance) if len(agg) and (agg["method"] != "full").any() else pd.DataFrame()
    recommendation = recommend(ranks) if len(ranks) else pd.DataFrame()
    return Analysis(runs, skipped, agg, ranks, recommendation, run_flags(runs))
