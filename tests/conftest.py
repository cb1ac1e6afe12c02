"""Compile fast on CPU-only machines: the suite's tiny shapes run in milliseconds, and
on 2 cores about four fifths of its time was XLA compiling them. LLVM at optimisation
level 0 with XLA's older fusion emitters compiles them faster (a tiny bounded model's
first ``generate`` 1.4 s instead of 5.4, its prefill 1.2 s instead of 2.9:
benchmarks/results/suite_compile_flags_cpu.json, in git history at 66d53a9). This
changes how XLA generates machine code, not what a program computes; the benchmarks and the
package run XLA's defaults. Set before JAX starts its backend (subprocesses inherit
it); flags the caller set in ``XLA_FLAGS`` come after, so they win, and a machine with
an NVIDIA GPU keeps the defaults."""

from __future__ import annotations

import os
import shutil

FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

if shutil.which("nvidia-smi") is None:
    os.environ["XLA_FLAGS"] = f"{FAST_CPU_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()
