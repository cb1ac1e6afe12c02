"""GPU kernels in Pallas.

``diff_flash_attention``: fused differential flash attention, forward and
backward. On a Hopper GPU (16-bit, head_dim 64/128) the forward runs on a Mosaic
GPU kernel (``diff_flash_mgpu``, key masks included) and so does the backward of
unmasked whole-tile calls (``diff_flash_mgpu_bwd``); everything else runs on the
portable (Triton-lowered) kernels, which run in interpret mode on CPU.

``decode_attention``: a few query tokens over a bounded bank of slots, for a
batch of states (portable Pallas; forward only).

``shared``: what the kernels and the library's XLA paths compute alike (the one
masked-key score, the head RMSNorm). This package imports nothing of coda_jax:
the library depends on the kernels, never the reverse.
"""

from .decode_attention import decode_attention
from .diff_flash import diff_flash_attention

__all__ = ["decode_attention", "diff_flash_attention"]
