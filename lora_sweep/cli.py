"""`lora-sweep`: the Hydra app. One job = one experiment; `-m` sweeps many (see conf/sweep/).

Exit status: 0 when every run is done or diverged (a result), 1 when a run failed, 2 for bad input (one
`error: ...` line; in a sweep, before any job starts), 130 on Ctrl-C and 143 on SIGTERM (the run in progress
leaves no record)."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lora_sweep import settings as settings_module
from lora_sweep import sweep
from lora_sweep.errors import UserError, file_errors, one_line

settings_module.register()  # on import, not in main(): launchers run `app` in processes of their own, which import this module
sweep.adaptive_sweeper.register()  # hydra/sweeper=adaptive, which an editable install hides from Hydra's plugin scan


def _parallel_jobs() -> int:
    """How many jobs the launcher runs at once here (joblib's n_jobs), to share the cores out."""
    launcher = HydraConfig.get().launcher
    return int(launcher.get("n_jobs", 1) or 1) if "n_jobs" in launcher else 1


@hydra.main(version_base="1.3", config_path=settings_module.CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float | None:
    from lora_sweep import experiment, runtime  # heavy imports after Hydra has parsed the command line

    runtime.quiet_libraries()  # here too: a launcher may run this job in a process of its own
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        with file_errors():
            settings = settings_module.from_config(cfg)
            record = experiment.run(settings, parallel_jobs=_parallel_jobs() if multirun else 1,
                                    sweep=sweep.sweep_token(HydraConfig.get().sweep.dir) if multirun else None)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if multirun:
            return None  # recorded where a run id existed; the sweep goes on
        sys.exit(2)
    print(f"[lora-sweep] {record['run_id']}: {record['status']}"
          + (f", {record['primary_metric']}={record['primary_value']:.4f}" if record["status"] == "done" else f" ({record['error']})"))
    if record["status"] == "failed" and not multirun:  # a diverged run is a result
        sys.exit(1)
    return record.get("primary_value")


def main() -> None:
    """One run (Hydra's run), or a sweep: checked whole by sweep.start before Hydra's multirun launches any job,
    and its exit status set by sweep.finish once every job has ended."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # composition errors reach us whole, to be printed as one line
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        with file_errors():
            planned = sweep.start(sys.argv[1:])
            app()
            status = sweep.finish(planned) if planned else 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as exc:  # unknown option, wrong type, unparseable override
        print(f"error: {error_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except Stopped as exc:
        print(f"stopped by {signal.Signals(exc.signum).name}: the run in progress left no record; finished runs keep "
              f"theirs, and the same command resumes", file=sys.stderr)
        sys.exit(128 + exc.signum)
    if status:
        sys.exit(status)


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised where this process is: no run catches it, so the run in progress writes no record,
    and joblib (a KeyboardInterrupt) aborts the sweep's other jobs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    """End the jobs this process started (a sweep's joblib workers) at once, before anything else: none trains on
    or writes a record after the stop. Then stop this process too."""
    for child in multiprocessing.active_children():
        child.terminate()
    raise Stopped(signum)


def error_line(exc: BaseException) -> str:
    """A composition error as one line: an unknown key with the closest known ones (never Hydra's hint to append it
    with +, which the schema refuses too), how to quote a value Hydra's grammar cannot read, a nested group's options."""
    message = one_line(exc)
    override = re.search(r"Could not override '([^']+)'", message)
    if override and not override.group(1).startswith("hydra."):  # a setting: the schema refuses it with a + as well
        return settings_module.unknown_key(override.group(1)) or re.sub(r"; To append to your config use \S+", "", message)
    unreadable = re.search(r"LexerNoViableAltException: (.*?); \^", message)
    if unreadable:
        key, _, value = unreadable.group(1).partition("=")
        return (f"cannot read {unreadable.group(1)}: a value holding ~, a non-ASCII letter or another character outside "
                f"Hydra's grammar must be quoted, inside the shell's quotes: \"{key}='{value}'\" (for example \"runs_dir='runs/ü'\")")
    return _with_options(message)


def _with_options(message: str) -> str:
    """Hydra lists a group's options except for nested groups (task/glue): add them from conf/."""
    missing = re.search(r"Could not find '([^']+)'", message)
    group = Path(settings_module.CONF_DIR) / Path(missing.group(1)).parent if missing else None
    if group is None or "Available options" in message or not group.is_dir():
        return message
    return f"{message}; available options: {', '.join(sorted(p.stem for p in group.glob('*.yaml')))}"
