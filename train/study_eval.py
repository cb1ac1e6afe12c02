"""The 2x2 study's evaluation: every cell scored on the same held-out rows.

A *cell* is a model and a mode: the base with full attention; each arm's
phase-1 and phase-2 weights with a full KV cache; and, per bank, each arm
bounded after phase 2, bounded straight after phase 1 ("no phase 2"), and
with its banks removed ("window only"). Each cell scores every token of the
same rows of ``length`` tokens once; the perplexity of a shorter context is
the mean over the rows' prefixes (prediction is causal, so this is the same
number as reading only that prefix). Penalties and the interaction come with
bootstrap intervals over the rows. Results are kept per cell in the report,
so a run cut short resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coda_jax import BankConfig, CausalLM, tree_bytes

from .evaluation.bootstrap import bootstrap, row_means
from .evaluation.passkey import passkey_table
from .evaluation.perplexity import heldout_sequences, token_nll
from .steps import rebuilt, unbounded_twin, with_bank

ARMS = ("gqa", "coda")
PAPER = {"gqa": {"unbounded": 5.75, "bounded": 6.84, "penalty": 1.09},
         "coda": {"unbounded": 5.75, "bounded": 5.94, "penalty": 0.19},
         "interaction": -0.90, "no_phase2_bounded": 2464,
         "source": "the preprint's 2x2 on Mistral-7B, WikiText-2, 2,048 tokens"}


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """What the evaluation scores: ``sequences`` rows of ``length`` tokens per
    held-out set, perplexity at each of ``contexts`` (prefixes, <= length), and
    passkey retrieval at ``passkey_lengths`` (``passkey_count`` samples per depth)."""

    length: int = 8192
    sequences: int = 24
    contexts: tuple[int, ...] = (2048, 4096, 8192)
    batch_size: int = 4
    block_size: int = 128
    passkey_lengths: tuple[int, ...] = (2048, 8192, 16384, 32768)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    passkey_count: int = 8
    bootstrap_samples: int = 2000
    dtype: str = "bfloat16"


def in_dtype(model: CausalLM, dtype: Any) -> CausalLM:
    """The model with its floating-point weights cast to ``dtype`` (evaluation
    runs in the dtype training computed in)."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                         else a, state)
    return nnx.merge(graphdef, state)


Arms = Mapping[str, Mapping[str, Any]]  # arm -> {"phase1": model, "phase2": {bank: model}}


def study_cells(base: CausalLM | None, arms: Arms, banks: Mapping[str, dict]
                ) -> dict[str, tuple[Callable[[], CausalLM], bool]]:
    """``{cell: (build the model, bounded)}`` in the order they are scored."""
    cells: dict[str, tuple[Callable[[], CausalLM], bool]] = {}
    if base is not None:
        cells["base"] = (lambda: base, False)
    first_bank = next(iter(banks))
    # The headline cells first (a run cut short has the 2x2 of the first bank).
    for arm, models in arms.items():
        cells[f"{arm}/phase1"] = (lambda m=models["phase1"]: m, False)
    for bank in banks:
        for arm, models in arms.items():
            cells[f"{arm}/{bank}/bounded"] = (lambda m=models["phase2"][bank]: m, True)
        if bank == first_bank:
            for arm, models in arms.items():
                cells[f"{arm}/phase2"] = (
                    lambda m=models["phase2"][bank]: unbounded_twin(m), False)
        for arm, models in arms.items():
            cells[f"{arm}/{bank}/no_phase2"] = (
                lambda m=models["phase1"], o=banks[bank]: rebuilt(m, dataclasses.replace(
                    m.spec, kind="coda_bounded", bank=BankConfig(**o))), True)
        for arm, models in arms.items():
            cells[f"{arm}/{bank}/window_only"] = (
                lambda m=models["phase2"][bank]: with_bank(
                    m, num_landmarks_exact=0, num_landmarks_summary=0), True)
    return cells


