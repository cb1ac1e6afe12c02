"""Bad input to every public entry point of coda_jax, as a table.

Each row: what is called, the error type expected, a fragment its message must
contain, and (checked for every row) nothing on disk changed. The converters
and their command line have their own table (test_convert_bad_inputs.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coda_jax import (CausalLM, CoDAGQALandmark, DecoderConfig, generate, load_model,
                      load_state, read_state_metadata, save_model, save_state, concat_rows)

D = 32
LAYER = dict(embed_dim=D, num_heads=4, num_kv_heads=2, window=4, num_landmarks_exact=2,
             num_landmarks_summary=2)
CFG = DecoderConfig("llama", vocab_size=19, hidden_size=D, intermediate_size=40, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8)
BANKS = dict(window=4, num_landmarks_exact=2, num_landmarks_summary=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    layer = CoDAGQALandmark(**LAYER, rngs=nnx.Rngs(0))
    other_layer = CoDAGQALandmark(**(LAYER | dict(window=8)), rngs=nnx.Rngs(0))
    model = CausalLM(CFG, attention="coda_bounded", attention_options=BANKS, rngs=nnx.Rngs(0))
    gqa = CausalLM(CFG, rngs=nnx.Rngs(0))
    state = layer.init_state(2, key=jax.random.key(0))
    _, state = layer.prefill(jnp.ones((2, 6, D)), state, block_size=4)
    mstate = model.init_state(2, key=jax.random.key(0))
    logits, mstate = model.prefill(np.array([[1, 2, 3], [4, 5, 6]]), mstate, block_size=4,
                                   last_only=True)
    save_state(root / "state", state, layer)
    save_model(root / "model", model)
    (root / "notes.txt").write_text("a user's file")
    (root / "folder").mkdir()
    (root / "folder" / "a.txt").write_text("a")
    return SimpleNamespace(root=root, layer=layer, other_layer=other_layer, model=model,
                           gqa=gqa, state=state, mstate=mstate, logits=logits[:, 0],
                           x=jnp.ones((2, 5, D)))


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _gen(e, **kw):
    return generate(e.model, e.mstate, e.logits, **({"max_new_tokens": 3} | kw))


CASES = [
    # ------------------------------------------------------------- layer
    ("layer: window 0", lambda e: CoDAGQALandmark(**(LAYER | dict(window=0)), rngs=nnx.Rngs(0)),
     ValueError, "window must be a positive integer"),
    ("layer: fractional bank size",
     lambda e: CoDAGQALandmark(**(LAYER | dict(num_landmarks_exact=2.5)), rngs=nnx.Rngs(0)),
     ValueError, "num_landmarks_exact must be an integer"),
    ("layer: NaN threshold",
     lambda e: CoDAGQALandmark(**(LAYER | dict(exact_match_threshold=float("nan"))),
                               rngs=nnx.Rngs(0)),
     ValueError, "exact_match_threshold must be a finite number"),
    ("layer: heads not divisible",
     lambda e: CoDAGQALandmark(**(LAYER | dict(num_kv_heads=3)), rngs=nnx.Rngs(0)),
     ValueError, "must be divisible by num_kv_heads"),
    ("layer: unknown write policy",
     lambda e: CoDAGQALandmark(**(LAYER | dict(write_policy="maybe")), rngs=nnx.Rngs(0)),
     ValueError, "write_policy must be one of"),
    ("layer: init_state batch 0", lambda e: e.layer.init_state(0, key=jax.random.key(0)),
     ValueError, "batch_size must be a positive integer"),
    ("layer: init_state integer dtype",
     lambda e: e.layer.init_state(1, jnp.int32, key=jax.random.key(0)),
     ValueError, "floating dtype"),
    ("layer: random banks without a key", lambda e: e.layer.init_state(1),
     ValueError, "needs an explicit PRNG key"),
    ("layer: integer activations",
     lambda e: e.layer.prefill(jnp.ones((2, 5, D), jnp.int32), e.state),
     ValueError, "floating-point activations"),
    ("layer: a list", lambda e: e.layer.prefill([[0.0] * D], e.state),
     ValueError, "must be an array"),
    ("layer: 2-d input", lambda e: e.layer.prefill(jnp.ones((5, D)), e.state),
     ValueError, "must have shape (batch, length, embed_dim=32)"),
    ("layer: wrong width", lambda e: e.layer.prefill(jnp.ones((2, 5, D + 1)), e.state),
     ValueError, "embed_dim=32"),
    ("layer: empty batch", lambda e: e.layer.prefill(jnp.ones((0, 5, D)), e.state),
     ValueError, "empty batch"),
    ("layer: state of another config", lambda e: e.other_layer.prefill(e.x, e.state),
     ValueError, "state does not match this layer"),
    ("layer: state of another batch", lambda e: e.layer.prefill(jnp.ones((3, 5, D)), e.state),
     ValueError, "state does not match this layer"),
    ("layer: not a state", lambda e: e.layer.prefill(e.x, {"k_buf": 1}),
     ValueError, "expected a BankState"),
    ("layer: lengths too long", lambda e: e.layer.prefill(e.x, e.state, lengths=[5, 6]),
     ValueError, "lengths must be 2 integers in [0, 5]"),
    ("layer: negative length", lambda e: e.layer.prefill(e.x, e.state, lengths=[-1, 2]),
     ValueError, "lengths must be 2 integers"),
    ("layer: lengths of another batch", lambda e: e.layer.prefill(e.x, e.state, lengths=[5]),
     ValueError, "lengths must be 2 integers"),
    ("layer: block size 0", lambda e: e.layer.prefill(e.x, e.state, block_size=0),
     ValueError, "block_size and chunks_per_call must be positive"),
    ("layer: negative chunks", lambda e: e.layer.prefill(e.x, e.state, chunks_per_call=-1),
     ValueError, "block_size and chunks_per_call must be positive"),
    ("layer: fractional block size", lambda e: e.layer.prefill(e.x, e.state, block_size=2.5),
     ValueError, "must be positive integers, got 2.5"),
    ("model: block size 0",
     lambda e: e.model.prefill(np.ones((2, 3), int), e.mstate, block_size=0),
     ValueError, "block_size and chunks_per_call must be positive"),
    ("layer: step with two tokens", lambda e: e.layer.step(jnp.ones((2, 2, D)), e.state),
     ValueError, "step takes one token per row"),
    ("layer: step with a model's state", lambda e: e.layer.step(jnp.ones((2, 1, D)), e.mstate),
     ValueError, "state does not match this layer"),
    ("layer: decode with integers", lambda e: e.layer.decode(jnp.ones((2, 3, D), int), e.state),
     ValueError, "floating-point activations"),
    # ------------------------------------------------------------- model
    ("model: unknown attention",
     lambda e: CausalLM(CFG, attention="flash", rngs=nnx.Rngs(0)),
     ValueError, "attention must be 'gqa', 'coda' or 'coda_bounded'"),
    ("model: float tokens", lambda e: e.model.prefill(jnp.ones((2, 3)), e.mstate),
     ValueError, "integer ids of shape (batch, length)"),
    ("model: 1-d tokens", lambda e: e.model.prefill(np.array([1, 2, 3]), e.mstate),
     ValueError, "integer ids of shape (batch, length)"),
    ("model: id at the vocabulary size",
     lambda e: e.model.prefill(np.array([[1, 2, 19], [1, 2, 3]]), e.mstate),
     ValueError, "ids outside the vocabulary [0, 19): 19 at row 0, position 2"),
    ("model: negative id", lambda e: e.model.prefill([[1, -4], [0, 0]], e.mstate),
     ValueError, "-4 at row 0, position 1"),
    ("model: empty prompt, last only",
     lambda e: e.model.prefill(np.zeros((2, 0), int), e.mstate, last_only=True),
     ValueError, "needs at least one token per row"),
    ("model: a row without tokens, last only",
     lambda e: e.model.prefill(np.ones((2, 3), int), e.mstate, last_only=True, lengths=[3, 0]),
     ValueError, "row(s) [1] have none"),
    ("model: one layer's state for the model",
     lambda e: e.model.prefill(np.ones((2, 3), int), jax.tree.map(lambda a: a[0], e.mstate)),
     ValueError, "this is one layer's state"),
    ("model: state of another batch",
     lambda e: e.model.prefill(np.ones((3, 3), int), e.mstate),
     ValueError, "state does not match this model (2 layers, batch 3)"),
    ("model: step with two tokens", lambda e: e.model.step(np.ones((2, 2), int), e.mstate),
     ValueError, "step takes one token per row"),
    ("model: step id out of range", lambda e: e.model.step(np.full((2, 1), 99), e.mstate),
     ValueError, "ids outside the vocabulary"),
    ("model: bounded model called as unbounded", lambda e: e.model(np.ones((1, 3), int)),
     ValueError, "runs with prefill/step"),
    ("model: a gqa model's state without max_length", lambda e: e.gqa.init_state(1),
     ValueError, "init_state of attention='gqa' needs max_length"),
    ("model: max_length for a bounded model",
     lambda e: e.model.init_state(1, key=jax.random.key(0), max_length=64),
     ValueError, "max_length=64 is for the unbounded kinds' K/V cache"),
    ("model: a prompt beyond the KV cache",
     lambda e: e.gqa.prefill(np.ones((2, 5), int), e.gqa.init_state(2, max_length=4)),
     ValueError, "the prompt does not fit the KV cache: row 0 has 0 of max_length=4"),
    ("model: init_state batch -1", lambda e: e.model.init_state(-1),
     ValueError, "batch_size must be a positive integer"),
    ("model: unbounded ids out of range", lambda e: e.gqa(np.array([[3, 30]])),
     ValueError, "ids outside the vocabulary"),
    # ------------------------------------------------------------- generation
    ("generate: negative temperature", lambda e: _gen(e, temperature=-0.5),
     ValueError, "temperature must be >= 0"),
    ("generate: temperature NaN", lambda e: _gen(e, temperature=float("nan")),
     ValueError, "temperature must be finite"),
    ("generate: temperature not a number", lambda e: _gen(e, temperature="hot"),
     ValueError, "temperature must be a number"),
    ("generate: sampling without a key", lambda e: _gen(e, temperature=0.7),
     ValueError, "needs a PRNG key"),
    ("generate: top_k above the vocabulary", lambda e: _gen(e, top_k=20),
     ValueError, "top_k must be in [0, 19], got 20"),
    ("generate: negative top_k", lambda e: _gen(e, top_k=-1),
     ValueError, "top_k must be in [0, 19]"),
    ("generate: top_p 0", lambda e: _gen(e, top_p=0.0), ValueError, "top_p must be in (0, 1]"),
    ("generate: top_p above 1", lambda e: _gen(e, top_p=1.5), ValueError, "top_p must be in"),
    ("generate: no new tokens", lambda e: _gen(e, max_new_tokens=0),
     ValueError, "max_new_tokens must be >= 1"),
    ("generate: fractional length", lambda e: _gen(e, max_new_tokens=2.5),
     ValueError, "max_new_tokens must be an integer"),
    ("generate: stop token outside the vocabulary", lambda e: _gen(e, stop_tokens=(19,)),
     ValueError, "a stop token must be in [0, 18]"),
    ("generate: logits of another vocabulary",
     lambda e: generate(e.model, e.mstate, jnp.zeros((2, 7)), max_new_tokens=2),
     ValueError, "logits must have shape (batch, 19)"),
    ("generate: logits of another batch",
     lambda e: generate(e.model, e.mstate, jnp.zeros((3, 19)), max_new_tokens=2),
     ValueError, "state does not match this model"),
    ("generate: an unbounded model with a bounded state",
     lambda e: generate(e.gqa, e.mstate, e.logits, max_new_tokens=2),
     ValueError, "expected this model's KVCache"),
    ("generate: more tokens than the KV cache holds",
     lambda e: generate(e.gqa, e.gqa.init_state(2, max_length=4), e.logits, max_new_tokens=5),
     ValueError, "max_new_tokens=5 does not fit the KV cache"),
    # ------------------------------------------------------------- state checkpoints
    ("save_state: a state of another layer",
     lambda e: save_state(e.root / "new", e.state, e.other_layer),
     ValueError, "does not belong to this model"),
    ("save_state: not a model", lambda e: save_state(e.root / "new", e.state, "layer"),
     ValueError, "need a CoDAGQALandmark"),
    ("save_state: over a saved state", lambda e: save_state(e.root / "state", e.state, e.layer),
     FileExistsError, "overwriting it was not asked for"),
    ("save_state: over a user's file",
     lambda e: save_state(e.root / "notes.txt", e.state, e.layer, overwrite=True),
     ValueError, "refusing to overwrite"),
    ("save_state: over a user's folder",
     lambda e: save_state(e.root / "folder", e.state, e.layer, overwrite=True),
     ValueError, "a directory of 1 entries (a.txt)"),
    ("save_state: over a saved model",
     lambda e: save_state(e.root / "model", e.state, e.layer, overwrite=True),
     ValueError, "not a saved state"),
    ("save_state: inside a file",
     lambda e: save_state(e.root / "notes.txt" / "s", e.state, e.layer),
     ValueError, "is not a directory"),
    ("save_state: rows stacked from two layers' and a model's states",
     lambda e: concat_rows(e.state, e.mstate), ValueError, "cannot mix"),
    ("load_state: missing", lambda e: load_state(e.root / "nothing", e.layer),
     FileNotFoundError, "no saved state at"),
    ("load_state: a file", lambda e: load_state(e.root / "notes.txt", e.layer),
     ValueError, "is a file of 13 bytes"),
    ("load_state: a user's folder", lambda e: load_state(e.root / "folder", e.layer),
     ValueError, "not a saved coda_jax state"),
    ("load_state: a saved model", lambda e: load_state(e.root / "model", e.layer),
     ValueError, "format 'coda_jax.model/2'"),
    ("load_state: another config", lambda e: load_state(e.root / "state", e.other_layer),
     ValueError, "window: saved 4, model 8"),
    ("load_state: another depth",
     lambda e: load_state(e.root / "state", [e.layer, e.layer]),
     ValueError, "holds a state of 1 layer(s); the model has 2"),
    ("load_state: other weights",
     lambda e: load_state(e.root / "state", CoDAGQALandmark(**LAYER, rngs=nnx.Rngs(5))),
     ValueError, "different weights"),
    ("read_state_metadata: a folder", lambda e: read_state_metadata(e.root / "folder"),
     ValueError, "not a saved coda_jax state"),
    # ------------------------------------------------------------- model checkpoints
    ("save_model: over a saved state",
     lambda e: save_model(e.root / "state", e.model, overwrite=True),
     ValueError, "not a saved model"),
    ("save_model: over a user's folder",
     lambda e: save_model(e.root / "folder", e.model, overwrite=True),
     ValueError, "refusing to overwrite"),
    ("save_model: over a saved model", lambda e: save_model(e.root / "model", e.model),
     FileExistsError, "already exists"),
    ("load_model: a saved state", lambda e: load_model(e.root / "state"),
     ValueError, "format 'coda_jax.bank_state/2'"),
    ("load_model: missing", lambda e: load_model(e.root / "nothing"),
     FileNotFoundError, "no saved model at"),
    ("load_model: a file", lambda e: load_model(e.root / "notes.txt"),
     ValueError, "not a saved coda_jax model"),
]


@pytest.mark.parametrize("call,error,fragment", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_and_changes_nothing(env, call, error, fragment):
    before = _snapshot(env.root)
    with pytest.raises(error) as caught:
        call(env)
    assert fragment in str(caught.value), str(caught.value)
    assert _snapshot(env.root) == before
    leftovers = [p.name for p in env.root.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
