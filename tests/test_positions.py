"""Exact positions: 1-D, V2PE, TAD and M-RoPE against hand-written and loop references."""

import fractions
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcv import positions as P
from lcv.config import RopeConfig
from lcv.layout import Image, Text, Video, pack

ROWS, SEQ, MAX_ITEMS = 4, 64, 4

chunks = st.one_of(
  st.builds(Text, st.integers(1, 4)),
  st.builds(Image, st.integers(1, 4)),
  st.builds(Video, st.integers(1, 3), st.integers(1, 3), st.integers(0, 2)),
)
layouts = st.lists(st.lists(chunks, min_size=1, max_size=MAX_ITEMS), min_size=1, max_size=ROWS).map(
  lambda samples: pack(samples, SEQ, num_rows=ROWS)
)
strides = st.lists(st.integers(0, 8), min_size=ROWS * MAX_ITEMS, max_size=ROWS * MAX_ITEMS).map(
  lambda k: 2.0 ** -np.array(k, np.float64).reshape(ROWS, MAX_ITEMS)
)


def v2pe_loop(modality, segment_ids, item_ids, deltas):
  """The V2PE rule token by token, in exact rationals (OpenGVLab V2PE `get_rope_pos_id`)."""
  out = np.zeros(modality.shape)
  for r in range(modality.shape[0]):
    prev_seg, run, last = 0, None, None
    for t in range(modality.shape[1]):
      seg = segment_ids[r, t]
      if seg == 0:
        prev_seg, run = 0, None
        continue
      if seg != prev_seg:
        last, run = fractions.Fraction(-1), None
      if modality[r, t] == 1:
        if run is not None and run != item_ids[r, t]:
          last = math.ceil(last)
        run = item_ids[r, t]
        last = last + fractions.Fraction(deltas[r, item_ids[r, t]])
      else:
        last, run = math.ceil(last) + 1, None
      out[r, t] = float(last)
      prev_seg = seg
  return out


def layout_args(layout):
  return layout.modality, layout.segment_ids, layout.item_ids


@settings(max_examples=25, deadline=None)
@given(layouts)
def test_v2pe_unit_stride_is_one_d(layout):
  got = P.to_float64(P.v2pe(*layout_args(layout), 1.0))
  np.testing.assert_array_equal(got, P.to_float64(P.one_d(layout.segment_ids)))


@settings(max_examples=25, deadline=None)
@given(layouts, strides)
def test_v2pe_matches_token_loop(layout, deltas):
  got = P.to_float64(P.v2pe(*layout_args(layout), deltas))
  np.testing.assert_array_equal(got, v2pe_loop(*layout_args(layout), deltas))


def test_v2pe_hand_made():
  # Row 0: text, image (3 tokens, delta 1/2), an adjacent image (2 tokens, delta 1/4), text; then a
  # second sample that restarts from last = -1 with an image (3 tokens, its item 0: delta 1/2), so
  # its visual tokens start below 0; padding.
  t, v = 0, 1
  modality = np.array([[t, t, v, v, v, v, v, t, v, v, v, t, t]])
  segment_ids = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0]])
  item_ids = np.array([[-1, -1, 0, 0, 0, 1, 1, -1, 0, 0, 0, -1, -1]])
  deltas = np.array([[0.5, 0.25]])
  expected = [[0, 1, 1.5, 2, 2.5, 3.25, 3.5, 5, -0.5, 0, 0.5, 2, 0]]
  got = P.to_float64(P.v2pe(modality, segment_ids, item_ids, deltas))
  np.testing.assert_array_equal(got, expected)
  # One scalar stride: ceil after each item, also between the adjacent items.
  expected = [[0, 1, 1.125, 1.25, 1.375, 2.125, 2.25, 4, -0.875, -0.75, -0.625, 1, 0]]
  got = P.to_float64(P.v2pe(modality, segment_ids, item_ids, 1 / 8))
  np.testing.assert_array_equal(got, expected)


def test_v2pe_exact_at_a_million_tokens():
  s = 2**20
  modality = np.ones((1, s), np.int32)
  modality[0, :8] = 0
  item_ids = np.where(modality == 1, 0, -1)
  got = P.v2pe(modality, np.ones((1, s), np.int32), item_ids, 1 / 256)
  ticks = np.asarray(got.ticks[0])
  np.testing.assert_array_equal(ticks[:8], np.arange(8) * P.TICKS)
  np.testing.assert_array_equal(np.diff(ticks[8:]), 1)  # every 1/256 step survives
  assert ticks[-1] == 7 * P.TICKS + (s - 8)


