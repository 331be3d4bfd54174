"""Ulysses (all-to-all) sequence parallelism, and the all-gather baseline; per-device functions.

Ulysses (DeepSpeed-Ulysses, arXiv 2309.14509): each device holds a sequence shard of all heads;
one all-to-all turns that into the whole sequence of N / n heads, attention runs locally with any
backend, and a second all-to-all turns it back. Communication per device is O(S * N * H / n),
independent of the number of steps, but n must divide the head counts (query *and* kv heads under
GQA). LongVILA's MM-SP 2-D attention (arXiv 2408.10188, notes vlm_methods §4.3) runs Ulysses inside
groups of `group` consecutive devices (one node, fast links) and a ring across the groups; the
`inner` argument of `ulysses_attention_shard` is that ring (`lcv.parallel.ring_attention`).

These functions run inside `jax.shard_map` over the context axis. Masks travel as global intervals
and key indices (`lcv.masks`), gathered along with the sequence, so any token order (zig-zag) works.
Axis letters: B batch, T query length, S key length, N q-heads, K kv-heads, H head dim.
"""

from __future__ import annotations

from collections.abc import Callable

from jax import lax


def check_heads(num_heads: int, num_kv_heads: int, group: int, what: str = "Ulysses") -> None:
  """Raise unless the group size divides both head counts (GQA kv heads included)."""
  for name, heads in (("query heads N", num_heads), ("kv heads K", num_kv_heads)):
    if heads % group:
      raise ValueError(
        f"{what} over {group} devices needs {name}={heads} to be a multiple of {group}; use "
        f"strategy='ring' (any head count), or a hybrid with a Ulysses group dividing {heads}"
      )


def _groups(axis_size: int, group: int):
  if axis_size % group:
    raise ValueError(f"Ulysses group {group} must divide the context axis size {axis_size}")
  if group == axis_size:
    return None
  return [list(range(g * group, (g + 1) * group)) for g in range(axis_size // group)]


def ulysses_attention_shard(
  q, k, v, q_lo, q_hi, k_idx, *, axis_name: str, axis_size: int, inner: Callable, group=None
):
  """Per-device Ulysses attention: all-to-all heads <-> sequence, `inner` attention, and back.

  Args:
    q: [B, T/n, N, H]; k, v: [B, S/n, K, H] (this device's sequence shard, all local heads).
    q_lo, q_hi: int32[B, T/n] global key intervals of the local query rows.
    k_idx: int32[B, S/n] global indices of the local keys.
    axis_name, axis_size: the context mesh axis and its size n.
    inner: f(q, k, v, q_lo, q_hi, k_idx) -> o on [B, T*g/n, N/g, H] etc. (local attention, or a
      ring over the groups for the 2-D hybrid).
    group: devices per Ulysses group g (consecutive ranks); default all n.

  Returns:
    o: [B, T/n, N, H] in q.dtype.
  """
  group = axis_size if group is None else group
  check_heads(q.shape[2], k.shape[2], group)
  groups = _groups(axis_size, group)
  if group == 1:
    return inner(q, k, v, q_lo, q_hi, k_idx)

  def heads_to_seq(x):  # [B, L/n, heads, H] -> [B, L*g/n, heads/g, H]
    return lax.all_to_all(x, axis_name, 2, 1, tiled=True, axis_index_groups=groups)

  def seq_to_heads(x):
    return lax.all_to_all(x, axis_name, 1, 2, tiled=True, axis_index_groups=groups)

  def gather(x):  # int32[B, L/n] -> [B, L*g/n], in the same rank order as the all-to-all
    return lax.all_gather(x, axis_name, axis=1, tiled=True, axis_index_groups=groups)

  o = inner(
    heads_to_seq(q),
    heads_to_seq(k),
    heads_to_seq(v),
    gather(q_lo),
    gather(q_hi),
    gather(k_idx),
  )
  return seq_to_heads(o)


def all_gather_attention_shard(q, k, v, q_lo, q_hi, k_idx, *, axis_name: str, local: Callable):
  """Per-device all-gather attention: gather K, V and key indices, attend locally.

  The simplest context parallelism (MaxText's default): O(S) K/V memory per device and no overlap
  of the gather with compute, but no head-count constraint. The backward's transpose of the gather
  is a reduce-scatter of dK, dV.

  Args:
    q, k, v, q_lo, q_hi, k_idx: local shards as in `ulysses_attention_shard`.
    axis_name: the context mesh axis.
    local: f(q, k, v, q_lo, q_hi, k_idx) -> o, differentiable local attention.

  Returns:
    o: [B, T/n, N, H].
  """

  def gather(x):
    return lax.all_gather(x, axis_name, axis=1, tiled=True)

  return local(q, gather(k), gather(v), q_lo, q_hi, gather(k_idx))
