"""A rank sweep that spends seeds only where the answer is still open, as a Hydra Sweeper (the Optuna and Ax
sweepers' pattern): every round goes through `self.launcher.launch`, so joblib, submitit (SLURM) and Ray run it
unchanged, and nothing here schedules a job.

Round 1 runs every grid point at the initial seeds. After each round the records of the sweep's runs are read
and lora_sweep.analysis.adaptive gives each rank its sequential verdict; only the grid points of open ranks that can still
change the answer (the smallest rank within the margin of full FT, or "none") get the next seed, and each LoRA
run brings its seed's full-FT baseline (experiment.run). The sweep stops when the answer is decided, when no
rank left open could be settled by max_seeds, at max_seeds, at the time limit, or after a round with a failed run
(the exit status is then 1). Its rounds and verdicts go to `adaptive_sweep.json` beside the records folder (the
report's "How the sweep decided") and in the sweep's own folder (lora_sweep.sweep.finish).

Decisions depend only on the records, so a killed sweep started again reuses its runs by id (experiment.run
skips them) and takes the same decisions; two identical sweeps into one folder share every run through the
per-run locks. `hydra.sweeper.adaptive=false` runs the fixed grid: every grid point at max_seeds seeds.

No `from __future__ import annotations` here: Hydra's plugin scan executes this module outside sys.modules, where a
dataclass with string annotations cannot be built.
"""

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from lora_sweep.errors import UserError

SEED_KEY = "train.seed"
RANK_KEY = "method.r"


