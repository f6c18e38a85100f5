"""`lora-estimate`: peak memory by component and step time of a configuration, for LoRA and for full FT, without
reading any weight (the model is built on the meta device from its config.json).

It takes the same config tree and overrides as lora-sweep, plus the `estimate` group (lora_sweep.settings.EstimateSettings):

    lora-estimate model=llama3_1_8b task=instruct/alpaca method.r=16 train.batch_size=4 estimate.seq_len=1024
    lora-estimate model=llama3_1_70b task=instruct/alpaca estimate.device_memory=80GiB estimate.precision=bf16
    lora-estimate -m model=qwen2_5_7b task=instruct/alpaca method.r=8,16,64        # one table per rank
    lora-estimate model.name_or_path=path/to/config.json task=instruct/alpaca    # any architecture, by its config

Exit status: 0 when the configured method fits estimate.device_memory in every job, 1 when it does not (its line says what
it needs; full FT is printed beside it for comparison), 2 for bad input (one error line).
"""

from __future__ import annotations

import os
import sys

from hydra import initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from lora_sweep import settings as settings_module
from lora_sweep import sweep
from lora_sweep.cli import error_line
from lora_sweep.errors import UserError
from lora_sweep.estimate import GIB, Estimate, architecture_source, both
from lora_sweep.hub import check_config
from lora_sweep.settings import Settings

COLUMNS = ("weights", "gradients", "optimizer", "activations", "other")
MIB = 2**20


def size(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def jobs(argv: list[str]) -> list[Settings]:
    """The settings of every job the command line asks for, expanded as lora-sweep's multirun expands them."""
    args = get_args_parser().parse_args(argv)
    if args.help:
        print(__doc__)
        sys.exit(0)
    settings_module.register()
    with initialize_config_dir(config_dir=settings_module.CONF_DIR, version_base="1.3"):
        mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN
        config = GlobalHydra.instance().hydra.compose_config("config", args.overrides, mode)
        overrides = sweep.job_overrides(config) if args.multirun else [args.overrides]
        every = [sweep.compose_job("config", job) for job in overrides]
    for s in every:  # a damaged config.json is one error line, before any table
        check_config(architecture_source(s), s.model.name_or_path)
    return every


def describe(s: Settings) -> str:
    e = s.estimate
    batch, seq = e.tokens(s.train)
    return (f"{s.model.name} · {s.task.family} · batch {batch} x {seq} tokens"
            + (f" x {s.train.grad_accum} accumulated" if s.train.grad_accum > 1 else "")
            + f" · {e.resolved_precision} · {e.optimizer}" + (" · gradient checkpointing" if e.gradient_checkpointing else "")
            + f" · {e.device} with {size(e.device_bytes)}, {e.device_tflops:g} TFLOP/s x {e.utilization:g}")


def verdict(e: Estimate, device_bytes: int) -> str:
    if e.fits(device_bytes):
        return f"fits ({100 * e.peak / device_bytes:.0f} % of {size(device_bytes)})"
    return f"does not fit: needs {size(e.peak)} of {size(device_bytes)}"


def table(estimates: list[Estimate], device_bytes: int) -> str:
    head = (f"  {'':<24s} {'params':>8s} {'trained':>8s} " + " ".join(f"{c:>11s}" for c in COLUMNS)
            + f" {'peak':>11s}  {'peak at':<14s} {'step':>9s}  device memory")
    rows = [head]
    for e in estimates:
        cells = " ".join(f"{size(getattr(e, c)):>11s}" for c in COLUMNS)
        rows.append(f"  {e.label:<24s} {count(e.params):>8s} {count(e.trainable):>8s} {cells} {size(e.peak):>11s}  "
                    f"{e.peak_at:<14s} {e.seconds:8.4f}s  {verdict(e, device_bytes)}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        every = jobs(sys.argv[1:] if argv is None else argv)
        fits = True
        for s in every:
            estimates = both(s)
            print(describe(s))
            print(table(estimates, s.estimate.device_bytes))
            fits &= all(e.fits(s.estimate.device_bytes) for e in estimates[:1])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        sys.exit(2)
    print("(gradients, activations and other are those live at the peak; step: FLOPs / (device_tflops x utilization))")
    if not fits:
        sys.exit(1)


if __name__ == "__main__":
    main()
