"""Sweep-level work Hydra's sweepers leave to us, done by `lora-sweep` itself around Hydra's multirun (cli.main).

Not in Hydra callbacks: Hydra turns a callback's exception into a warning and launches the jobs anyway, and a
callback cannot set the exit status. So:

- start, before any job (a single run gets the same checks): expand the grid exactly as Hydra's BasicSweeper
  will, compose and check every job (types, values, unknown keys, targets, rank, sequence length, data source),
  read each distinct data set once into the token cache the runs load it from, check that the output folders
  can be written, and refuse an empty grid: any problem is one error line and exit 2, with no job started. Then
  run the full-FT baselines the grid needs, when jobs run on this machine (basic or joblib launcher), so parallel
  jobs never sit waiting on one; on a cluster the per-run lock does this.
- after each job (SweepCallback, in the job's process): progress across the sweep (run k of n, elapsed, ETA).
- finish, after the last job: a compact table of the sweep's runs against full FT, the analysis if asked, and
  the exit status: 1 if any run failed or left no record, else 0 (a diverged run is a result).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from hydra_plugins.lora_sweep_adaptive import sweeper as adaptive_sweeper
from lora_sweep import settings as settings_module
from lora_sweep.errors import UserError, one_line

if TYPE_CHECKING:
    from lora_sweep.experiment import Plan

LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher")
PLAN_FILE = "sweep_plan.json"
PROGRESS_FILE = "sweep_progress.jsonl"


@dataclass(frozen=True)
class Sweep:
    """A checked sweep: where its records go, the runs it must leave (baselines first), and whether to analyse them."""

    runs_dir: str
    run_ids: list[str]
    analyze: bool
    deploy: bool  # lora-deploy's default measurement before the analysis
    cache_dir: str
    target_model: str | None  # analysis.target_model: the report's "At your scale" section
    sweep_dir: str | None = None  # Hydra's folder of the sweep: an adaptive sweep logs its later rounds' runs there


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The override list of every job Hydra's sweeper launches first, in launch order: the whole grid as
    BasicSweeper expands it, or an adaptive sweep's first round (hydra_plugins/lora_sweep_adaptive)."""
    if adaptive_sweeper.configured(config):
        return adaptive_sweeper.grid(config, list(config.hydra.overrides.task)).first_round()
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
    """A short name for one sweep (its output folder), stored in its records: a run already attempted in this
    sweep (a baseline shared by several LoRA jobs) is not attempted again by each of them."""
    return hashlib.sha256(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:12]


def start(argv: list[str]) -> Sweep | None:
    """Check and prepare the sweep the command line `argv` asks for; None if it asks for no sweep.

    The command line is read with Hydra's own parser and composed as Hydra's multirun will compose it."""
    from lora_sweep import experiment, runtime

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return None
    runtime.quiet_libraries()
    with initialize_config_dir(config_dir=settings_module.CONF_DIR, version_base="1.3"):
        config = GlobalHydra.instance().hydra.compose_config(args.config_name or "config", args.overrides, RunMode.MULTIRUN)
        if not (args.multirun or config.hydra.mode == RunMode.MULTIRUN):  # one run: the same checks, before it starts
            preflight([experiment.plan(compose_job(config.hydra.job.config_name, list(config.hydra.overrides.task)))])
            return None
        jobs = job_overrides(config)
        if not jobs:
            raise UserError("the sweep grid is empty: every swept key needs at least one value")
        plans = [experiment.plan(compose_job(config.hydra.job.config_name, job)) for job in jobs]
        adaptive_sweeper.check(config, plans, lambda job: compose_job(config.hydra.job.config_name, job))
    preflight(plans)
    baselines = {}
    for plan in plans:
        if plan.settings.method.name != "full" and plan.settings.pair_baseline:
            baseline = experiment.baseline_settings(plan.settings)
            baselines.setdefault(experiment.plan(baseline).run_id, baseline)
    print(f"[sweep] {len(plans)} runs ({len({p.run_id for p in plans})} distinct) and {len(baselines)} full-FT baseline(s)")
    _say_what_is_reused(plans, list(baselines))
    if config.hydra.launcher._target_.rsplit(".", 1)[-1] in LOCAL_LAUNCHERS:
        for baseline in baselines.values():
            experiment.run(baseline, sweep=sweep_token(config.hydra.sweep.dir))
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # written once the jobs are about to start: their ETA clock
    (sweep_dir / PLAN_FILE).write_text(json.dumps({"jobs": len(plans), "started": time.time()}))
    return Sweep(plans[0].settings.runs_dir, list(dict.fromkeys([*baselines, *(p.run_id for p in plans)])),
                 plans[0].settings.analyze, plans[0].settings.deploy, plans[0].settings.cache_dir,
                 plans[0].settings.analysis.target_model, str(sweep_dir))


