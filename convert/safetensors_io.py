"""A small reader of safetensors files (bf16 included), tensor by tensor.

Tensors are read one at a time with plain file reads into fresh numpy
arrays, never memory-mapped, so reading a checkpoint holds at most one
tensor beyond what the caller keeps. Headers are validated against the file
size first: a truncated file is an error naming the tensor, before any read.

Why not the ``safetensors`` package's ``safe_open`` (measured 2026-12 with
safetensors 0.8 on the CPU machine): its ``"numpy"`` framework cannot
represent bfloat16 (``TypeError: data type 'bfloat16' not understood``), the
dtype of most HF checkpoints, and its ``"flax"`` framework raised the peak
host memory of converting a 200M-parameter sharded checkpoint from under 1.5
to 1.77 copies of the model (``tests/test_convert_memory.py``). The package
still writes our safetensors exports (``safetensors.numpy.save_file``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """Index of one .safetensors file: names, dtypes, shapes; ``read(name)`` loads one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"missing safetensors file {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{self.path} is not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise ValueError(f"{self.path} is truncated or not a safetensors file "
                                 f"(header of {header_len} bytes in a {size}-byte file)")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{self.path} has a corrupt safetensors header: {err}") from err
        self.data_start = 8 + header_len
        self.entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                 f"{info['dtype']}")
            start, end = info["data_offsets"]
            dtype = np.dtype(DTYPES[info["dtype"]])
            shape = tuple(info["shape"])
            if end - start != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"{self.path}: tensor {name!r} has inconsistent offsets")
            if self.data_start + end > size:
                raise ValueError(f"{self.path} is truncated: tensor {name!r} ends at byte "
                                 f"{self.data_start + end}, the file has {size}")
            self.entries[name] = (dtype, shape, start)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, start = self.entries[name]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise ValueError(f"{self.path} is truncated while reading {name!r}")
        return out


class CheckpointReader:
    """All tensors of a HuggingFace model directory: one file or a sharded index."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = {}
            for shard in sorted(set(weight_map.values())):
                if not (self.dir / shard).is_file():
                    raise FileNotFoundError(f"missing shard {shard} listed in {index}")
                shards[shard] = SafetensorsFile(self.dir / shard)
            self.location = {name: shards[shard] for name, shard in weight_map.items()}
            for name, file in self.location.items():
                if name not in file.entries:
                    raise ValueError(f"{index} puts {name!r} in {file.path.name}, "
                                     "which does not hold it")
        elif single.is_file():
            file = SafetensorsFile(single)
            self.location = {name: file for name in file.keys()}
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json "
                                    f"in {self.dir}")

    def keys(self) -> list[str]:
        return list(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.location[name].shape(name)

    def read(self, name: str) -> np.ndarray:
        return self.location[name].read(name)
