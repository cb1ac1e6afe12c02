"""Two-phase training of CoDA models with optax (phase 1 unbounded, phase 2 bounded).

Empty so far: the training pipeline is the next piece of work (see the README's
roadmap).
"""
