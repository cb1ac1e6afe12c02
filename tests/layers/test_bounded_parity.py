"""Bounded layer vs the reference's PyTorch path, over a pairwise config matrix.

Each case: a reference ``CoDAGQALandmarkPerf2`` with perturbed weights and
its own random initial state, converted to JAX; a prompt drawn from a small
vocabulary (so exact-bank hits, refreshes and summary merges really happen);
prefill, then decode steps. Outputs must agree to 1e-5 relative (float32),
and the final states slot for slot (stronger than comparing banks as sets):
ring, both banks, allowed mask, write gates, LRU stamps, pos, ring index,
fill and active bank sizes.

The reference keeps one position and one pair of active bank sizes per
batch, and decides bank expansion from batch-wide counts; our rows are
independent. So with expansion on, a batch of 2 is compared with the
reference run on each row alone; otherwise with the reference's batch of 2.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch

from coda_jax import select_rows
from convert import from_reference, state_from_reference
from oracle import assert_close, reference_landmark, run_reference, to_jnp
from pairwise import pairwise, uncovered_pairs

EMBED, HEADS, KV_HEADS = 64, 4, 2

FACTORS = {
    "batch": [1, 2],
    "window": [1, 4, 16],
    "exact": [0, 8],
    "summary": [0, 8],
    "write_policy": ["none", "gated"],
    "refresh_on_hit": [False, True],
    "summary_overwrite": [True, False],
    "expansion": [False, True],
    "block_size": [1, 7, 16, 64],
    "prompt": ["below", "at", "above"],
    "rope_interleaved": [True, False],
    "head_norm": ["full", "identity"],
}
CASES = pairwise(FACTORS, seed=3)


def test_matrix_covers_every_pair():
    assert not uncovered_pairs(FACTORS, CASES)
    assert len(CASES) < 40


# Switches outside the matrix, each on top of one matrix case.
EXTRA = [
    {"mask_unused_memory": False},
    {"mem_init": "zeros"},
    {"detach_evicted": False},
    {"expansion_t_max": 0},
    {"exact_match_threshold": 0.5, "exact_novelty_threshold": 0.3},
    {"write_gate_threshold_exact": 0.3, "write_gate_threshold_summary": 0.2},
    {"exact_candidates_per_block": 8, "summary_candidates_per_block": 64},
    {"num_heads": 8, "num_kv_heads": 1},
    {"num_heads": 2, "num_kv_heads": 2},
    {"collect_metrics": True},
]
EXTRA_CASES = [CASES[i % len(CASES)] | {"extra": extra} for i, extra in enumerate(EXTRA)]


def _layer_kwargs(case: dict) -> dict:
    kw = dict(embed_dim=EMBED, num_heads=HEADS, num_kv_heads=KV_HEADS, window=case["window"],
              num_landmarks_exact=case["exact"], num_landmarks_summary=case["summary"],
              write_policy=case["write_policy"], exact_refresh_on_hit=case["refresh_on_hit"],
              summary_overwrite_on_insert=case["summary_overwrite"],
              rope_interleaved=case["rope_interleaved"], head_norm_mode=case["head_norm"],
              exact_candidates_per_block=3, summary_candidates_per_block=5)
    if case["expansion"]:
        kw |= dict(min_landmarks_exact=min(2, case["exact"]),
                   min_landmarks_summary=min(2, case["summary"]), expansion_t_max=40)
    return kw | case.get("extra", {})


def _prompt_len(case: dict) -> int:
    w = case["window"]
    return {"below": w // 2, "at": w, "above": 3 * w + 5}[case["prompt"]]


def vocab_inputs(gen: torch.Generator, batch: int, length: int, vocab: int = 6) -> torch.Tensor:
    """Tokens from a tiny vocabulary, a third of them slightly noisy."""
    table = torch.randn(vocab, EMBED, generator=gen)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    noise = 0.05 * torch.randn(batch, length, EMBED, generator=gen)
    noisy = (torch.rand(batch, length, 1, generator=gen) < 0.33).float()
    return table[ids] + noise * noisy


def assert_state_equal(ours, ref_state, layer, what: str) -> None:
    want = state_from_reference(ref_state, layer)
    for name in ("k_buf", "v_buf", "g_recent"):
        assert_close(getattr(ours, name), getattr(want, name), what=f"{what} {name}")
    for name in ("allowed", "mem_last_exact", "pos", "recent_idx", "recent_filled",
                 "active_exact", "active_summary"):
        np.testing.assert_array_equal(np.asarray(getattr(ours, name)),
                                      np.asarray(getattr(want, name)), err_msg=f"{what} {name}")


@pytest.mark.parametrize("case", CASES + EXTRA_CASES,
                         ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_prefill_decode_and_state_match_reference(case):
    seed = zlib.crc32(repr(sorted(case.items())).encode())
    gen = torch.Generator().manual_seed(seed)
    ref = reference_landmark(seed, **_layer_kwargs(case))
    layer = from_reference(ref)
    batch, length = case["batch"], _prompt_len(case)
    x = vocab_inputs(gen, batch, length)
    decode_xs = vocab_inputs(gen, batch, case["window"] + 3)
    torch.manual_seed(seed)
    init = ref.init_state(batch_size=batch, device="cpu", dtype=torch.float32)
    state = state_from_reference(init, layer)

    y, state = layer.prefill(to_jnp(x), state, block_size=case["block_size"])
    steps = []
    for t in range(decode_xs.shape[1]):
        y_t, state = layer.step(to_jnp(decode_xs[:, t:t + 1]), state)
        steps.append(y_t)

    rows = [slice(None)] if not (case["expansion"] and batch > 1) else [
        slice(i, i + 1) for i in range(batch)]
    for row in rows:
        ref_init = state_from_reference_rows(init, row)
        ref_y, ref_steps, ref_state = run_reference(ref, ref_init, x[row],
                                                    case["block_size"], decode_xs[row])
        what = f"{case} rows {row}"
        assert_close(y[row], ref_y, what=f"{what} prefill")
        for t, (ours_t, ref_t) in enumerate(zip(steps, ref_steps)):
            assert_close(ours_t[row], ref_t, what=f"{what} decode step {t}")
        ours_rows = state if row == slice(None) else select_rows(state, row)
        assert_state_equal(ours_rows, ref_state, layer, what)


def state_from_reference_rows(ref_state, row):
    """A copy of the reference state restricted to some batch rows."""
    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value[row].clone()
        return value

    fields = {f.name: cut(getattr(ref_state, f.name)) for f in dataclasses.fields(ref_state)}
    return type(ref_state)(**fields)
