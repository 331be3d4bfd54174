"""The mask in its three forms agrees: dense predicate, intervals, tile map, density.

Layouts are random packings (hypothesis) of samples made of text chunks, images and videos with
frame sizes that do not align with tiles (257-token frames on 64/128 tiles), plus end padding.
`pack` and `layouts` are shared with the attention tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcv import masks

# A chunk is ("text", n), ("image", n) or ("video", frames, n, separator tokens between frames).
_frame_tokens = st.one_of(st.sampled_from([1, 64, 144, 257]), st.integers(1, 40))
chunks = st.one_of(
  st.tuples(st.just("text"), st.integers(1, 40)),
  st.tuples(st.just("image"), _frame_tokens),
  st.tuples(st.just("video"), st.integers(1, 4), _frame_tokens, st.integers(0, 2)),
)
samples = st.lists(chunks, min_size=1, max_size=4)
rows = st.lists(samples, min_size=0, max_size=4)


def pack(batch_rows, length: int):
  """Pack samples into rows of `length` tokens (truncating the last one, padding the rest).

  Args:
    batch_rows: per batch row, a list of samples; a sample is a list of chunks (see `chunks`).
    length: tokens per row.

  Returns:
    (segment_ids, frame_ids): int32[B, length] numpy arrays following DESIGN section 2.
  """
  seg = np.zeros((len(batch_rows), length), np.int32)
  frame = np.full((len(batch_rows), length), -1, np.int32)
  for b, row in enumerate(batch_rows):
    pos = 0
    for sample_id, sample in enumerate(row, 1):
      runs = []  # (tokens, frame id) in order; frame ids count up within the sample.
      frame_id = 0
      for chunk in sample:
        if chunk[0] == "text":
          runs.append((chunk[1], -1))
        elif chunk[0] == "image":
          runs.append((chunk[1], frame_id))
          frame_id += 1
        else:
          _, n_frames, n, sep = chunk
          for f in range(n_frames):
            runs.append((n, frame_id))
            frame_id += 1
            if sep and f + 1 < n_frames:
              runs.append((sep, -1))
      for n, f in runs:
        seg[b, pos : pos + n] = sample_id
        frame[b, pos : pos + n] = f
        pos += n
  return seg, frame


@st.composite
def layouts(draw, lengths=(1, 97, 320, 600), batch: int = 2):
  """(segment_ids, frame_ids, frame_bidirectional) of a random packed batch.

  Lengths come from a short list so that the jnp ops compile once per shape, not per example.
  """
  batch = draw(st.lists(rows, min_size=batch, max_size=batch))
  length = draw(st.sampled_from(lengths))
  seg, frame = pack(batch, length)
  return seg, frame, draw(st.booleans())


# Jitted once per shape: eager dispatch of every small op dominated the run time.
_intervals = jax.jit(masks.intervals, static_argnums=2)
_dense = jax.jit(masks.dense, static_argnums=2)
_allowed = jax.jit(masks.allowed)
_tile_map = jax.jit(masks.tile_map, static_argnums=(3, 4))
_density = jax.jit(masks.density)


def zigzag(length: int, parts: int) -> np.ndarray:
  """Token order of a zig-zag split: 2 * parts chunks; rank r holds chunks r and 2*parts-1-r."""
  pieces = np.array_split(np.arange(length), 2 * parts)
  return np.concatenate([np.concatenate([pieces[r], pieces[-1 - r]]) for r in range(parts)])


def _reorder(lo, hi, order):
  """Queries and keys both permuted by `order`; the key side carries the original indices."""
  b = lo.shape[0]
  return (
    lo[:, order],
    hi[:, order],
    jnp.broadcast_to(jnp.asarray(order, jnp.int32), (b, len(order))),
  )


def _tiles(x, bq: int, bk: int, fill: bool):
  """Split a [B, T, S] boolean array into [B, nq, nk, bq * bk] tiles, padding with `fill`."""
  b, t, s = x.shape
  x = np.pad(x, ((0, 0), (0, -t % bq), (0, -s % bk)), constant_values=fill)
  x = x.reshape(b, x.shape[1] // bq, bq, x.shape[2] // bk, bk)
  return x.transpose(0, 1, 3, 2, 4).reshape(b, x.shape[1], x.shape[3], bq * bk)


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_intervals_equal_dense(layout):
  seg, frame, bidir = layout
  lo, hi = _intervals(seg, frame, bidir)
  assert lo.dtype == hi.dtype == jnp.int32
  dense = np.asarray(_dense(seg, frame, bidir))
  np.testing.assert_array_equal(np.asarray(_allowed(lo, hi, masks.key_indices(*seg.shape))), dense)
  pad = seg == 0
  assert (np.asarray(lo)[pad] == 0).all() and (np.asarray(hi)[pad] == -1).all()
  tm = masks.token_mask(seg, frame, bidir)
  np.testing.assert_array_equal(tm.index, np.broadcast_to(np.arange(seg.shape[1]), seg.shape))


@settings(max_examples=40, deadline=None)
@given(
  layouts(),
  st.sampled_from([(64, 64), (128, 128), (64, 128), (16, 48)]),
  st.sampled_from(["natural", "zigzag", "shuffled"]),
)
def test_tile_map_is_sound(layout, blocks, order_kind):
  seg, frame, bidir = layout
  bq, bk = blocks
  s = seg.shape[1]
  lo, hi = _intervals(seg, frame, bidir)
  order = {
    "natural": np.arange(s),
    "zigzag": zigzag(s, 2),
    "shuffled": np.random.default_rng(s).permutation(s),
  }[order_kind]
  lo, hi, k_idx = _reorder(lo, hi, order)
  tm = np.asarray(_tile_map(lo, hi, k_idx, bq, bk))
  allowed = np.asarray(_allowed(lo, hi, k_idx))
  assert tm.shape == (seg.shape[0], -(-s // bq), -(-s // bk))
  any_allowed = _tiles(allowed, bq, bk, False).any(-1)
  all_allowed = _tiles(allowed, bq, bk, False).all(-1)
  assert not (any_allowed & (tm == masks.SKIP)).any(), "a tile with an allowed entry was skipped"
  assert not (~all_allowed & (tm == masks.FULL)).any(), "a tile with a forbidden entry was FULL"
  if order_kind == "natural":
    # Contiguous keys: the map is exact on whole tiles (ragged edge tiles may stay PARTIAL).
    whole = np.zeros_like(tm, bool)
    whole[:, : s // bq, : s // bk] = True
    np.testing.assert_array_equal((tm != masks.SKIP)[whole], any_allowed[whole])
    np.testing.assert_array_equal((tm == masks.FULL)[whole], all_allowed[whole])


def test_tile_map_frame_straddling_tiles():
  # 10 text tokens, then one 257-token frame: its first row (10, in query tile 0) sees keys up to
  # 266, i.e. into key tile 4 (256..319) -- the tile a frame-start shortcut wrongly skips.
  seg, frame = pack([[[("text", 10), ("image", 257), ("text", 5)]]], 320)
  lo, hi = masks.intervals(seg, frame)
  tm = np.asarray(masks.tile_map(lo, hi, masks.key_indices(1, 320), 64, 64))[0]
  assert tm[0, 4] == masks.PARTIAL
  assert tm[0, 0] == masks.PARTIAL and tm[1, 0] == masks.FULL and tm[0, 1] == masks.PARTIAL
  assert (tm[4, :] != masks.SKIP).all()  # row 319 is padding but rows 256..271 see everything


@settings(max_examples=40, deadline=None)
@given(layouts(), st.booleans())
def test_density_equals_dense_mean(layout, shuffle):
  seg, frame, bidir = layout
  lo, hi = _intervals(seg, frame, bidir)
  if shuffle:
    lo, hi, k_idx = _reorder(lo, hi, np.random.default_rng(0).permutation(seg.shape[1]))
  else:
    k_idx = masks.key_indices(*seg.shape)
  want = np.asarray(_allowed(lo, hi, k_idx)).mean(axis=(1, 2))
  np.testing.assert_allclose(_density(lo, hi, k_idx), want, rtol=1e-6)


@pytest.mark.parametrize("bidir", [True, False])
def test_frame_block_causal_by_hand(bidir):
  # Sample 1: text, 2-token frame, text; sample 2: 3-token frame; 1 padding token.
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  frame = np.array([[-1, 0, 0, -1, 0, 0, 0, -1]])
  lo, hi = _intervals(seg, frame, bidir)
  np.testing.assert_array_equal(lo[0], [0, 0, 0, 0, 4, 4, 4, 0])
  want_hi = [0, 2, 2, 3, 6, 6, 6, -1] if bidir else [0, 1, 2, 3, 4, 5, 6, -1]
  np.testing.assert_array_equal(hi[0], want_hi)
