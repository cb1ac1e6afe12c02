"""What a model checkpoint converted from a GGUF file records beside its weights.

The file's tokenizer as a ``tokenizer.json`` (saved inside the checkpoint, so
the database and the generation helpers open it with the model), and in the
metadata: where the weights came from (file name, sha256, the model's own
name), the tokenizer's special tokens and the chat template the model was
trained with.
"""

from __future__ import annotations

from typing import Any

from .gguf import GGUFFile
from .gguf_tokenizer import tokenizer_config_from_gguf, tokenizer_from_gguf
from .smollm2 import file_sha256


def tokenizer_file(source: GGUFFile) -> bytes:
    """The file's tokenizer as the bytes of a ``tokenizer.json``; ``ValueError``
    naming the problem when its metadata describes none that can be built."""
    tokenizer = tokenizer_from_gguf(source.reader)
    if tokenizer.get_vocab_size() > source.config.vocab_size:
        raise ValueError(f"{source.path}: the tokenizer has {tokenizer.get_vocab_size()} ids, "
                         f"more than the model's vocabulary of {source.config.vocab_size}")
    return tokenizer.to_str(pretty=False).encode()


def checkpoint_metadata(source: GGUFFile) -> dict[str, Any]:
    """The metadata entries a converted checkpoint records about its GGUF file."""
    config = dict(tokenizer_config_from_gguf(source.reader))
    template = config.pop("chat_template", None)
    meta = source.metadata
    return {
        "source": {"format": "gguf", "file": source.path.name, "sha256": file_sha256(source.path),
                   "name": meta.get("general.name"), "architecture": source.architecture,
                   "context_length": meta.get(f"{source.architecture}.context_length")},
        "tokenizer": config,
        "chat_template": template,
    }
