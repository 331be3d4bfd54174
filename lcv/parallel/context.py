"""Load-balanced token orders for context (sequence) parallelism, and their inverses.

With a causal or frame-block-causal mask, sharding the sequence contiguously over n devices gives
device r about (2r + 1) / n^2 of the attention work: the last device does ~2n times the first's,
and a ring waits for the slowest. Two reorderings fix this (MaxText's DUAL_CHUNK_SWAP, LongVILA's
`extract_local_zigzag`, Llama-3 context parallelism):

  zigzag:  cut the sequence into 2n chunks; device r holds chunks r and 2n - 1 - r, so every device
           gets one early and one late chunk (equal causal work up to one chunk's diagonal).
  striped: device r holds tokens r, r + n, r + 2n, ... (Brandon et al., Striped Attention).

The reorder is applied to the *whole* per-token layout in the data pipeline (tokens, targets, loss
weights, segment/frame ids, positions, `TokenMask` fields): masks carry global key indices
(`lcv.masks.TokenMask.index`), so attention, RoPE and the loss give identical results in any order.
The model's output is put back with the inverse.

A permutation `perm` here means: reordered[..., i, ...] = natural[..., perm[i], ...].
Axis letters: B batch, S sequence length.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

LoadBalance = Literal["zigzag", "striped", "none"]


def required_multiple(n: int, kind: LoadBalance = "zigzag") -> int:
  """The sequence length must be a multiple of this to shard over n devices in order `kind`."""
  if n < 1:
    raise ValueError(f"{n=} devices must be >= 1")
  if kind == "zigzag":
    return 2 * n
  if kind in ("striped", "none"):
    return n
  raise ValueError(f"{kind=} must be one of 'zigzag', 'striped', 'none'")


def _check_length(seq_len: int, n: int, kind: LoadBalance) -> None:
  multiple = required_multiple(n, kind)
  if seq_len % multiple:
    pad = -seq_len % multiple
    raise ValueError(
      f"{seq_len=} must be a multiple of {multiple} for {kind} order over {n} devices; pad by "
      f"{pad} tokens to {seq_len + pad} (lcv.parallel.context.pad_to_multiple)"
    )


def zigzag_indices(seq_len: int, n: int) -> np.ndarray:
  """int32[S]: zig-zag order; device r's shard is chunks (r, 2n - 1 - r) of 2n equal chunks."""
  _check_length(seq_len, n, "zigzag")
  chunks = np.arange(seq_len, dtype=np.int32).reshape(2 * n, seq_len // (2 * n))
  order = np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)
  return chunks[order].reshape(-1)


def striped_indices(seq_len: int, n: int) -> np.ndarray:
  """int32[S]: striped order; device r's shard is tokens r, r + n, r + 2n, ..."""
  _check_length(seq_len, n, "striped")
  return np.arange(seq_len, dtype=np.int32).reshape(seq_len // n, n).T.reshape(-1)


def order_indices(seq_len: int, n: int, kind: LoadBalance) -> np.ndarray:
  """int32[S] permutation for `kind` ("none" is the identity, still checked for divisibility)."""
  if kind == "zigzag":
    return zigzag_indices(seq_len, n)
  if kind == "striped":
    return striped_indices(seq_len, n)
  _check_length(seq_len, n, kind)
  return np.arange(seq_len, dtype=np.int32)


def inverse(perm) -> np.ndarray:
  """The inverse permutation: reorder(reorder(x, perm), inverse(perm)) == x."""
  perm = np.asarray(perm)
  inv = np.empty_like(perm)
  inv[perm] = np.arange(perm.size, dtype=perm.dtype)
  return inv


def reorder(tree, perm, axis: int = -1):
  """Permute every leaf of a pytree along its sequence axis.

  Args:
    tree: pytree of arrays that all have the sequence axis at `axis` (default -1: [B, S] ids,
      [3, B, S] M-RoPE positions, `TokenMask` fields); use axis=1 for activations [B, S, ...].
      numpy leaves stay numpy (host-side data pipeline), jax leaves stay jax.
    perm: int[S] permutation from `zigzag_indices` / `striped_indices` / `inverse`.
    axis: the sequence axis.

  Returns:
    The same pytree with every leaf reordered.
  """
  perm = np.asarray(perm)

  def one(path, x):
    if x.shape[axis] != perm.size:
      raise ValueError(
        f"leaf {jax.tree_util.keystr(path)} has {x.shape=}; its axis {axis} must be the sequence "
        f"of length {perm.size} (pass only per-token arrays, or choose `axis`)"
      )
    if isinstance(x, np.ndarray):
      return np.take(x, perm, axis=axis)
    return jnp.take(x, perm, axis=axis)

  return jax.tree_util.tree_map_with_path(one, tree)


def _seq_len(tree, axis: int) -> int:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError("cannot reorder an empty pytree")
  return leaves[0].shape[axis]


def to_order(tree, n: int, kind: LoadBalance = "zigzag", axis: int = -1):
  """Natural token order -> `kind` order for n devices (see `reorder` for `tree` and `axis`)."""
  return reorder(tree, order_indices(_seq_len(tree, axis), n, kind), axis)


def from_order(tree, n: int, kind: LoadBalance = "zigzag", axis: int = -1):
  """Inverse of `to_order`: `kind` order -> natural token order."""
  return reorder(tree, inverse(order_indices(_seq_len(tree, axis), n, kind)), axis)


def zigzag(tree, n: int, axis: int = -1):
  """Natural -> zig-zag order over n devices."""
  return to_order(tree, n, "zigzag", axis)


def unzigzag(tree, n: int, axis: int = -1):
  """Zig-zag -> natural order over n devices."""
  return from_order(tree, n, "zigzag", axis)


def pad_to_multiple(tree, multiple: int, axis: int = -1, value=0):
  """Pad every leaf at the end of its sequence axis to a multiple of `multiple`.

  Pad values follow the layout's conventions: pass a pytree of scalars matching `tree` (e.g.
  segment_ids 0 = padding, frame_ids -1, loss weights 0) or one scalar for all leaves. Padded
  tokens with segment id 0 are masked out of attention and the loss, so padding is exact.

  Returns:
    (padded tree, number of tokens added).
  """
  if multiple < 1:
    raise ValueError(f"{multiple=} must be >= 1")
  pad = -_seq_len(tree, axis) % multiple
  scalar = isinstance(value, (int, float, bool, np.generic)) or (
    hasattr(value, "shape") and value.shape == ()
  )

  def one(x, v):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.pad(x, widths, constant_values=v)

  if pad == 0:
    return tree, 0
  if scalar:
    return jax.tree.map(lambda x: one(x, value), tree), pad
  return jax.tree.map(one, tree, value), pad
