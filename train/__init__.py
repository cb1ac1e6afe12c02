"""Two-phase training (unbounded, then bounded with gradients through evictions).

Not written yet (see the README's roadmap). The layers already support it:
``CoDAGQALandmark.prefill(..., training=True)`` with ``detach_evicted=False``
is differentiable end to end.
"""