def test_v2pe_rejects_inexact_delta():
  args = (np.array([[0, 1]]), np.array([[1, 1]]), np.array([[-1, 0]]))
  for bad in (0.3, 2.0, 1 / 512, 0.0):
    with pytest.raises(ValueError, match="1/2\\^k"):
      P.v2pe(*args, bad)
  with pytest.raises(ValueError, match="one delta per item"):
    P.v2pe(*args, np.zeros((1, 0)))


def test_v2pe_jit_with_sampled_deltas():
  layout = pack([[Text(2), Image(3), Video(2, 2, 1)], [Image(5), Text(1)]], 16, num_rows=2)
  deltas = P.sample_v2pe_deltas(jax.random.key(0), (2, layout.num_items))
  got = jax.jit(P.v2pe)(*layout_args(layout), deltas)
  expected = v2pe_loop(*layout_args(layout), np.asarray(deltas, np.float64))
  np.testing.assert_array_equal(P.to_float64(got), expected)


def test_sampled_deltas_cover_the_set():
  d = np.asarray(P.sample_v2pe_deltas(jax.random.key(1), (64, 32)))
  assert d.dtype == np.float32
  np.testing.assert_array_equal(np.unique(d), 2.0 ** -np.arange(8, -1, -1))


def test_one_d_restarts_and_pads():
  got = P.to_float64(P.one_d(np.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])))
  np.testing.assert_array_equal(got, [[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]])


def test_tad_hand_made():
  # Text, 2 frames of 2 tokens, text, an image (frame 2), text | new sample: frame 0, text.
  modality = np.array([[0, 1, 1, 1, 1, 0, 1, 0, 1, 0]])
  segment_ids = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 2, 2]])
  frame_ids = np.array([[-1, 0, 0, 1, 1, -1, 2, -1, 0, -1]])
  expected_tau = np.array([[0, 0, 0, 1, 1, 2, 2, 3, 0, 1]])
  p = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]])
  got = P.to_float64(P.tad(modality, segment_ids, frame_ids))
  np.testing.assert_array_equal(got, p + expected_tau)
  got = P.to_float64(P.tad(modality, segment_ids, frame_ids, gamma=0.5))
  np.testing.assert_array_equal(got, p + 0.5 * expected_tau)
  item_ids = np.where(frame_ids >= 0, frame_ids, -1)
  base = P.v2pe(modality, segment_ids, item_ids, 0.5)
  got = P.to_float64(P.tad(modality, segment_ids, frame_ids, base=base))
  np.testing.assert_array_equal(got, P.to_float64(base) + expected_tau)
  with pytest.raises(ValueError, match="gamma"):
    P.tad(modality, segment_ids, frame_ids, gamma=0.001)


def hf_rope_index(mm_types, grids, mask):
  """transformers' Qwen2-VL `get_rope_index`, called on a stand-in for the model."""
  torch = pytest.importorskip("torch")
  qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
  model = types.SimpleNamespace(
    config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=1))
  )
  model.get_vision_position_ids = functools.partial(
    qwen2_vl.Qwen2VLModel.get_vision_position_ids, model
  )
  ids, _ = qwen2_vl.Qwen2VLModel.get_rope_index(
    model,
    torch.zeros(mm_types.shape, dtype=torch.long),
    torch.tensor(mm_types),
    image_grid_thw=torch.tensor([g for kind, g in grids if kind == 1]),
    video_grid_thw=torch.tensor([g for kind, g in grids if kind == 2]),
    attention_mask=torch.tensor(mask),
  )
  return ids.numpy()


