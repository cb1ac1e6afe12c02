"""The device mesh of a training run: a data axis and an FSDP axis.

Batches are split over both axes (every device sees its own sequences);
parameters and optimizer state are sharded over ``fsdp`` along their largest
axis that divides evenly (replicated otherwise), and XLA's partitioner
inserts the gathers and reductions. The same code runs on one device (a 1x1
mesh), on several GPUs of one host, and on several hosts once
``jax.distributed.initialize()`` has run (``jax.devices()`` then lists every
host's devices).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A ``("data", "fsdp")`` mesh over every device; ``-1`` takes what is left."""
    count = len(jax.devices())
    if fsdp <= 0 or count % fsdp:
        raise ValueError(f"mesh.fsdp ({fsdp}) must divide the {count} device(s)")
    if data == -1:
        data = count // fsdp
    if data <= 0 or data * fsdp != count:
        raise ValueError(f"mesh.data x mesh.fsdp ({data} x {fsdp}) must equal the {count} "
                         "device(s)")
    devices = np.asarray(jax.devices()).reshape(data, fsdp)
    return Mesh(devices, ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sequences split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def param_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """FSDP: the largest axis divisible by the fsdp size is split over it."""
    size = mesh.shape["fsdp"]
    spec: list[Any] = [None] * len(shape)
    if size > 1:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % size == 0:
                spec[axis] = "fsdp"
                break
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_params(mesh: Mesh, tree: Any) -> Any:
    """Place every array leaf of ``tree`` (parameters, optimizer state) by
    :func:`param_sharding`."""
    def place(leaf):
        if not hasattr(leaf, "shape"):
            return leaf
        return jax.device_put(leaf, param_sharding(mesh, tuple(leaf.shape)))
    return jax.tree.map(place, tree)


def shard_batch(mesh: Mesh, batch: np.ndarray) -> jax.Array:
    """A host batch (B, L) split over the mesh; B must divide by its device count."""
    devices = mesh.devices.size
    if batch.shape[0] % devices:
        raise ValueError(f"optim.batch_size ({batch.shape[0]}) must divide by the mesh's "
                         f"{devices} device(s)")
    return jax.device_put(batch, batch_sharding(mesh))
