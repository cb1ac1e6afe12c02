"""GPU kernels in Pallas.

``diff_flash_attention``: fused differential flash attention, forward and
backward. On a Hopper GPU the forward runs on a Mosaic GPU kernel
(``diff_flash_mgpu``); elsewhere, for key masks and for ragged tiles, on the
portable (Triton-lowered) kernel, which runs in interpret mode on CPU. The
backward kernels are the portable ones; Hopper backward kernels
(``diff_flash_mgpu_bwd``, ``backward="mosaic"``) are opt-in and not yet run on a GPU.

``decode_attention``: a few query tokens over a bounded bank of slots, for a
batch of states (portable Pallas; forward only).
"""

from .decode_attention import decode_attention
from .diff_flash import diff_flash_attention

__all__ = ["decode_attention", "diff_flash_attention"]
