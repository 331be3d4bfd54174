"""The one attention mask of lcv, in three equivalent forms.

Token i may attend to token j iff (DESIGN.md section 2)

    seg[i] == seg[j] != 0  and  (j <= i  or  (frame_bidirectional and frame[i] >= 0
                                              and frame[i] == frame[j]))

Causal text, sequence packing and TC-LLaVA's frame-wise block-causal mask (arXiv 2409.03206) are
all this predicate. Samples and frames are contiguous runs of tokens, so the allowed keys of a query
row are one interval of *global* key indices:

    lo[i] = first index of i's segment
    hi[i] = last index of i's frame   (visual token, frame_bidirectional)
            i                          (otherwise)
    allow(i, j) = lo[i] <= j <= hi[i]

Padding rows (seg == 0) get the empty interval lo = 0, hi = -1.

Kernels and ring attention consume (lo, hi) plus the global index of every key, so they work on any
(query chunk, key chunk) pair, in any token order (zig-zag reordering permutes tokens, not indices).
`tile_map` classifies (block_q x block_k) tiles as skip / partial / full from the same intervals.
Only tests build the dense [B, S, S] form (`dense`).

Axis letters: B batch, T query length, S key length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SKIP, PARTIAL, FULL = 0, 1, 2

# Key index given to padded key slots (beyond the real keys): no interval ever contains it.
NO_KEY = np.iinfo(np.int32).max


def dense(segment_ids, frame_ids, frame_bidirectional: bool = True) -> jax.Array:
  """The mask predicate, materialised. For tests only: O(S^2) memory.

  Args:
    segment_ids: int[B, S]; 0 = padding, 1..n = packed sample.
    frame_ids: int[B, S]; -1 for text, frame index for visual tokens.
    frame_bidirectional: tokens of one frame see each other (TC-LLaVA's block-causal mask).

  Returns:
    bool[B, S, S]; [b, i, j] is True iff query i may attend to key j.
  """
  seg = jnp.asarray(segment_ids)
  frame = jnp.asarray(frame_ids)
  s = seg.shape[-1]
  same_seg = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  causal = jnp.arange(s)[None, :, None] >= jnp.arange(s)[None, None, :]
  if frame_bidirectional:
    same_frame = (frame[:, :, None] >= 0) & (frame[:, :, None] == frame[:, None, :])
    causal = causal | same_frame
  return same_seg & causal


def intervals(segment_ids, frame_ids, frame_bidirectional: bool = True):
  """Interval form of the mask: query i may see global keys lo[i] <= j <= hi[i].

  Requires contiguous segments and contiguous frames (as `lcv.layout` builds them); under that
  layout this equals `dense` exactly (tested on random layouts).

  Args:
    segment_ids: int[B, S].
    frame_ids: int[B, S].
    frame_bidirectional: see `dense`.

  Returns:
    (lo, hi): int32[B, S] each. Padding rows: lo = 0, hi = -1 (empty).
  """
  seg = jnp.asarray(segment_ids, jnp.int32)
  frame = jnp.asarray(frame_ids, jnp.int32)
  b, s = seg.shape
  idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  # A run starts where the value changes; lo is the running max of run starts (a cummax scan).
  seg_start = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  lo = jax.lax.cummax(jnp.where(seg_start, idx, 0), axis=1)
  hi = idx
  if frame_bidirectional:
    # A frame ends where the next token has another (segment, frame) pair; hi is the reverse
    # running min of run ends.
    run_end = jnp.concatenate(
      [(frame[:, 1:] != frame[:, :-1]) | (seg[:, 1:] != seg[:, :-1]), jnp.ones((b, 1), bool)],
      axis=1,
    )
    end = jax.lax.cummin(jnp.where(run_end, idx, s), axis=1, reverse=True)
    hi = jnp.where(frame >= 0, end, idx)
  pad = seg == 0
  return jnp.where(pad, 0, lo), jnp.where(pad, -1, hi)


class TokenMask(NamedTuple):
  """Per-token mask description, int32[B, S] each; a pytree, so it reorders and shards with data.

  lo, hi: the token's interval of allowed keys (as a query), in global key indices.
  index: the token's own global index (as a key). Equal to arange(S) in natural order; after a
    zig-zag reorder (`lcv.parallel.context`) it carries the original positions, so the mask stays
    exact in any token order.
  """

  lo: jax.Array
  hi: jax.Array
  index: jax.Array


def token_mask(segment_ids, frame_ids, frame_bidirectional: bool = True) -> TokenMask:
  """`TokenMask` of a layout in natural token order."""
  lo, hi = intervals(segment_ids, frame_ids, frame_bidirectional)
  return TokenMask(lo, hi, key_indices(*lo.shape))


def key_indices(batch: int, length: int, offset=0) -> jax.Array:
  """Global indices of a contiguous key chunk starting at `offset`: int32[B, S]."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))


def allowed(lo, hi, k_idx) -> jax.Array:
  """bool[B, T, S] from intervals and key global indices (tests and small reference paths)."""
  k = jnp.asarray(k_idx)[:, None, :]
  return (jnp.asarray(lo)[:, :, None] <= k) & (k <= jnp.asarray(hi)[:, :, None])


def _pad_to(x, multiple: int, value):
  pad = (-x.shape[1]) % multiple
  if pad == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, pad)), constant_values=value)


