"""What an adaptive rank sweep decides after each round, defined once: the sweeper
(hydra_plugins/lora_sweep_adaptive) acts on it, the report explains it, benchmarks/adaptive.py measures it.

For one context (model, task, budget) and targets preset, the answer is the smallest rank that qualifies
(non-inferior to full FT within the margin ε), or "none" when every rank is worse. Ranks are judged with the
sequential test of lora_sweep/analysis/stats.py (`sequential_status`), so a verdict reached at any look keeps its error bound.

- A qualifying rank r* makes every open rank above it irrelevant: it cannot change the answer. Open ranks below r*
  can (one of them may qualify too); with no qualifying rank yet, every open rank can.
- The answer is decided when every rank below the smallest qualifying one is worse (or every rank is worse).
- Only open ranks that can change the answer, and that more seeds could still settle by max_seeds
  (`resolvable`), get the next seed; stopping the others makes no claim, so it costs no error.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from lora_sweep.analysis import stats

QUALIFIES, WORSE, OPEN = "qualifies", "worse", "open"
LOG_NAME = "adaptive_sweep.json"  # beside the records folder (as report.md), and in the sweep's own folder


@dataclass(frozen=True)
class Answer:
    """What a sweep can say so far for one context and targets preset."""

    rank: int | None  # the smallest qualifying rank, None if none qualifies yet
    decided: bool  # no open rank can change it
    to_continue: tuple[int, ...]  # open ranks that can change it and that more seeds could settle


def answer(verdicts: Mapping[int, str], resolvable: Mapping[int, bool] | None = None) -> Answer:
    """The answer from each rank's verdict (QUALIFIES, WORSE or OPEN); `resolvable` (default: all) says which open
    ranks more seeds could still settle."""
    ranks = sorted(verdicts)
    qualifying = [r for r in ranks if verdicts[r] == QUALIFIES]
    best = qualifying[0] if qualifying else None
    can_change = [r for r in ranks if verdicts[r] == OPEN and (best is None or r < best)]
    resolvable = resolvable or {}
    return Answer(best, not can_change, tuple(r for r in can_change if resolvable.get(r, True)))


def decide(df: pd.DataFrame, margin: float | None, initial_seeds: int, max_seeds: int) -> list[dict[str, Any]]:
    """The verdict of every rank and the answer of every context and targets preset of the runs in `df` (as
    analysis.load reads them); each rank is the configuration chosen on the tuning split (analysis.tables)."""
    from lora_sweep.analysis import tables

    agg = tables.aggregate(df)
    if agg.empty or not (agg["method"] != "full").any():
        return []
    ranks = tables.compare_ranks(df, agg, margin)
    groups = []
    for (context, targets), group in ranks.groupby(["context_id", "targets"], sort=True):
        rows = []
        for _, row in group.sort_values("r").iterrows():
            eps = float(row["margin"])
            if pd.isna(row.get("delta")):  # no paired full-FT result: nothing to judge, and more seeds of it cannot help
                rows.append({"r": int(row["r"]), "status": OPEN, "seeds": 0, "look": None, "resolvable": False})
                continue
            seeds = int(row["paired_seeds"])
            code, low, high, resolvable = stats.sequential_status(
                row["delta"], row["delta_var_seed"], row["delta_var_examples"], seeds, eps, initial_seeds, max_seeds)
            rows.append({"r": int(row["r"]), "status": {1: QUALIFIES, -1: WORSE, 0: OPEN}[int(code)], "seeds": seeds,
                         "look": seeds - initial_seeds + 1 if seeds >= initial_seeds else None,
                         "delta": float(row["delta"]), "low": float(low), "high": float(high),
                         "resolvable": bool(resolvable), "one_look": row["verdict"], "seeds_needed": _count(row.get("seeds_needed")),
                         "examples_needed": _count(row.get("examples_needed"))})
        verdicts = {x["r"]: x["status"] for x in rows}
        result = answer(verdicts, {x["r"]: x["resolvable"] for x in rows})
        first = group.iloc[0]
        groups.append({"context_id": context, "targets": targets, "label": f"{first['task']} · {first['model']} · {targets}",
                       "margin": float(first["margin"]), "unit": first["primary_unit"], "ranks": rows,
                       "answer": {"rank": result.rank, "decided": result.decided, "to_continue": list(result.to_continue)},
                       "text": answer_text(rows, result, float(first["margin"]), first["primary_unit"], max_seeds)})
    return groups


def _count(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def _interval(row: Mapping[str, Any]) -> str:
    return f"Δ = {row['delta']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}] at look {row['look']} ({row['seeds']} seeds)"


def settle_text(row: Mapping[str, Any], max_seeds: int) -> str:
    """What would settle an open rank: more seeds in this sweep, or else a fresh fixed-size experiment at its current
    estimates (analysis.stats.non_inferiority's one-look advice)."""
    if row["resolvable"]:
        return f"more seeds, up to {max_seeds}"
    if row.get("one_look") in (QUALIFIES, WORSE):
        return f"a fresh experiment of this size, whose one-look 95 % interval would say {row['one_look']}"
    options = ([f"about {row['seeds_needed']} seeds"] if row.get("seeds_needed") else []) + (
        [f"{row['examples_needed']:,} eval examples"] if row.get("examples_needed") else [])
    return " or ".join(options) if options else "neither more seeds nor more eval examples alone"


def answer_text(rows: list[Mapping[str, Any]], result: Answer, margin: float, unit: str, max_seeds: int) -> str:
    """The answer in one sentence, with the open ranks that keep it from being decided."""
    by_rank = {x["r"]: x for x in rows}
    open_ = [x for x in rows if x["status"] == OPEN and (result.rank is None or x["r"] < result.rank)]
    if result.rank is not None:
        text = f"r={result.rank} is the smallest rank within {margin:g} {unit} of full FT: {_interval(by_rank[result.rank])}"
    elif result.decided:
        best = max(rows, key=lambda x: x["delta"])
        return (f"none up to r={rows[-1]['r']}: every rank is worse than full FT by more than {margin:g} {unit} "
                f"(closest: r={best['r']}, {_interval(best)})")
    else:
        text = f"undecided: no rank is shown within {margin:g} {unit} of full FT"
    if result.decided:
        return text + ("; every smaller rank is worse" if result.rank != rows[0]["r"] else "")
    return text + "; still open: " + "; ".join(
        f"r={x['r']} ({_interval(x) if x.get('look') else 'no paired result'}; would take {settle_text(x, max_seeds)})" for x in open_)


def log_path(runs_dir: str | Path) -> Path:
    """Where a sweep's decisions are kept for the report: beside the records folder, as report.md."""
    return Path(runs_dir).parent / LOG_NAME


def write_log(path: Path, log: dict[str, Any]) -> None:
    """Replace `path` atomically: a reader sees the previous round's log or this one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(log, handle, indent=1)
    os.replace(tmp, path)


def read_log(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def section(records_dir: str | Path) -> list[str]:
    """The report's "How the sweep decided" section, from the log the adaptive sweep left beside `records_dir`."""
    log = read_log(log_path(records_dir))
    if not log:
        return []
    s = log["settings"]
    lines = ["## How the sweep decided", "",
             f"An adaptive sweep ({s['initial_seeds']} seeds for every rank first, then one seed per round, at most "
             f"{s['max_seeds']}): after each round every rank's paired difference from full FT was tested at that "
             f"look's share of the error (O'Brien–Fleming-type spending, {100 * s['alpha']:g} % one-sided for each of "
             "'qualifies' and 'worse' over all looks; lora_sweep/analysis/stats.py), and only open ranks that could still change "
             f"the answer, and be settled by {s['max_seeds']} seeds, got the next seed. It stopped: {log['stopped']}.", "",
             "| round | seeds | ran | why | verdicts after the round |", "|---|---|---|---|---|"]
    for entry in log["rounds"]:
        reached = "; ".join(f"{label}: {text}" if len(entry["after"]) > 1 else text for label, text in entry["after"].items())
        lines.append(f"| {entry['round']} | {', '.join(map(str, entry['seeds']))} | {entry['ran']} | {entry['why']} | {reached} |")
    lines.append("")
    for group in log["groups"]:
        lines += [f"**{group['label']}**: {group['text']}", "",
                  "| rank | verdict | look (seeds) | Δ vs full FT [interval at that look] | could more seeds settle it |",
                  "|---|---|---|---|---|"]
        for x in group["ranks"]:
            interval = f"{x['delta']:+.2f} [{x['low']:+.2f}, {x['high']:+.2f}]" if x.get("look") else "-"
            more = "-" if x["status"] != OPEN else ("yes" if x["resolvable"] else f"not by {s['max_seeds']} seeds")
            lines.append(f"| r={x['r']} | {x['status']} | {x['look'] or '-'} ({x['seeds']}) | {interval} | {more} |")
        lines.append("")
    lines += ["Each look's interval is its own (1 − 2 × that look's share of the error) interval, wider than the 95 % "
              "intervals of this report's other tables: those are one-look intervals, valid for a sweep that looks "
              "once, at its end.", ""]
    return lines


def round_summary(groups: list[dict[str, Any]]) -> dict[str, str]:
    """Each group's verdicts after a round, in a few words: `r=1 worse (look 2); r=2 open; ...`."""
    return {g["label"]: "; ".join(f"r={x['r']} {x['status']}" + (f" (look {x['look']})" if x["status"] != OPEN else "")
                                  + ("" if x["status"] != OPEN or x["resolvable"] else ", cannot be settled")
                                  for x in g["ranks"]) for g in groups}
