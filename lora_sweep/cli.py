"""`lora-sweep`: the Hydra app. One job = one experiment; `-m` sweeps many (see conf/sweep/).

Exit status: 0 when every run is done or diverged (a result), 1 when a run failed, 2 for bad input (one
`error: ...` line; in a sweep, before any job starts)."""

from __future__ import annotations

import os
import re
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


def _parallel_jobs() -> int:
    """How many jobs the launcher runs at once here (joblib's n_jobs), to share the cores out."""
    launcher = HydraConfig.get().launcher
    return int(launcher.get("n_jobs", 1) or 1) if "n_jobs" in launcher else 1


@hydra.main(version_base="1.3", config_path=settings_module.CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float | None:
    from lora_sweep import experiment  # heavy imports after Hydra has parsed the command line

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
    try:
        with file_errors():
            planned = sweep.start(sys.argv[1:])
            app()
            status = sweep.finish(planned) if planned else 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as exc:  # unknown option, wrong type, unparseable override
        print(f"error: {_with_options(one_line(exc))}", file=sys.stderr)
        sys.exit(2)
    if status:
        sys.exit(status)


def _with_options(message: str) -> str:
    """Hydra lists a group's options except for nested groups (task/glue): add them from conf/."""
    missing = re.search(r"Could not find '([^']+)'", message)
    group = Path(settings_module.CONF_DIR) / Path(missing.group(1)).parent if missing else None
    if group is None or "Available options" in message or not group.is_dir():
        return message
    return f"{message}; available options: {', '.join(sorted(p.stem for p in group.glob('*.yaml')))}"
