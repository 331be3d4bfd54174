"""Host-to-device feeding: which rows a host builds, and global arrays from host-local rows.

Rows are sharded like the activations' logical "batch" axis and sequences like "length", through
the one rules table (`lcv.parallel.rules`: data x fsdp, and context).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lcv.parallel import rules as rules_lib


def spec(mesh, ndim: int, *, seq_dim: int | None = 1, batch_dim: int = 0) -> P:
  """PartitionSpec for a batch leaf: rows as "batch", `seq_dim` (if any) as "length"."""
  names = [None] * ndim
  names[batch_dim] = "batch"
  if seq_dim is not None:
    names[seq_dim] = "length"
  return rules_lib.logical_to_spec(names, mesh)


def batch_shards(mesh) -> int:
  """How many ways rows are split (the product of the batch axes' sizes)."""
  axes = spec(mesh, 1, seq_dim=None)[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def check_batch(batch_size: int, mesh, grad_accum: int = 1):
  if batch_size % (batch_shards(mesh) * grad_accum):
    raise ValueError(
      f"data.batch_size={batch_size} must be a multiple of data x fsdp = {batch_shards(mesh)} "
      f"times grad_accum={grad_accum}; change the batch size or the mesh"
    )


def host_slots(mesh, batch_size: int) -> list[int]:
  """The global rows whose data this process's devices hold (sorted)."""
  sharding = NamedSharding(mesh, spec(mesh, 1, seq_dim=None))
  rows = set()
  for idx in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(batch_size)[idx[0]])
  return sorted(rows)


def _leaf_spec(mesh, key: str, x) -> P:
  if key == "frames":  # [B, R, H, W, C]: rows only
    return spec(mesh, x.ndim, seq_dim=None)
  if x.ndim == 3 and key == "positions":  # M-RoPE [3, B, S]
    return spec(mesh, 3, seq_dim=2, batch_dim=1)
  return spec(mesh, x.ndim, seq_dim=1 if x.ndim >= 2 else None)


def to_device(batch: dict, mesh, slots: list[int], batch_size: int) -> dict:
  """Global jax.Arrays from this host's rows `slots` of every leaf (numpy, rows first; M-RoPE
  positions [3, b, S] rows second). Works for any mesh layout: each device reads its rows."""
  where = {s: i for i, s in enumerate(slots)}

  def put(key, x):
    x = np.asarray(x)
    bdim = 1 if (x.ndim == 3 and key == "positions") else 0
    shape = list(x.shape)
    shape[bdim] = batch_size
    sharding = NamedSharding(mesh, _leaf_spec(mesh, key, x))

    def cb(index):
      index = list(index) + [slice(None)] * (x.ndim - len(index))
      rows = [where[r] for r in range(batch_size)[index[bdim]]]
      index[bdim] = rows
      return x[tuple(index)]

    return jax.make_array_from_callback(tuple(shape), sharding, cb)

  return {k: jax.tree.map(lambda v, k=k: put(k, v), v) for k, v in batch.items()}
