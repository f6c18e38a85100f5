"""`lora-sweep`: the Hydra app. One job = one experiment; `-m` sweeps many (see conf/sweep/)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lora_sweep import settings as settings_module
from lora_sweep.errors import UserError


def _parallel_jobs() -> int:
    """How many jobs the launcher runs at once here (joblib's n_jobs), to share the cores out."""
    launcher = HydraConfig.get().launcher
    return int(launcher.get("n_jobs", 1) or 1) if "n_jobs" in launcher else 1


@hydra.main(version_base="1.3", config_path=settings_module.CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float | None:
    from lora_sweep import experiment  # heavy imports after Hydra has parsed the command line

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        settings = settings_module.from_config(cfg)
        record = experiment.run(settings, parallel_jobs=_parallel_jobs() if multirun else 1)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if multirun:
            return None  # recorded where a run id existed; the sweep goes on
        sys.exit(2)
    print(f"[lora-sweep] {record['run_id']}: {record['status']}"
          + (f", {record['primary_metric']}={record['primary_value']:.4f}" if record["status"] == "done" else f" ({record['error']})"))
    if record["status"] != "done" and not multirun:
        sys.exit(1)
    return record.get("primary_value")


def main() -> None:
    settings_module.register()
    app()
