"""GPU kernels in Pallas.

``diff_flash_attention``: fused differential flash attention, forward and
backward (portable Triton-style lowering; interpret mode on CPU). Mosaic GPU
versions for Hopper and a bounded decode kernel are not written yet.
"""

from .diff_flash import diff_flash_attention

__all__ = ["diff_flash_attention"]
