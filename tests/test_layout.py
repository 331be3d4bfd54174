"""Token layout: packing, per-token arrays, bookkeeping and errors."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcv import masks
from lcv.layout import Image, Text, Video, check_contiguous, first_fit, pack, sample_length

chunks = st.one_of(
  st.builds(Text, st.integers(1, 5)),
  st.builds(Image, st.integers(1, 5)),
  st.builds(Video, st.integers(1, 3), st.integers(1, 4), st.integers(0, 2)),
)
sample_lists = st.lists(st.lists(chunks, min_size=1, max_size=4), min_size=1, max_size=6)


def test_hand_made_row():
  layout = pack([[Text(3), Image(4), Text(2)], [Video(2, 3, separator=1)]], seq_len=18)
  assert layout.shape == (1, 18)
  np.testing.assert_array_equal(
    layout.segment_ids[0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0, 0]
  )
  np.testing.assert_array_equal(
    layout.modality[0], [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0]
  )
  np.testing.assert_array_equal(
    layout.frame_ids[0], [-1, -1, -1, 0, 0, 0, 0, -1, -1, 0, 0, 0, -1, 1, 1, 1, -1, -1]
  )
  np.testing.assert_array_equal(
    layout.item_ids[0], [-1, -1, -1, 0, 0, 0, 0, -1, -1, 0, 0, 0, -1, 0, 0, 0, -1, -1]
  )
  np.testing.assert_array_equal(
    layout.chunk_ids[0], [0, 0, 0, 1, 1, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, -1, -1]
  )
  np.testing.assert_array_equal(
    layout.offsets[0], [0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 3, 4, 5, -1, -1]
  )
  assert layout.num_items == 1
  np.testing.assert_array_equal(layout.num_tokens, [16])
  assert all(a.dtype == np.int32 for a in dataclasses.asdict(layout).values())


def test_frames_count_across_items():
  layout = pack([[Image(2), Text(1), Video(3, 1), Image(1)]], seq_len=8)
  np.testing.assert_array_equal(layout.frame_ids[0], [0, 0, -1, 1, 2, 3, 4, -1])
  np.testing.assert_array_equal(layout.item_ids[0], [0, 0, -1, 1, 1, 1, 2, -1])
  np.testing.assert_array_equal(layout.grid_hw[:, 0, :2], [[1, 1], [2, 2]])
  assert layout.num_items == 3


def test_first_fit_is_greedy_in_order():
  assert first_fit([6, 5, 3, 4, 1], 8) == [[0, 4], [1, 2], [3]]
  assert first_fit([2, 2, 2, 2], 8) == [[0, 1, 2, 3]]
  layout = pack([[Text(6)], [Text(5)], [Text(3)], [Text(4)], [Text(1)]], seq_len=8, num_rows=4)
  assert layout.shape == (4, 8)
  np.testing.assert_array_equal(layout.sample_ids[:, 0], [0, 1, 3, -1])
  np.testing.assert_array_equal(layout.segment_ids[0], [1] * 6 + [2, 0])


@settings(max_examples=30, deadline=None)
@given(sample_lists)
def test_pack_invariants(samples):
  # Rows of 40 tokens (several samples share a row), longer where one sample needs it.
  seq_len = max(40, *map(sample_length, samples))
  layout = pack(samples, seq_len)
  check_contiguous(layout)
  for i, sample in enumerate(samples):
    rows, cols = np.nonzero(layout.sample_ids == i)
    assert len(set(rows)) == 1 and np.array_equal(cols, np.arange(cols[0], cols[-1] + 1))
    assert len(cols) == sample_length(sample)
    r, sl = rows[0], slice(cols[0], cols[-1] + 1)
    # Every chunk's tokens are in order and its offsets enumerate its content.
    for c, chunk in enumerate(sample):
      mine = layout.chunk_ids[r, sl] == c
      offsets = layout.offsets[r, sl][mine]
      visual = layout.modality[r, sl][mine] == 1
      if isinstance(chunk, Text):
        np.testing.assert_array_equal(offsets, np.arange(chunk.n))
        assert not visual.any()
      else:
        n = chunk.n if isinstance(chunk, Image) else chunk.frames * chunk.tokens_per_frame
        np.testing.assert_array_equal(offsets[visual], np.arange(n))
        np.testing.assert_array_equal(np.unique(offsets[~visual]), np.arange((~visual).sum()))
    frames = layout.frame_ids[r, sl]
    n_frames = sum(
      c.frames if isinstance(c, Video) else 1 for c in sample if not isinstance(c, Text)
    )
    np.testing.assert_array_equal(np.unique(frames[frames >= 0]), np.arange(n_frames))
  # Segments are numbered 1..n in row order.
  for row in layout.segment_ids:
    starts = row[np.r_[True, row[1:] != row[:-1]] & (row > 0)]
    np.testing.assert_array_equal(starts, np.arange(1, len(starts) + 1))
  # The interval mask is exact on these layouts.
  lo, hi = masks.intervals(layout.segment_ids, layout.frame_ids)
  np.testing.assert_array_equal(
    masks.allowed(lo, hi, masks.key_indices(*layout.shape)),
    masks.dense(layout.segment_ids, layout.frame_ids),
  )


@pytest.mark.parametrize(
  "samples,match",
  [
    ([[Text(9)]], "9 tokens > seq_len=8"),
    ([[Text(0)]], "empty"),
    ([[Image(-1)]], "empty"),
    ([[]], "at least one chunk"),
    ([[Video(0, 4)]], "frames >= 1"),
    ([[Video(2, 0)]], "tokens_per_frame >= 1"),
    ([[Video(2, 2, separator=-1)]], "separator"),
    ([[Image(4, grid=(3, 2))]], "grid"),
    ([[Text(5)], [Text(5)]], "does not fit in num_rows=1"),
  ],
)
def test_pack_errors(samples, match):
  with pytest.raises(ValueError, match=match):
    pack(samples, seq_len=8, num_rows=1)


def test_unknown_chunk():
  with pytest.raises(TypeError, match="Unknown chunk"):
    pack([["text"]], seq_len=8)


def test_check_contiguous_catches_broken_layouts():
  good = pack([[Text(2), Video(2, 2)], [Image(2)]], seq_len=10)
  check_contiguous(good)

  def broken(**arrays):
    return dataclasses.replace(good, **{k: np.asarray([v], np.int32) for k, v in arrays.items()})

  frame_split = broken(frame_ids=[-1, -1, 0, 1, 0, 1, 0, 0, -1, -1])
  with pytest.raises(ValueError, match="Frames are not contiguous"):
    check_contiguous(frame_split)
  seg_split = broken(segment_ids=[1, 1, 1, 1, 1, 1, 2, 2, 1, 0])
  with pytest.raises(ValueError, match="Segments are not contiguous"):
    check_contiguous(seg_split)
  disagree = broken(item_ids=[-1, -1, 0, 0, 0, 0, 0, -1, -1, -1])
  with pytest.raises(ValueError, match="disagrees"):
    check_contiguous(disagree)
