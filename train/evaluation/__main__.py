"""Command line: ``python -m train.evaluation COMMAND [ARGS ...]``.

One entry for every evaluation of saved models; ``COMMAND --help`` gives a
command's options. Exit codes (``train.cli``): 0 done, 1 usage, 2 a path not
found, 3 refused or invalid.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from ..cli import EXIT_OK, EXIT_USAGE

PROG = "python -m train.evaluation"
# command -> (its module in this package, one line of what it does)
COMMANDS = {
    "perplexity": ("perplexity", "held-out perplexity, unbounded and bounded, and passkey "
                                 "retrieval"),
    "ask": ("ask", "a chat model's answers to questions about documents, scored"),
    "retention": ("retention_study", "the retention study: exact-match accuracy of saved "
                                     "states"),
    "retention-merge": ("retention_merge", "merge the results of a retention study run in "
                                           "parts"),
    "retention-plot": ("retention_plot", "the retention study's heat maps and tables"),
    "retention-fixture": ("retention_fixture", "a made-up corpus and a random model to "
                                               "time the study on"),
}


def usage() -> str:
    """The top-level help: the usage line and one line per command."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [ARGS ...]", "",
             "Evaluate saved models. Commands:", ""]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    lines += ["", f"{PROG} COMMAND --help: the command's options.",
              "Exit codes: 0 done, 1 usage, 2 a path not found, 3 refused or invalid."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named first in ``argv`` on the rest; its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return EXIT_OK
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"{usage()}\n\nerror: {what}", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(f"{__package__}.{COMMANDS[argv[0]][0]}")
    try:
        return module.main(argv[1:])
    except SystemExit as done:  # argparse's --help (0) and usage errors (1)
        return done.code if isinstance(done.code, int) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
