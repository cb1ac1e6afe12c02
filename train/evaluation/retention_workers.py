"""The retention study's worker processes: starting, waiting for and stopping them,
their command line, and the atomic JSON files they and the study write.

Each cache of the study answers its questions in a fresh process of this
Python (``python -m train.evaluation.retention_product worker SPEC ANSWERS``
for the product path, ``python -m train.evaluation.retention_unbounded worker
SPEC ANSWERS`` for the full K/V cache): SPEC says what to answer, ANSWERS is
written when the worker is done. The workers share the device with the study,
so none preallocates most of its memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..cli import EXIT_USAGE

# The directory that holds the train package: a worker imports it from there even
# where the project is not installed and the study runs from another directory.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def write_json(path: Path, payload: dict[str, Any], *, indent: int | None = 1) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=indent))
    tmp.replace(path)


def worker_main(argv: Sequence[str] | None, run_worker: Callable[[str, str], int],
                module: str) -> int:
    """The command line of a study worker process (``python -m MODULE worker SPEC
    ANSWERS``, started by the study); 1 for a usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3 or argv[0] != "worker":
        print(f"usage: python -m {module} worker SPEC.json ANSWERS.json", file=sys.stderr)
        return EXIT_USAGE
    return run_worker(argv[1], argv[2])


def start_worker(module: str, spec: Path, answers: Path) -> subprocess.Popen:
    """Launch ``python -m module worker spec answers`` in a fresh process of this
    Python; its progress and errors go to this process's stderr."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, "-m", module, "worker", str(spec), str(answers)],
                            env=env)


def finish_worker(process: subprocess.Popen, answers: Path, what: str) -> dict[str, Any]:
    """Wait for a worker; its answers file (``RuntimeError`` when it failed)."""
    code = process.wait()
    if code != 0 or not answers.is_file():
        raise RuntimeError(f"the {what} query worker failed (exit code {code}); its error is "
                           "above")
    return json.loads(answers.read_text())


def stop_worker(process: subprocess.Popen) -> None:
    """End a worker this study started that is still running (after a failure)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