def score_cell(model: CausalLM, rows: np.ndarray, *, bounded: bool, plan: EvalPlan,
               desc: str) -> dict[str, Any]:
    """One cell on ``rows``: PPL per context, each row's mean NLL per context
    (for the bootstrap) and, bounded, the banks' metrics."""
    nll, metrics = token_nll(in_dtype(model, jnp.dtype(plan.dtype)), rows, bounded=bounded,
                             block_size=plan.block_size, batch_size=plan.batch_size, desc=desc)
    per_context = {str(c): row_means(nll, c).tolist() for c in plan.contexts}
    return {"bounded": bounded,
            "ppl": {c: math.exp(float(np.mean(v))) for c, v in per_context.items()},
            "row_nll": per_context, **metrics}


def state_bytes(model: CausalLM, *, lengths: Sequence[int], dtype: Any = jnp.bfloat16
                ) -> dict[str, int]:
    """Bytes of one document's state: the bounded state (any length), or a full
    KV cache at each of ``lengths``."""
    if model.bounded:
        return {"any": tree_bytes(jax.eval_shape(
            lambda: model.init_state(1, dtype, mem_init="zeros")))}
    return {str(n): tree_bytes(jax.eval_shape(
        lambda n=n: model.init_state(1, dtype, max_length=n)))
            for n in lengths}


def statistics(evals: Mapping[str, Mapping[str, Any]], banks: Sequence[str], context: int,
               *, samples: int, seed: int = 0) -> dict[str, Any]:
    """Penalties and the interaction at ``context`` with bootstrap intervals.

    ``penalty``: bounded after phase 2 minus the phase-1 weights with a full
    cache (the paper's: the cost of adapting to bounded memory);
    ``penalty_same_weights``: bounded minus the same phase-2 weights with a full
    cache; ``interaction``: CoDA's penalty minus GQA's."""
    key = str(context)
    per_row = {cell: np.asarray(r["row_nll"][key]) for cell, r in evals.items()
               if key in r.get("row_nll", {})}
    stats: dict[str, Callable] = {}
    for bank in banks:
        for arm in ARMS:
            bounded, p1, p2 = f"{arm}/{bank}/bounded", f"{arm}/phase1", f"{arm}/phase2"
            if {bounded, p1, p2} <= set(per_row):
                stats[f"{arm}/{bank}/penalty"] = lambda p, b=bounded, u=p1: p[b] - p[u]
                stats[f"{arm}/{bank}/penalty_same_weights"] = lambda p, b=bounded, u=p2: \
                    p[b] - p[u]
        if all(f"{arm}/{bank}/penalty" in stats for arm in ARMS):
            stats[f"{bank}/interaction"] = lambda p, bank=bank: (
                (p[f"coda/{bank}/bounded"] - p["coda/phase1"])
                - (p[f"gqa/{bank}/bounded"] - p["gqa/phase1"]))
    return bootstrap(per_row, stats, samples=samples, seed=seed) if stats else {}


def passkey_rows(model: CausalLM, bounded: bool, tok, filler: np.ndarray, *, length: int,
                 plan: EvalPlan) -> list[dict[str, Any]]:
    """Passkey retrieval of one cell at one length, one row per depth."""
    # Bounded runs share the perplexity's compiled segments (same batch); full-cache
    # logits of long rows are large, so fewer rows at a time there.
    batch = plan.batch_size if bounded else min(plan.batch_size, max(1, 65536 // length))
    return passkey_table(in_dtype(model, jnp.dtype(plan.dtype)), tok, filler, lengths=[length],
                         depths=plan.passkey_depths, count=plan.passkey_count,
                         block_size=plan.block_size, modes=[bounded], batch_size=batch)


def heldout_rows(tokens: np.ndarray, plan: EvalPlan) -> np.ndarray:
    """The rows every cell is scored on."""
    return heldout_sequences(tokens, context=plan.length, max_sequences=plan.sequences)
