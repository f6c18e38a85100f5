"""Optional Weights & Biases logging (logger=wandb); logger=none logs nothing.

wandb writes under `<runs_dir>/wandb`, inside the folder the user named, never in the current directory;
`logger.mode=offline` works with no network (sync later with `wandb sync`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lora_sweep import distributed
from lora_sweep.settings import Settings


class Tracker:
    def __init__(self, settings: Settings, run_id: str, config: dict[str, Any]):
        self._run = None
        if settings.logger.name != "wandb" or not distributed.is_main():
            return
        import wandb

        folder = Path(settings.runs_dir).resolve() / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", str(folder))
        os.environ.setdefault("WANDB_CACHE_DIR", str(folder / "cache"))
        self._run = wandb.init(project=settings.logger.project, mode=settings.logger.mode, name=run_id,
                               id=run_id, config=config, reinit="finish_previous", resume="allow")

    def log_loss(self, step: int, loss: float) -> None:
        if self._run:
            self._run.log({"train/loss": loss}, step=step)

    def finish(self, record: dict[str, Any]) -> None:
        if not self._run:
            return
        summary = {f"eval/{k}": v for k, v in (record.get("metrics") or {}).items()}
        summary.update({f"params/{k}": v for k, v in (record.get("params") or {}).items()})
        summary.update({f"memory/{k}": v for k, v in (record.get("memory") or {}).items() if isinstance(v, (int, float))})
        summary.update({f"time/{k}": v for k, v in (record.get("time") or {}).items()})
        summary["status"] = record["status"]
        self._run.summary.update(summary)
        self._run.finish(exit_code=0 if record["status"] == "done" else 1)
