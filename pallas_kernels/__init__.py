"""GPU kernels in Pallas: fused differential flash attention and bounded decode attention.

Not written yet (see the README's roadmap). Until they are, every attention
call runs the pure-jnp implementation in ``coda_jax.attention_math``, which
is also the reference these kernels will be tested against.
"""
