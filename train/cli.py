"""What the training command lines share: errors as one line on stderr, and exit
codes scripts can rely on (0 done, 1 usage, 2 a path not found, 3 refused or
invalid)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_OK, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3


class UsageParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors exit with code 1 (``EXIT_USAGE``),
    not argparse's 2 (which the training command lines keep for a path not found)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def run_reporting_errors(action: Callable[[], int | None],
                         refused: tuple[type[BaseException], ...] = (ValueError,)) -> int:
    """``action()``'s exit code (None: 0); a missing path is code 2 and a refusal
    (``refused``) code 3, each reported as ``error: ...`` on stderr."""
    try:
        return action() or EXIT_OK
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except refused as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
