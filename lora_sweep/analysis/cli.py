"""`lora-analyze [RESULTS_DIR]`: tables, plots and report.md from the run records in RESULTS_DIR/runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_sweep.errors import UserError, file_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lora-analyze", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results", help="folder holding runs/ (default: results)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="how far from full FT a recommended rank may fall, in the metric's display units "
                             "(default: 1 point for GLUE metrics, 0.02 nats for a loss)")
    parser.add_argument("--target-model", default=None,
                        help="a model preset (e.g. llama3_1_8b): add the estimated memory and step time on that model for "
                             "the recommended rank (the 'At your scale' section)")
    args = parser.parse_args(argv)
    from lora_sweep.analysis import report

    try:
        if args.tolerance is not None and not args.tolerance > 0:  # NaN too
            raise UserError(f"--tolerance={args.tolerance:g} must be > 0 "
                            f"(in the metric's display units: points for GLUE metrics, nats for a loss)")
        with file_errors():
            path = report.write(Path(args.results_dir) / "runs", args.tolerance, args.target_model)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"[lora-analyze] wrote {path}")


if __name__ == "__main__":
    main()