def preflight(plans: list[Plan]) -> None:
    """The checks a run would otherwise fail only once it (or its baseline) had trained: one runs_dir, the data
    read (its format, the tuning split's size) and the output folders writable."""
    runs_dirs = {p.settings.runs_dir for p in plans}
    if len(runs_dirs) > 1:
        raise UserError(f"a sweep writes its records to one runs_dir, not {len(runs_dirs)}")
    _read_data(plans)
    for folder in runs_dirs | {p.settings.artifacts_dir for p in plans if p.settings.train.save_adapter}:
        _check_writable(folder)


def _read_data(plans: list[Plan]) -> None:
    """Read every distinct data set once, as the runs will, into the token cache they load it from: a malformed or
    missing file stops the sweep before any job, at no extra cost (the runs then start from the cached tokens); and
    check each run against its training split's size (EVA's pass, AdaLoRA's schedule over an epoch budget)."""
    from transformers import AutoTokenizer

    from lora_sweep import data

    train_examples = {}
    for p in plans:
        s = p.settings
        key = (s.cache_dir, data.cache_key(p.family, s, p.source, data.tokenizer_id(s)))
        if key not in train_examples:
            tokenizer = AutoTokenizer.from_pretrained(p.model_path, revision=s.model.revision)
            train_examples[key] = len(data.prepare(p.family, s, p.source, tokenizer, data.tokenizer_id(s))[0]["train"])
        s.check_training_split(train_examples[key])


def _check_writable(folder: str) -> None:
    """Create `folder` and a temporary file in it, as a record is written: an unwritable folder stops the sweep once, before any job."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=folder)
    os.close(fd)
    os.unlink(path)


def finish(sweep: Sweep) -> int:
    """Print the sweep's table (measure deployment and write the analysis if asked); return the exit status: 1 if a run failed or left no record."""
    from lora_sweep import deploy, records, reporting
    from lora_sweep.analysis import analyse, tables
    from lora_sweep.analysis.load import load_records

    later = adaptive_sweeper.launched_run_ids(sweep.sweep_dir) if sweep.sweep_dir else []  # an adaptive sweep's later rounds
    run_ids = list(dict.fromkeys([*sweep.run_ids, *later]))
    found = {rid: records.read_record(sweep.runs_dir, rid) for rid in run_ids}
    written = [rid for rid, record in found.items() if record]
    if written:
        runs_dir = Path(sweep.runs_dir)
        analysis = analyse(*load_records(runs_dir), None)  # once: the table, the deployment's choice and the report
        print(tables.sweep_summary(analysis.runs[analysis.runs["run_id"].isin(written)]))
        if sweep.deploy:
            try:  # a measurement beside the sweep: its failure is said, and the analysis is still written
                deploy.deploy(runs_dir, [], deploy.REPEATS, 0, sweep.cache_dir, analysis)
            except UserError as exc:
                print(f"[sweep] deployment not measured: {exc}", file=sys.stderr)
        if sweep.analyze:
            print(f"[sweep] analysis written to {reporting.publish(analysis, runs_dir, sweep.target_model)}")
    lost = [rid for rid, record in found.items() if not record or record["status"] not in ("done", "diverged")]
    if lost:
        print(f"[sweep] {len(lost)} of {len(found)} runs failed or left no record: {', '.join(lost)}", file=sys.stderr)
    return 1 if lost else 0


class SweepCallback(Callback):
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from lora_sweep import distributed

        sweep_dir = Path(HydraConfig.get().sweep.dir)
        if HydraConfig.get().mode != RunMode.MULTIRUN or not (sweep_dir / PLAN_FILE).is_file() or not distributed.is_main():
            return  # a job of several processes (train.distributed) is counted once
        plan = json.loads((sweep_dir / PLAN_FILE).read_text())
        line = json.dumps({"job": HydraConfig.get().job.num, "status": str(job_return.status), "at": time.time()}) + "\n"
        fd = os.open(sweep_dir / PROGRESS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            os.write(fd, line.encode())  # one small O_APPEND write: lines from parallel jobs never interleave
        finally:
            os.close(fd)
        done = len((sweep_dir / PROGRESS_FILE).read_text().splitlines())
        elapsed = time.time() - plan["started"]
        eta = elapsed / done * (plan["jobs"] - done)
        print(f"[sweep] run {done} of {plan['jobs']} finished · elapsed {_clock(elapsed)} · ETA {_clock(eta)}")


def _say_what_is_reused(plans: list, baseline_ids: list[str]) -> None:
    """A sweep whose records exist finishes in seconds: say so, and how to train again, so that is not read as "nothing happened"."""
    from lora_sweep import records

    runs_dir = plans[0].settings.runs_dir
    ids = set(baseline_ids) | {p.run_id for p in plans}
    done = [rid for rid in ids if (records.read_record(runs_dir, rid) or {}).get("status") == "done"]
    if done and not plans[0].settings.rerun:
        print(f"[sweep] {len(done)} of these {len(ids)} runs already have a done record in {runs_dir}: they are reused, not "
              f"trained again (to train everything again: add rerun=true, or use another runs_dir)")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
