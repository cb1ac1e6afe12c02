"""Command line: ``python -m train CONFIG.yaml [--set key=value ...] --out RUN_DIR``.

Runs the config's stage (pretrain, phase1 or phase2) into RUN_DIR, resuming it
when it already holds a run of the same config. Exit codes: 0 done, 1 usage, 2
a path not found, 3 refused or invalid (bad config, data, run directory, a
NaN loss).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .cli import UsageParser


def main(argv: Sequence[str] | None = None) -> int:
    parser = UsageParser(prog="python -m train", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", metavar="CONFIG.yaml",
                        help="the run's config (see train/configs/; every field in "
                             "train/config.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a field, dotted (e.g. --set optim.steps=100); "
                             "repeatable (default: none)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR",
                        help="the run directory: checkpoints, metrics.jsonl, model/ (required)")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="stop (with a checkpoint) once N updates are done, to resume "
                             "later with the same command (default: run to optim.steps)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (default: shown)")
    args = parser.parse_args(argv)
    from .cli import run_reporting_errors
    from .config import load_config
    from .loop import NonFiniteLoss, run

    def train() -> int:
        summary = run(load_config(args.config, args.overrides), args.out,
                      progress=not args.no_progress, stop_after=args.stop_after)
        print(json.dumps(summary, indent=1))
        return 0

    return run_reporting_errors(train, refused=(ValueError, NonFiniteLoss))


if __name__ == "__main__":
    sys.exit(main())
