"""Saving and restoring bounded states: bit-identical round trips, fingerprint checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coda_jax import CoDAGQALandmark, load_state, read_state_metadata, save_state

CFG = dict(embed_dim=64, num_heads=4, num_kv_heads=2, window=8, num_landmarks_exact=4,
           num_landmarks_summary=4)


def _layer(seed=0, **kw):
    return CoDAGQALandmark(**(CFG | kw), rngs=nnx.Rngs(seed))


def _filled_state(layer, batch=2, dtype=jnp.float32, seed=0):
    x = jax.random.normal(jax.random.key(seed), (batch, 29, 64)).astype(dtype)
    state = layer.init_state(batch, dtype, key=jax.random.key(seed))
    return layer.prefill(x, state, block_size=8)[1]


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype,metrics", [(jnp.float32, False), (jnp.bfloat16, True)])
def test_layer_state_round_trip_is_bit_identical(tmp_path, dtype, metrics):
    layer = _layer(collect_metrics=metrics)
    state = _filled_state(layer, dtype=dtype)
    save_state(tmp_path / "doc", state, layer)
    _assert_identical(load_state(tmp_path / "doc", layer), state)
    meta = read_state_metadata(tmp_path / "doc")
    assert meta["batch_size"] == 2 and meta["dtype"] == str(jnp.dtype(dtype))


def test_stack_of_layers_round_trip(tmp_path):
    layers = [_layer(seed=i) for i in range(3)]
    states = [_filled_state(layer, seed=i) for i, layer in enumerate(layers)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    save_state(tmp_path / "model", stacked, layers)
    restored = load_state(tmp_path / "model", layers)
    _assert_identical(restored, stacked)
    assert restored.k_buf.shape[:2] == (3, 2)


def test_restoring_into_another_config_names_the_difference(tmp_path):
    layer = _layer()
    save_state(tmp_path / "doc", _filled_state(layer), layer)
    with pytest.raises(ValueError, match="window: saved 8, model 16"):
        load_state(tmp_path / "doc", _layer(window=16))
    with pytest.raises(ValueError, match="exact_match_threshold"):
        load_state(tmp_path / "doc", _layer(exact_match_threshold=0.5))
    with pytest.raises(ValueError, match="1 layer"):
        load_state(tmp_path / "doc", [_layer(), _layer()])


def test_a_state_saved_before_a_config_field_existed_loads_as_its_default(tmp_path):
    """States saved before ``write_gate_lookahead`` existed have no such key: they
    were written with its default (0), and load into a layer that has it at 0 only."""
    import dataclasses

    layer = _layer()
    asdict = dataclasses.asdict
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dataclasses, "asdict", lambda obj: {
            k: v for k, v in asdict(obj).items() if k != "write_gate_lookahead"})
        save_state(tmp_path / "doc", _filled_state(layer), layer)
    assert "write_gate_lookahead" not in read_state_metadata(tmp_path / "doc")["configs"][0]["bank"]
    _assert_identical(load_state(tmp_path / "doc", layer), _filled_state(layer))
    with pytest.raises(ValueError, match="write_gate_lookahead: saved 0, model 2"):
        load_state(tmp_path / "doc", _layer(write_gate_lookahead=2))


def test_restoring_for_other_weights_is_refused_unless_asked(tmp_path):
    layer = _layer(seed=0)
    state = _filled_state(layer)
    save_state(tmp_path / "doc", state, layer)
    other = _layer(seed=1)
    with pytest.raises(ValueError, match="different weights"):
        load_state(tmp_path / "doc", other)
    _assert_identical(load_state(tmp_path / "doc", other, check_weights=False), state)


def test_saving_never_loses_an_existing_state(tmp_path):
    layer = _layer()
    first, second = _filled_state(layer, seed=1), _filled_state(layer, seed=2)
    save_state(tmp_path / "doc", first, layer)
    with pytest.raises(FileExistsError, match="overwriting it was not asked for"):
        save_state(tmp_path / "doc", second, layer)
    _assert_identical(load_state(tmp_path / "doc", layer), first)
    # A state that does not belong to the model is refused before anything is written.
    with pytest.raises(ValueError, match="does not belong"):
        save_state(tmp_path / "doc", _filled_state(_layer(window=4)), layer, overwrite=True)
    _assert_identical(load_state(tmp_path / "doc", layer), first)
    save_state(tmp_path / "doc", second, layer, overwrite=True)
    _assert_identical(load_state(tmp_path / "doc", layer), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc"]


def test_missing_or_foreign_directories_are_clear_errors(tmp_path):
    layer = _layer()
    with pytest.raises(FileNotFoundError, match="no saved state"):
        load_state(tmp_path / "nothing", layer)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a saved coda_jax state"):
        load_state(tmp_path / "junk", layer)
