"""Saved states and models never destroy what is there, and damage is reported by name.

Overwriting replaces only a checkpoint of the same kind, atomically; anything
else is refused with the path and what was found, and stays byte-identical.
Checksums written at save catch altered or truncated files at load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coda_jax import (CausalLM, CoDAGQALandmark, DecoderConfig, load_model, load_state,
                      nonfinite_rows, read_model_metadata, read_state_metadata, save_model,
                      save_state, select_rows)
from coda_jax import orbax_io, safe_paths

LAYER = dict(embed_dim=32, num_heads=4, num_kv_heads=2, window=4, num_landmarks_exact=2,
             num_landmarks_summary=2)
DATA = Path(__file__).parents[1] / "data"


def _layer(seed=0):
    return CoDAGQALandmark(**LAYER, rngs=nnx.Rngs(seed))


def _state(layer, seed=1, batch=2, length=11):
    x = jax.random.normal(jax.random.key(seed), (batch, length, 32))
    return layer.prefill(x, layer.init_state(batch, key=jax.random.key(seed)), block_size=4)[1]


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_equal_states(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_states_match_recomputed(loaded, recomputed):
    """A stored state against the same prefill run by this build: everything but
    the float buffers exactly; the buffers to float32 rounding (XLA may round a
    projection differently from the build that wrote the file)."""
    assert jax.tree.structure(loaded) == jax.tree.structure(recomputed)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(recomputed)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(x, y)


def _no_staging(root: Path) -> None:
    leftovers = [p.name for p in root.iterdir() if ".saving-" in p.name or ".replaced-" in p.name]
    assert not leftovers, leftovers


@pytest.fixture()
def saved(tmp_path):
    layer = _layer()
    state = _state(layer)
    save_state(tmp_path / "doc", state, layer)
    return layer, state, tmp_path / "doc"


# ------------------------------------------------------------------ overwriting
@pytest.mark.parametrize("target", ["user_folder", "empty_folder", "plain_file", "model",
                                    "symlink"])
def test_overwrite_refuses_anything_but_a_saved_state(tmp_path, target):
    layer = _layer()
    path = tmp_path / "target"
    if target == "user_folder":
        path.mkdir()
        (path / "thesis.tex").write_text("years of work")
        (path / "data").mkdir()
        (path / "data" / "x.csv").write_text("1,2")
    elif target == "empty_folder":
        path.mkdir()
    elif target == "plain_file":
        path.write_bytes(b"\x00precious")
    elif target == "model":
        save_model(path, CausalLM(DecoderConfig("llama", 11, 16, 8, 1, 2, 2, 8),
                                  rngs=nnx.Rngs(0)))
    else:
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "keep.txt").write_text("keep")
        path.symlink_to(tmp_path / "real")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"refusing to overwrite {path}"):
        save_state(path, _state(layer), layer, overwrite=True)
    assert _snapshot(tmp_path) == before
    _no_staging(tmp_path)
    with pytest.raises(FileExistsError, match="already exists"):
        save_state(path, _state(layer), layer)
    assert _snapshot(tmp_path) == before


def test_overwrite_refuses_the_current_directory_and_parents(tmp_path, monkeypatch):
    layer = _layer()
    (tmp_path / "work.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    for path in (".", tmp_path, tmp_path.parent):
        with pytest.raises(ValueError, match="refusing to overwrite"):
            save_state(path, _state(layer), layer, overwrite=True)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_overwriting_a_state_swaps_it_whole(saved, monkeypatch, exchange):
    layer, first, path = saved
    if not exchange:
        monkeypatch.setattr(safe_paths, "_exchange", lambda a, b: False)
    second = _state(layer, seed=2)
    save_state(path, second, layer, overwrite=True)
    _assert_equal_states(load_state(path, layer), second)
    _no_staging(path.parent)


@pytest.mark.parametrize("stage", ["orbax", "checksums", "install"])
def test_a_save_that_fails_midway_leaves_the_old_state_whole(saved, monkeypatch, stage):
    layer, first, path = saved
    before = _snapshot(path.parent)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if stage == "orbax":
        monkeypatch.setattr(orbax_io.ocp.Checkpointer, "save", boom)
    elif stage == "checksums":
        monkeypatch.setattr(orbax_io, "_digest", boom)
    else:
        monkeypatch.setattr(safe_paths, "install", boom)
    with pytest.raises(OSError, match="simulated"):
        save_state(path, _state(layer, seed=3), layer, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(path.parent) == before
    _assert_equal_states(load_state(path, layer), first)


def test_overwriting_a_model_replaces_only_a_model(tmp_path):
    cfg = DecoderConfig("llama", 11, 16, 8, 1, 2, 2, 8)
    first, second = CausalLM(cfg, rngs=nnx.Rngs(0)), CausalLM(cfg, rngs=nnx.Rngs(1))
    save_model(tmp_path / "m", first)
    save_model(tmp_path / "m", second, overwrite=True)
    np.testing.assert_array_equal(np.asarray(load_model(tmp_path / "m").norm.weight[...]),
                                  np.asarray(second.norm.weight[...]))
    layer = _layer()
    save_state(tmp_path / "s", _state(layer), layer)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="not a saved model"):
        save_model(tmp_path / "s", first, overwrite=True)
    assert _snapshot(tmp_path) == before
    _no_staging(tmp_path)


# ------------------------------------------------------------------ corruption
def _array_files(path: Path) -> list[Path]:
    return sorted(p for p in (path / "tree").rglob("*") if p.is_file() and "/d/" in str(p))


@pytest.mark.parametrize("damage", ["flip_array_bytes", "truncate_array", "delete_array",
                                    "truncate_metadata", "garble_metadata",
                                    "truncate_index", "garble_checksums",
                                    "delete_checksums"])
def test_damaged_states_are_refused_by_name(saved, damage):
    layer, _, path = saved
    arrays = _array_files(path)
    biggest = max(arrays, key=lambda p: p.stat().st_size)
    if damage == "flip_array_bytes":
        data = bytearray(biggest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        biggest.write_bytes(bytes(data))
        part = "the array data does not match its checksum"
    elif damage == "truncate_array":
        biggest.write_bytes(biggest.read_bytes()[:10])
        part = "the array data does not match its checksum"
    elif damage == "delete_array":
        biggest.unlink()
        part = "the array data is incomplete"
    elif damage == "truncate_metadata":
        meta = path / "meta" / "metadata"
        meta.write_text(meta.read_text()[:20])
        part = "the metadata does not match its checksum"
    elif damage == "garble_metadata":
        (path / "meta" / "metadata").write_text("{not json")
        part = "the metadata does not match its checksum"
    elif damage == "truncate_index":
        index = path / "tree" / "_METADATA"
        index.write_text(index.read_text()[:30])
        part = "the array index does not match its checksum"
    elif damage == "garble_checksums":
        (path / "checksums.json").write_text("[")
        part = "checksums.json is unreadable"
    else:
        (path / "checksums.json").unlink()
        part = "checksums.json is missing"
    with pytest.raises(ValueError, match=f"damaged: {part}"):
        load_state(path, layer)


def test_damaged_models_are_refused_by_name(tmp_path):
    save_model(tmp_path / "m", CausalLM(DecoderConfig("llama", 11, 16, 8, 1, 2, 2, 8),
                                        rngs=nnx.Rngs(0)))
    target = max(_array_files(tmp_path / "m"), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x01
    target.write_bytes(bytes(data))
    read_model_metadata(tmp_path / "m")  # the metadata itself is intact
    with pytest.raises(ValueError, match="damaged: the array data"):
        load_model(tmp_path / "m")


def test_paths_that_are_not_states_are_named(tmp_path):
    layer = _layer()
    with pytest.raises(FileNotFoundError, match="no saved state at"):
        load_state(tmp_path / "missing", layer)
    (tmp_path / "file.bin").write_bytes(b"12345")
    with pytest.raises(ValueError, match="is a file of 5 bytes, not a saved coda_jax state"):
        load_state(tmp_path / "file.bin", layer)
    with pytest.raises(ValueError, match="is a file of 5 bytes"):
        read_state_metadata(tmp_path / "file.bin")


def test_a_format1_state_still_loads(recwarn):
    layer = _layer()
    # tests/data/state_format1: saved by the previous release (no checksums, no
    # nonfinite flag) from this prefill with the same weights.
    x = jax.random.normal(jax.random.key(1), (2, 11, 32))
    _, want = layer.prefill(x, layer.init_state(2, key=jax.random.key(0)), block_size=4,
                            lengths=[11, 7])
    with pytest.warns(UserWarning, match="without checksums"):
        got = load_state(DATA / "state_format1", layer)
    _assert_states_match_recomputed(got, want)


# ------------------------------------------------------------------ poisoned states
def test_a_nan_in_a_prompt_flags_its_row_and_the_state_is_not_saved(tmp_path):
    layer = _layer()
    x = jax.random.normal(jax.random.key(1), (3, 9, 32))
    x = x.at[1, 4, 7].set(jnp.nan)
    _, state = layer.prefill(x, layer.init_state(3, key=jax.random.key(0)), block_size=4)
    assert nonfinite_rows(state) == [1]
    # The flag stays for good: later tokens do not clear it.
    _, state = layer.step(jnp.ones((3, 1, 32)), state)
    assert nonfinite_rows(state) == [1]
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        save_state(tmp_path / "poisoned", state, layer)
    assert not (tmp_path / "poisoned").exists()
    _no_staging(tmp_path)
    good = select_rows(state, jnp.array([0, 2]))
    save_state(tmp_path / "good", good, layer)
    _assert_equal_states(load_state(tmp_path / "good", layer), good)


def test_out_of_vocabulary_ids_on_the_device_poison_their_row(tmp_path):
    cfg = DecoderConfig("llama", 11, 16, 8, 2, 2, 2, 8)
    model = CausalLM(cfg, attention="coda_bounded",
                     attention_options=dict(window=4, num_landmarks_exact=2,
                                            num_landmarks_summary=2), rngs=nnx.Rngs(0))
    tokens = jnp.array([[1, 2, 3, 4, 5], [1, 2, 11, 4, 5]], jnp.int32)  # 11 = vocab
    logits, state = model.prefill(tokens, model.init_state(2, key=jax.random.key(0)),
                                  block_size=4)
    assert np.isfinite(np.asarray(logits[0])).all()
    assert np.isnan(np.asarray(logits[1, 2:])).all()
    assert nonfinite_rows(state) == [1]
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_state(tmp_path / "s", state, model)
    assert not os.path.exists(tmp_path / "s")


# ------------------------------------------------------------------ other machines
def _as_if_saved_on_a_gpu(path: Path) -> None:
    """Rewrite a checkpoint's device record as a GPU machine writes it (checksums
    updated): what a model trained on a GPU, or a state saved there, carries."""
    record = path / "tree" / "_sharding"
    record.write_text(record.read_text().replace("cpu:0", "cuda:0"))
    sums = json.loads((path / orbax_io.CHECKSUMS).read_text())
    sums["sha256"]["tree/_sharding"] = hashlib.sha256(record.read_bytes()).hexdigest()
    (path / orbax_io.CHECKSUMS).write_text(json.dumps(sums))


def test_models_and_states_saved_on_another_device_load_here(tmp_path):
    cfg = DecoderConfig("llama", 11, 16, 8, 1, 2, 2, 8)
    model = CausalLM(cfg, attention="coda_bounded", rngs=nnx.Rngs(0),
                     attention_options=dict(window=4, num_landmarks_exact=2,
                                            num_landmarks_summary=2))
    save_model(tmp_path / "m", model)
    layer = _layer()
    state = _state(layer)
    save_state(tmp_path / "s", state, layer)
    for path in (tmp_path / "m", tmp_path / "s"):
        _as_if_saved_on_a_gpu(path)
        assert "cuda:0" in (path / "tree" / "_sharding").read_text()
    loaded = load_model(tmp_path / "m")
    np.testing.assert_array_equal(np.asarray(loaded.norm.weight[...]),
                                  np.asarray(model.norm.weight[...]))
    assert loaded.norm.weight[...].devices() == {jax.devices()[0]}
    _assert_equal_states(load_state(tmp_path / "s", layer), state)
