"""The database tests' tiny model, text and helpers (a module of its own, not the
conftest: a test's child process imports it by name, where ``conftest`` would be
the suite's)."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from coda_jax import CausalLM, DecoderConfig, save_model
from train.data import train_tokenizer

TEXT = ("The lighthouse keeper wrote in her log every night. The storm came from the west "
        "and the boats stayed in the harbour. In the morning the keeper counted 12 gulls "
        "on the rocks and 3 seals in the bay. ") * 20
CFG = dict(family="llama", vocab_size=320, hidden_size=32, intermediate_size=48,
           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
BANKS = dict(window=8, num_landmarks_exact=4, num_landmarks_summary=4)
# Random weights rarely emit a stop token: none, so answers have a fixed length.
SETTINGS = {"stop_tokens": [], "block_size": 16, "max_new_tokens": 6}


def make_model_dir(root: Path, *, seed: int = 0, attention: str = "coda_bounded",
                   settings: dict | None = None, banks: dict | None = None) -> Path:
    """A model checkpoint with its tokenizer.json inside, at ``root``."""
    model = CausalLM(DecoderConfig(**CFG), attention=attention,
                     attention_options=(banks or BANKS) if attention == "coda_bounded" else None,
                     rngs=nnx.Rngs(seed))
    save_model(root, model, extra_meta={"database": settings if settings is not None
                                        else SETTINGS})
    train_tokenizer([TEXT], CFG["vocab_size"], root / "tokenizer.json")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes (to show nothing changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}
