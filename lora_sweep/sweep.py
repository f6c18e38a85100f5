"""Sweep-level work Hydra's sweepers leave to us, as a Hydra callback (registered in conf/config.yaml).

- before any job: expand the grid exactly as Hydra's BasicSweeper will, compose and check every job
  (types, values, targets, rank, data source), and refuse an empty grid: one error line, exit 2;
- run the full-FT baselines the grid needs first, when jobs run on this machine (basic or joblib
  launcher), so parallel jobs never sit waiting on one; on a cluster the per-run lock does this;
- after each job: progress across the sweep (run k of n, elapsed, ETA), from a shared progress file;
- at the end: a compact table of the sweep's runs against full FT, then the analysis if asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lora_sweep import settings as settings_module
from lora_sweep.errors import UserError, one_line

LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher")
PLAN_FILE = "sweep_plan.json"
PROGRESS_FILE = "sweep_progress.jsonl"


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The override list of every job, in launch order, as BasicSweeper expands them."""
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def compose_job(config_name: str, overrides: list[str]) -> settings_module.Settings:
    try:
        cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(one_line(exc)) from None
    return settings_module.from_config(cfg)


def sweep_token(sweep_dir: str) -> str:
    """A short name for one sweep (its output folder), stored in its records: a baseline that failed in this
    sweep is not retried by each of its LoRA jobs."""
    return hashlib.sha256(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:12]


def _fail(exc: UserError) -> None:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


class SweepCallback(Callback):
    def __init__(self, analyze: bool = False) -> None:
        self.analyze = analyze

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lora_sweep import experiment

        try:
            jobs = job_overrides(config)
            if not jobs:
                raise UserError("the sweep grid is empty: every swept key needs at least one value")
            plans = [experiment.plan(compose_job(config.hydra.job.config_name, job)) for job in jobs]
        except UserError as exc:
            _fail(exc)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        baselines = {}
        for plan in plans:
            if plan.settings.method.name == "lora" and plan.settings.pair_baseline:
                baseline = experiment.baseline_settings(plan.settings)
                baselines.setdefault(experiment.plan(baseline).run_id, baseline)
        print(f"[sweep] {len(plans)} runs ({len({p.run_id for p in plans})} distinct) and {len(baselines)} full-FT baseline(s)")
        _say_what_is_reused(plans, list(baselines))
        if config.hydra.launcher._target_.rsplit(".", 1)[-1] in LOCAL_LAUNCHERS:
            for baseline in baselines.values():
                experiment.run(baseline, sweep=sweep_token(config.hydra.sweep.dir))
        (sweep_dir / PLAN_FILE).write_text(json.dumps({  # written once the jobs are about to start: their ETA clock
            "jobs": len(plans), "started": time.time(), "results_dir": plans[0].settings.results_dir,
            "run_ids": [p.run_id for p in plans], "baseline_ids": list(baselines)}, indent=1))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        sweep_dir = Path(HydraConfig.get().sweep.dir)
        if HydraConfig.get().mode != RunMode.MULTIRUN or not (sweep_dir / PLAN_FILE).is_file():
            return
        plan = json.loads((sweep_dir / PLAN_FILE).read_text())
        line = json.dumps({"job": HydraConfig.get().job.num, "status": str(job_return.status), "at": time.time()}) + "\n"
        fd = os.open(sweep_dir / PROGRESS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, line.encode())  # one small O_APPEND write: lines from parallel jobs never interleave
        finally:
            os.close(fd)
        done = len((sweep_dir / PROGRESS_FILE).read_text().splitlines())
        elapsed = time.time() - plan["started"]
        eta = elapsed / done * (plan["jobs"] - done)
        print(f"[sweep] run {done} of {plan['jobs']} finished · elapsed {_clock(elapsed)} · ETA {_clock(eta)}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from analysis import tables

        plan_file = Path(config.hydra.sweep.dir) / PLAN_FILE
        if not plan_file.is_file():
            return
        plan = json.loads(plan_file.read_text())
        ids = list(dict.fromkeys(plan["baseline_ids"] + plan["run_ids"]))
        try:
            print(tables.sweep_summary(plan["results_dir"], ids))
            if self.analyze:
                from analysis import report

                print(f"[sweep] analysis written to {report.write(plan['results_dir'])}")
        except UserError as exc:
            _fail(exc)


def _say_what_is_reused(plans: list, baseline_ids: list[str]) -> None:
    """A sweep whose records exist finishes in seconds: say so, and how to train again, so that is not read as "nothing happened"."""
    from lora_sweep import records

    results_dir = plans[0].settings.results_dir
    ids = set(baseline_ids) | {p.run_id for p in plans}
    done = [rid for rid in ids if (records.read_record(results_dir, rid) or {}).get("status") == "done"]
    if done and not plans[0].settings.rerun:
        print(f"[sweep] {len(done)} of these {len(ids)} runs already have a done record in {results_dir}: they are reused, not "
              f"trained again (to train everything again: add rerun=true, or use another results_dir)")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
