"""`lora-analyze [RESULTS_DIR]`: tables, plots and report.md from the run records of a results folder.

The run side of the analysis: it reads the records once, asks lora_sweep.analysis for its decisions, measures what
the report needs beyond the records (ΔW from saved artifacts: lora_sweep.updates; the estimate on the user's model:
lora_sweep.estimate), and hands both to the renderer. The end of a sweep calls `publish` with the Analysis it made."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_sweep import records, updates
from lora_sweep.analysis import Analysis, analyse, report
from lora_sweep.analysis.load import load_records
from lora_sweep.errors import UserError, file_errors


def write(results_dir: str | Path, tolerance: float | None = None, target_model: str | None = None) -> Path:
    """Analyse the records of `results_dir` (a results folder or its runs folder) and write the report beside them."""
    runs_dir = records.runs_folder(results_dir)
    return publish(analyse(*load_records(runs_dir), tolerance), runs_dir, target_model)


def publish(analysis: Analysis, runs_dir: Path, target_model: str | None = None) -> Path:
    """Measure what the report needs beyond the records, then render it; returns the report's path.
    `target_model` (a model preset) adds the "At your scale" section: the memory and time estimate on that model."""
    found, note = updates.load_or_measure(analysis.runs, analysis.agg, runs_dir)
    scale = at_scale(analysis, target_model) if target_model and len(analysis.ranks) else None
    return report.write(analysis, runs_dir, report.Measured(found, note, scale))


def at_scale(analysis: Analysis, target: str) -> list[report.AtScale]:
    """For each uniform-rank recommendation (a per-layer pattern is this model's own): the estimate on `target` of
    the rank to use, of full FT and of every swept rank, at the context's task and budget."""
    from lora_sweep import estimate
    from lora_sweep.settings import TARGET_PRESETS, compose

    out = []
    recommendation = analysis.recommendation
    for _, recommended in recommendation[recommendation["rank_pattern"].isna()].iterrows():
        config, why = analysis.rank_to_use(recommended)
        run = analysis.runs[analysis.runs["context_id"] == recommended["context_id"]].iloc[0]
        targets, rank = recommended["targets"], int(config["r"])
        part = analysis.ranks[(analysis.ranks["context_id"] == recommended["context_id"]) & (analysis.ranks["targets"] == targets)]
        ranks = sorted({rank, *part["r"].astype(int)})
        refused = None
        if targets not in TARGET_PRESETS:
            refused = f"Targets {targets!r} are module names of this sweep's model, not a preset: they cannot be carried over to {target}."
        else:
            budget = (f"task={run['task_family']}/{run['task']}", f"train.batch_size={int(run['batch_size'])}",
                      f"train.max_seq_len={int(run['max_seq_len'])}", f"method.targets={targets}")
            try:
                settings = [compose(f"model={target}", *budget, f"method.r={r}") for r in ranks]
                per_rank = [estimate.estimate(s, s.method) for s in settings]
                full = estimate.estimate(settings[0], settings[0].baseline)
            except UserError as exc:
                refused = f"No estimate for {target}: {exc}"
        if refused:
            out.append(report.AtScale(target, recommended, run, rank, why, ranks, [], None, None, refused))
        else:
            out.append(report.AtScale(target, recommended, run, rank, why, ranks, per_rank, full, settings[0].estimate))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lora-analyze", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results",
                        help="a results folder holding runs/, or the runs folder itself (default: results)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="how far from full FT a recommended rank may fall, in the metric's display units "
                             "(default: 1 point for GLUE metrics, 0.02 nats for a loss)")
    parser.add_argument("--target-model", default=None,
                        help="a model preset (e.g. llama3_1_8b): add the estimated memory and step time on that model for "
                             "the recommended rank (the 'At your scale' section)")
    args = parser.parse_args(argv)
    try:
        if args.tolerance is not None and not args.tolerance > 0:  # NaN too
            raise UserError(f"--tolerance={args.tolerance:g} must be > 0 "
                            f"(in the metric's display units: points for GLUE metrics, nats for a loss)")
        with file_errors():
            path = write(args.results_dir, args.tolerance, args.target_model)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"[lora-analyze] wrote {path}")


if __name__ == "__main__":
    main()