@dataclass(frozen=True)
class AdaptiveSettings:
    """`hydra.sweeper.*` of conf/hydra/sweeper/adaptive.yaml, checked before any job starts."""

    params: dict[str, str] | None = None  # the grid, as Hydra's basic sweeper reads it (key: comma-separated values), without train.seed
    adaptive: bool = True  # false: the fixed grid, every grid point at every seed
    initial_seeds: int = 3  # seeds of every rank in the first round; at least 2 (one seed leaves training noise unknown)
    max_seeds: int = 6  # the most seeds a rank gets, and the fixed grid's seeds; at least initial_seeds
    margin: float | None = None  # ε of the non-inferiority test, display units (> 0); null: the metric's tolerance (1 point; 0.02 nats)
    max_minutes: float | None = None  # no round starts later than this after the sweep started (null: no limit)

    def __post_init__(self) -> None:
        for name in ("initial_seeds", "max_seeds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"hydra.sweeper.{name}={value!r} must be a whole number")
        if not isinstance(self.adaptive, bool):
            raise UserError(f"hydra.sweeper.adaptive={self.adaptive!r} must be true or false")
        if self.initial_seeds < 2:
            raise UserError(f"hydra.sweeper.initial_seeds={self.initial_seeds} must be at least 2: with one seed "
                            "training noise is unknown and no verdict can be drawn")
        if self.max_seeds < self.initial_seeds:
            raise UserError(f"hydra.sweeper.max_seeds={self.max_seeds} must be at least hydra.sweeper.initial_seeds="
                            f"{self.initial_seeds}")
        for name in ("margin", "max_minutes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise UserError(f"hydra.sweeper.{name}={value!r} must be a number above 0 (or null: "
                                + ("the metric's default tolerance)" if name == "margin" else "no limit)"))

    @classmethod
    def from_config(cls, node: Any) -> "AdaptiveSettings":
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        values.pop("_target_", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"hydra.sweeper.{unknown[0]} is not a setting of the adaptive sweeper; "
                            f"its settings: {', '.join(sorted(known))}")
        return cls(**values)


def configured(config: DictConfig) -> bool:
    """Whether the sweep of this composed config is the adaptive sweeper's."""
    return str(config.hydra.sweeper.get("_target_", "")).endswith(f"{__name__}.AdaptiveSweeper")


@dataclass(frozen=True)
class Grid:
    """A sweep's grid points (override lists, without the seed) and the seeds a point can get, in order."""

    settings: AdaptiveSettings
    points: list[list[str]]
    seeds: list[int]

    def jobs(self, points: Sequence[list[str]], seeds: Sequence[int]) -> list[list[str]]:
        """Every point at every seed, seed by seed: a sweep stopped part-way leaves whole seeds."""
        return [[*point, f"{SEED_KEY}={seed}"] for seed in seeds for point in points]

    def first_round(self) -> list[list[str]]:
        """The jobs launched first: the whole fixed grid, or every point at the initial seeds."""
        return self.jobs(self.points, self.seeds[:self.settings.initial_seeds] if self.settings.adaptive else self.seeds)


def grid(config: DictConfig, arguments: Sequence[str]) -> Grid:
    """Expand the sweeper's params and the command line's overrides as Hydra's basic sweeper does, the seed axis
    apart. An adaptive sweep gives seeds train.seed, train.seed + 1, ... itself; the fixed grid takes a swept
    train.seed as it is, or those max_seeds seeds."""
    settings = AdaptiveSettings.from_config(config.hydra.sweeper)
    parser = OverridesParser.create()
    params = parser.parse_overrides([f"{key}={value}" for key, value in (settings.params or {}).items()])
    overrides = [*params, *parser.parse_overrides(list(arguments))]
    seed_axis = [o for o in overrides if o.get_key_element() == SEED_KEY and (o in params or o.is_sweep_override())]
    if settings.adaptive and seed_axis:
        raise UserError(f"{SEED_KEY} is swept: an adaptive sweep chooses the seeds itself ({SEED_KEY}, +1, ... up to "
                        f"hydra.sweeper.max_seeds); drop the seed axis, or add hydra.sweeper.adaptive=false for a fixed grid over it")
    if settings.adaptive and not any(o.get_key_element() == RANK_KEY for o in overrides):
        raise UserError(f"an adaptive sweep needs a rank axis: {RANK_KEY}=1,2,4,... on the command line or in "
                        "hydra.sweeper.params")
    points = [job for batch in BasicSweeper.split_arguments([o for o in overrides if o.get_key_element() != SEED_KEY], None)
              for job in batch]
    if seed_axis:
        seeds = [int(v) for o in seed_axis for v in (o.sweep_string_iterator() if o.is_sweep_override() else [o.value()])]
    else:  # the first seed is train.seed as composed (the default, or train.seed=N on the command line)
        seeds = list(range(int(config.train.seed), int(config.train.seed) + settings.max_seeds))
    return Grid(settings, points, seeds)


def check(config: DictConfig, plans: list, compose: Callable[[list[str]], Any]) -> None:
    """Pre-flight of an adaptive sweep (lora_sweep.sweep.start), given the first round's plans: its runs are LoRA
    runs paired with full FT, and the later rounds' settings, which differ only by seed, compose."""
    if not configured(config):
        return
    g = grid(config, list(config.hydra.overrides.task))
    if not g.settings.adaptive:
        return
    lora = [p for p in plans if p.settings.method.name != "full"]
    if not lora:
        raise UserError("an adaptive sweep compares LoRA ranks with full FT, and its grid has no LoRA run (method=lora)")
    if not all(p.settings.pair_baseline for p in lora):
        raise UserError("pair_baseline=false: an adaptive sweep decides by the paired test against each seed's full-FT "
                        "baseline; use pair_baseline=true, or hydra.sweeper.adaptive=false for a fixed grid")
    for job in g.jobs(g.points, g.seeds[g.settings.initial_seeds:]):
        compose(job)


class AdaptiveSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = AdaptiveSettings.from_config(settings)
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function,
                                                                config=config)

    def sweep(self, arguments: list[str]) -> list[Sequence[Any]]:
        g = grid(self.config, arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        if not self.settings.adaptive:
            jobs = g.first_round()
            self.validate_batch_is_legal(jobs)
            return [self.launcher.launch(jobs, initial_job_idx=0)]
        return _Rounds(self, g, sweep_dir).run()


class _Rounds:
    """One adaptive sweep: its rounds, the runs they asked for, and the log of what was decided."""

    def __init__(self, sweeper: AdaptiveSweeper, g: Grid, sweep_dir: Path) -> None:
        from lora_sweep import sweep

        self.sweeper, self.grid, self.sweep_dir = sweeper, g, sweep_dir
        self.settings = g.settings
        self.config_name = sweeper.config.hydra.job.config_name
        self.local = sweeper.config.hydra.launcher._target_.rsplit(".", 1)[-1] in sweep.LOCAL_LAUNCHERS
        self.token = sweep.sweep_token(str(sweep_dir))
        self.runs: dict[int, list[str]] = {}  # grid point -> its run ids, seed by seed
        self.baselines: list[str] = []
        self.runs_dir: str | None = None
        self.keys: dict[str, tuple] = {}  # run id -> (context id, targets, rank; None for full FT), from its record
        self.started = time.time()
        self.log: dict[str, Any] = {
            "sweep_dir": str(sweep_dir), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": {"initial_seeds": self.settings.initial_seeds, "max_seeds": self.settings.max_seeds,
                         "margin": self.settings.margin, "alpha": _alpha()},
            "rounds": [], "groups": [], "stopped": "running", "run_ids": []}

    def run(self) -> list[Sequence[Any]]:
        from lora_sweep.analysis import adaptive

        returns, job_idx = [], 0
        active = list(range(len(self.grid.points)))
        seeds = self.grid.seeds[:self.settings.initial_seeds]
        why = "first round: every grid point at the initial seeds"
        while True:
            jobs = self.grid.jobs([self.grid.points[i] for i in active], seeds)
            self.sweeper.validate_batch_is_legal(jobs)
            self._plan(active, seeds, run_baselines=bool(self.log["rounds"]))
            _count_jobs(self.sweep_dir, job_idx + len(jobs))
            print(f"[sweep] round {len(self.log['rounds']) + 1}: {len(jobs)} runs, seed(s) {', '.join(map(str, seeds))} ({why})")
            returns.append(self.sweeper.launcher.launch(jobs, initial_job_idx=job_idx))
            job_idx += len(jobs)
            groups, failed = self._decide()
            self.log["groups"] = groups
            self.log["rounds"].append({"round": len(self.log["rounds"]) + 1, "seeds": seeds, "runs": len(jobs),
                                       "ran": self._ranks_of(active), "why": why, "after": adaptive.round_summary(groups)})
            given = len(self.runs[active[0]])  # seeds so far of the points that just ran
            continuing = self._continuing(groups)
            stop = (f"{len(failed)} run(s) failed ({', '.join(failed)})" if failed
                    else "no LoRA rank has a paired result to judge" if not groups
                    else "the answer is decided" if all(g["answer"]["decided"] for g in groups)
                    else f"max_seeds={self.settings.max_seeds} reached" if given >= len(self.grid.seeds)
                    else "no rank left open could be settled by max_seeds" if not continuing
                    else f"the time limit of {self.settings.max_minutes:g} minutes" if self._out_of_time()
                    else None)
            if stop:
                self.log["stopped"] = stop
                self._write_log()
                self._say(groups)
                return returns
            self._write_log()
            active, seeds = continuing, [self.grid.seeds[given]]
            why = "open ranks that can still change the answer: " + "; ".join(
                f"{g['label']}: {', '.join(f'r={r}' for r in g['answer']['to_continue'])}" for g in groups if g["answer"]["to_continue"])

    def _plan(self, points: list[int], seeds: list[int], run_baselines: bool) -> None:
        """The run ids of these points at these seeds and of their baselines; on this machine, train the baselines
        first (lora_sweep.sweep.start does it for the first round) so parallel jobs never wait on one."""
        from lora_sweep import experiment
        from lora_sweep.sweep import compose_job

        for seed in seeds:
            for i in points:
                settings = compose_job(self.config_name, self.grid.jobs([self.grid.points[i]], [seed])[0])
                self.runs_dir = settings.runs_dir
                self.runs.setdefault(i, []).append(experiment.plan(settings).run_id)
                if settings.method.name != "full" and settings.pair_baseline:
                    baseline = experiment.baseline_settings(settings)
                    rid = experiment.plan(baseline).run_id
                    if rid not in self.baselines:
                        self.baselines.append(rid)
                        if run_baselines and self.local:
                            experiment.run(baseline, sweep=self.token)
        self.log["run_ids"] = [*self.baselines, *(rid for ids in self.runs.values() for rid in ids)]

    def _decide(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Every group's verdicts and answer from the records of the sweep's runs so far, and the runs that failed
        or left no record."""
        from lora_sweep.analysis import adaptive
        from lora_sweep.analysis.load import load_records
        from lora_sweep import records

        ids = self.log["run_ids"]
        found = {rid: records.read_record(self.runs_dir, rid) for rid in ids}
        failed = [rid for rid, record in found.items() if not record or record["status"] == "failed"]
        df, _ = load_records(self.runs_dir, [rid for rid, record in found.items() if record])
        self.keys = {row.run_id: (row.context_id, row.targets, None if row.method == "full" else int(row.r))
                     for row in df.itertuples()}
        return adaptive.decide(df, self.settings.margin, self.settings.initial_seeds, self.settings.max_seeds), failed

    def _continuing(self, groups: list[dict[str, Any]]) -> list[int]:
        """The grid points that get the next seed: LoRA points of the ranks to continue, and the grid's own full-FT
        points (candidate baselines) whenever a LoRA point goes on."""
        go = {(g["context_id"], g["targets"], r) for g in groups for r in g["answer"]["to_continue"]}
        keys = {i: self.keys.get(ids[0]) for i, ids in self.runs.items()}
        lora = [i for i, key in keys.items() if key in go]
        full = [i for i, key in keys.items() if key is not None and key[2] is None]
        return sorted(lora + full) if lora else []

    def _ranks_of(self, points: list[int]) -> str:
        ranks = sorted({self.keys[self.runs[i][0]][2] for i in points if self.runs[i][0] in self.keys} - {None})
        return ", ".join(f"r={r}" for r in ranks) + " and full FT"

    def _out_of_time(self) -> bool:
        return self.settings.max_minutes is not None and time.time() - self.started > 60 * self.settings.max_minutes

    def _write_log(self) -> None:
        from lora_sweep.analysis import adaptive

        adaptive.write_log(self.sweep_dir / adaptive.LOG_NAME, self.log)
        adaptive.write_log(adaptive.log_path(self.runs_dir), self.log)

    def _say(self, groups: list[dict[str, Any]]) -> None:
        print(f"[sweep] adaptive sweep stopped after {len(self.log['rounds'])} round(s): {self.log['stopped']}")
        for g in groups:
            print(f"[sweep] {g['label']}: {g['text']}")
        if not groups:
            print("[sweep] no LoRA rank has a paired result: nothing was decided", file=sys.stderr)


def _alpha() -> float:
    from lora_sweep.analysis import stats

    return stats.SEQUENTIAL_ALPHA


def _count_jobs(sweep_dir: Path, jobs: int) -> None:
    """Tell the progress callback (lora_sweep.sweep.SweepCallback) how many jobs the sweep has launched so far."""
    from lora_sweep.sweep import PLAN_FILE

    plan = sweep_dir / PLAN_FILE
    if plan.is_file():
        plan.write_text(json.dumps({**json.loads(plan.read_text()), "jobs": jobs}))


def launched_run_ids(sweep_dir: str | Path) -> list[str]:
    """The runs an adaptive sweep asked for in all its rounds, baselines first (empty if it logged none)."""
    from lora_sweep.analysis import adaptive

    log = adaptive.read_log(Path(sweep_dir) / adaptive.LOG_NAME)
    return list(log["run_ids"]) if log else []


def register() -> None:
    """Make the sweeper known to Hydra whatever the install: some editable installs hide it from Hydra's scan of
    the hydra_plugins namespace."""
    Plugins.instance().register(AdaptiveSweeper)