def mrope_loop(layout):
  """Qwen2-VL's rule run by run: text +1; a visual run at st gets st + (t, h, w); then max + 1."""
  seg, item = layout.segment_ids, layout.item_ids
  b, s = layout.shape
  out = np.zeros((3, b, s))
  for r in range(b):
    t, st_ = 0, 0
    while t < s:
      if seg[r, t] == 0:
        t += 1
        continue
      if t == 0 or seg[r, t] != seg[r, t - 1]:
        st_ = 0
      if layout.modality[r, t] == 0:
        out[:, r, t] = st_
        st_, t = st_ + 1, t + 1
        continue
      end = t
      while end < s and seg[r, end] == seg[r, t] and item[r, end] == item[r, t]:
        end += 1
      frames = layout.frame_ids[r, t:end] - layout.frame_ids[r, t]
      within = np.concatenate([np.arange(n) for n in np.unique(frames, return_counts=True)[1]])
      cols = layout.grid_hw[1, r, t]
      run = np.stack([frames, within // cols, within % cols]) + st_
      out[:, r, t:end] = run
      st_, t = run.max() + 1, end
  return out


def test_mrope_matches_transformers():
  layout = pack(
    [[Text(3), Image(6, grid=(2, 3)), Text(2), Video(2, 4, grid=(2, 2)), Text(1)], [Text(2)]],
    seq_len=21,
  )
  got = P.to_float64(
    P.mrope(layout.modality, layout.segment_ids, layout.frame_ids, layout.item_ids, layout.grid_hw)
  )
  np.testing.assert_array_equal(got, mrope_loop(layout))
  mm_types = np.where(layout.modality == 1, np.where(layout.chunk_ids == 3, 2, 1), 0)
  mask = (layout.segment_ids[:1] > 0).astype(np.int64)
  hf = hf_rope_index(mm_types[:1], [(1, [1, 2, 3]), (2, [2, 2, 2])], mask)
  np.testing.assert_array_equal(got[:, :1] * mask, hf * mask)


def test_mrope_long_video_and_restart():
  # A video with more frames than grid rows/cols: text resumes at max(t) + 1.
  layout = pack([[Text(1), Video(5, 2, grid=(1, 2)), Text(2)], [Image(4), Text(1)]], seq_len=32)
  got = P.to_float64(
    P.mrope(layout.modality, layout.segment_ids, layout.frame_ids, layout.item_ids, layout.grid_hw)
  )
  np.testing.assert_array_equal(got, mrope_loop(layout))
  np.testing.assert_array_equal(got[:, 0, 11:13], [[6, 7]] * 3)
  # The second sample shares the row and restarts: an image of 1 x 4 tokens, then text.
  np.testing.assert_array_equal(
    got[:, 0, 13:18], [[0, 0, 0, 0, 4], [0, 0, 0, 0, 4], [0, 1, 2, 3, 4]]
  )
  with pytest.raises(ValueError, match="grid"):
    P.mrope(layout.modality, layout.segment_ids, layout.frame_ids, layout.item_ids, (2, 2))


def test_positions_pytree_and_range():
  pos = P.one_d(np.ones((2, 8), np.int32))
  doubled = jax.jit(lambda p: jax.tree.map(lambda t: 2 * t, p))(pos)
  assert isinstance(doubled, P.Positions)
  np.testing.assert_array_equal(P.to_float64(doubled), 2 * P.to_float64(pos))
  np.testing.assert_array_equal(P.to_float64(P.as_positions(jnp.array([[1.5, 3.0]]))), [[1.5, 3]])
  np.testing.assert_array_equal(P.as_positions(np.array([[2]])).ticks, [[2 * P.TICKS]])
  far = np.array([[2.0**22 + 1 / 256, -(2.0**21) - 0.5]])  # host floats convert in float64
  np.testing.assert_array_equal(P.to_float64(P.as_positions(far)), far)
  with pytest.raises(ValueError, match="fixed-point range"):
    P.as_positions(np.array([[2.0**23]]))
  too_long = jax.ShapeDtypeStruct((1, 2**23 + 2), jnp.int32)
  with pytest.raises(ValueError, match="fixed-point range"):
    jax.eval_shape(P.one_d, too_long)
  with pytest.raises(ValueError, match="fixed-point range"):
    jax.eval_shape(lambda s: P.tad(s, s, s), jax.ShapeDtypeStruct((1, 2**22 + 2), jnp.int32))


def test_builders_jit_and_from_config():
  layout = pack([[Text(2), Video(3, 2, 1, grid=(1, 2)), Image(4, grid=(2, 2))], [Text(3)]], 16)
  args = (layout.modality, layout.segment_ids, layout.frame_ids, layout.item_ids)
  eager = P.mrope(*args, layout.grid_hw)
  np.testing.assert_array_equal(jax.jit(P.mrope)(*args, layout.grid_hw).ticks, eager.ticks)
  tad = functools.partial(P.tad, gamma=0.25)
  np.testing.assert_array_equal(jax.jit(tad)(*args[:3]).ticks, tad(*args[:3]).ticks)

  cfg = RopeConfig(positions="mrope", mrope_sections=(2, 1, 1))
  np.testing.assert_array_equal(
    P.from_config(cfg, *args, grid_hw=layout.grid_hw).ticks, eager.ticks
  )
  cfg = RopeConfig(positions="v2pe", v2pe_delta=0.5)
  np.testing.assert_array_equal(
    P.from_config(cfg, *args).ticks, P.v2pe(*layout_args(layout), 0.5).ticks
  )
  cfg = RopeConfig(positions="v2pe", v2pe_random=True)
  sampled = jax.jit(functools.partial(P.from_config, cfg))(*args, key=jax.random.key(3))
  frac = P.to_float64(sampled) % 1
  assert (frac[layout.modality == 0] == 0).all() and (frac[layout.modality == 1] > 0).any()
  with pytest.raises(ValueError, match="PRNG key"):
    P.from_config(cfg, *args)
  np.testing.assert_array_equal(
    P.from_config(RopeConfig(), *args).ticks, P.one_d(layout.segment_ids).ticks
  )
