"""Cutting a prompt into fixed-size compiled units (segments of whole blocks).

Every prefill call runs one compiled program per segment of
``block_size * chunks_per_call`` tokens; the prompt is padded to whole
segments, so prompts of any length share one compilation per block size (two
on a CPU by default: long calls for the bulk of a prompt, short ones for its
rest).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .state import POSITION_DTYPE


def check_lengths(lengths, batch: int, length: int) -> jax.Array | np.ndarray:
    """Per-row valid lengths as int32 (B,); all of ``length`` when None.

    Host values are range-checked and stay on the host (a numpy array: no
    device op per call; ``split_segments`` keeps one device copy per value);
    device arrays are shape-checked and clipped to [0, length] rather than
    read back (no host sync).
    """
    if lengths is None:
        return np.full((batch,), length, POSITION_DTYPE)
    if isinstance(lengths, jax.Array):
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
        return jnp.clip(lengths, 0, length).astype(POSITION_DTYPE)
    host = np.asarray(lengths)
    if host.shape != (batch,) or (host < 0).any() or (host > length).any():
        raise ValueError(f"lengths must be {batch} integers in [0, {length}], "
                         f"got {host.tolist()}")
    return host.astype(POSITION_DTYPE)


def default_chunks_per_call(block_size: int, batch_size: int = 1) -> int:
    """Blocks per compiled call when the caller does not say, per row: on a GPU
    4096 tokens' worth (at least 4 blocks, at most 16); elsewhere 256 tokens'
    worth (at least 1 block, at most 16). Shared out over the batch's rows (at
    least one block).

    On a GPU each call costs host work (and, where the block loop stays
    rolled, a while loop's start): on an H100, 16 blocks of 256 per call
    prefill 1.35-1.7x faster than 4 (benchmarks/results/NOTES.md). On a CPU
    this is the short call that reads what a prompt's long calls
    (:func:`long_chunks_per_call`) leave, so a prompt is padded to whole short
    calls only, not to a 4096-token call. The cap bounds the padding a short
    prompt pays; sharing the budget over the rows bounds a call's memory (the
    attention scores grow with rows x blocks: 128 rows of a 4096-token call on
    the Mistral-7B shape asked for 104 GiB)."""
    gpu = jax.default_backend() == "gpu"
    tokens, least = (4096, 4) if gpu else (256, 1)
    per_row = min(16, max(least, tokens // max(block_size, 1)))
    return max(1, per_row // max(batch_size, 1))


def long_chunks_per_call(block_size: int, batch_size: int = 1) -> int:
    """Blocks per call for the whole long calls of a prompt when the caller does
    not say: on a CPU 1,024 tokens' worth (at least 1 block, at most 16, shared
    out over the rows, never fewer than :func:`default_chunks_per_call`); on a
    GPU :func:`default_chunks_per_call`'s.

    Each CPU call copies every layer's weights out of the stacked arrays and
    widens and narrows a bfloat16 state: the bundled model (blocks of 128) read
    4,096 tokens in 9.7-9.9 s in calls of 256 tokens and in 8.3 s in calls of
    1,024 on 2 cores (8.8 s in calls of 512, 8.6 s in one call of 4,096;
    docs/results.md, "Reading in long calls")."""
    short = default_chunks_per_call(block_size, batch_size)
    if jax.default_backend() == "gpu":
        return short
    per_row = min(16, max(1, 1024 // max(block_size, 1)))
    return max(short, per_row // max(batch_size, 1))


def segment_sizes(length: int, *, block_size: int, batch_size: int,
                  chunks_per_call: int | None) -> list[int]:
    """Tokens of each compiled call over a prompt of ``length`` tokens: calls of
    ``block_size * chunks_per_call``; with ``chunks_per_call=None`` as many
    calls of :func:`long_chunks_per_call` blocks as the prompt fills, then its
    rest in calls of :func:`default_chunks_per_call` blocks (the last padded)."""
    checked = (block_size,) if chunks_per_call is None else (block_size, chunks_per_call)
    for value in checked:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError("block_size and chunks_per_call must be positive integers, got "
                             f"{block_size!r} and {chunks_per_call!r}")
    if chunks_per_call is not None:
        seg = block_size * chunks_per_call
        return [seg] * -(-length // seg)
    long = block_size * long_chunks_per_call(block_size, batch_size)
    short = block_size * default_chunks_per_call(block_size, batch_size)
    whole = length // long
    return [long] * whole + [short] * -(-(length - whole * long) // short)


def split_segments(x: jax.Array, lengths: jax.Array | np.ndarray, *, block_size: int,
                   chunks_per_call: int | None) -> list[tuple[jax.Array, jax.Array]]:
    """Pad x (B, L, ...) to whole segments (:func:`segment_sizes`) -> [(x_segment,
    valid lengths in it)]. A prompt of exactly one segment is passed through
    untouched: on a GPU every eager pad or slice is a kernel launch paid on each
    call.
    """
    length = x.shape[1]
    sizes = segment_sizes(length, block_size=block_size, batch_size=x.shape[0],
                          chunks_per_call=chunks_per_call)
    starts = np.cumsum([0] + sizes).tolist()
    if starts[-1] != length:
        x = jnp.pad(x, [(0, 0), (0, starts[-1] - length)] + [(0, 0)] * (x.ndim - 2))
    if isinstance(lengths, np.ndarray):
        def segment_lengths(start, size):
            return _on_device(tuple(np.clip(lengths - start, 0, size).tolist()))
    else:
        def segment_lengths(start, size):
            return jnp.clip(lengths - start, 0, size)
    if len(sizes) == 1:
        return [(x, segment_lengths(0, sizes[0]))]
    return [(x[:, start:start + size], segment_lengths(start, size))
            for start, size in zip(starts, sizes)]


@functools.lru_cache(maxsize=256)
def _on_device(values: tuple[int, ...]) -> jax.Array:
    """Host lengths as a device array, made once per distinct value: a numpy
    argument would be copied to the GPU on every call, a transfer on the
    compute stream's path."""
    return jnp.asarray(values, POSITION_DTYPE)


def join_segments(outputs: list[jax.Array], length: int) -> jax.Array:
    """Per-segment outputs (B, seg, ...) -> (B, length, ...) without the padding."""
    y = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)
    return y if y.shape[1] == length else y[:, :length]