def tile_map(lo, hi, k_idx, block_q: int, block_k: int) -> jax.Array:
  """Classify (block_q x block_k) tiles of the mask as SKIP / PARTIAL / FULL.

  SKIP is returned only when no entry of the tile is allowed and FULL only when every entry is,
  so a kernel may skip SKIP tiles and drop mask arithmetic on FULL tiles. The test is per query row
  (no "first frame of the tile" shortcuts), so frames that straddle tile borders (257-token frames
  on 64- or 128-wide tiles) are classified correctly. Key indices need not be contiguous
  (zig-zag chunks): a tile whose keys are not one contiguous run is never FULL.

  Args:
    lo, hi: int32[B, T] intervals from `intervals` (global key coordinates).
    k_idx: int32[B, S] global index of every key. T and S are padded internally.
    block_q, block_k: tile sizes.

  Returns:
    int8[B, ceil(T / block_q), ceil(S / block_k)].
  """
  lo = _pad_to(jnp.asarray(lo, jnp.int32), block_q, 0)
  hi = _pad_to(jnp.asarray(hi, jnp.int32), block_q, -1)
  k_idx = _pad_to(jnp.asarray(k_idx, jnp.int32), block_k, NO_KEY)
  b, t = lo.shape
  s = k_idx.shape[1]
  lo = lo.reshape(b, t // block_q, 1, block_q)
  hi = hi.reshape(b, t // block_q, 1, block_q)
  keys = k_idx.reshape(b, 1, s // block_k, block_k)
  real = keys != NO_KEY
  kmin = jnp.min(jnp.where(real, keys, NO_KEY), axis=-1, keepdims=True)
  kmax = jnp.max(jnp.where(real, keys, -1), axis=-1, keepdims=True)
  n_real = jnp.sum(real, axis=-1, keepdims=True)
  contiguous = (kmax - kmin + 1 == n_real) & (n_real == block_k)
  # Per row: does [lo, hi] meet [kmin, kmax]? Conservative for non-contiguous keys (may say
  # PARTIAL where SKIP would do), exact for contiguous ones.
  row_meets = (lo <= kmax) & (hi >= kmin) & (lo <= hi)
  row_covers = (lo <= kmin) & (hi >= kmax)
  any_meet = jnp.any(row_meets, axis=-1)
  all_cover = jnp.all(row_covers, axis=-1) & contiguous[..., 0]
  out = jnp.where(any_meet, jnp.where(all_cover, FULL, PARTIAL), SKIP)
  return out.astype(jnp.int8)


def density(lo, hi, k_idx) -> jax.Array:
  """Fraction of allowed (query, key) pairs per batch row, float32[B]; for FLOP accounting."""
  k = jnp.sort(jnp.asarray(k_idx, jnp.int32), axis=-1)
  n_le = jax.vmap(lambda keys, x: jnp.searchsorted(keys, x, side="right"))
  count = jnp.maximum(n_le(k, jnp.asarray(hi)) - n_le(k, jnp.asarray(lo) - 1), 0)
  # Sum in float32: the pair count overflows int32 from S = 64K on.
  return jnp.sum(count.astype(jnp.float32), axis=-1) / float(lo.shape[1] * k.shape[1])
