"""Zig-zag / striped token orders: the layout they produce, inverses, padding errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcv import masks
from lcv.parallel import context


def test_zigzag_rank_r_holds_chunks_r_and_2n_minus_1_minus_r():
  perm = context.zigzag_indices(16, 4)  # 8 chunks of 2 tokens
  shards = perm.reshape(4, 4)  # device r's shard
  for r in range(4):
    np.testing.assert_array_equal(shards[r], [2 * r, 2 * r + 1, 2 * (7 - r), 2 * (7 - r) + 1])


def test_striped_rank_r_holds_every_nth_token():
  shards = context.striped_indices(12, 3).reshape(3, 4)
  np.testing.assert_array_equal(shards[1], [1, 4, 7, 10])


@pytest.mark.parametrize("kind", ["zigzag", "striped", "none"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_reorder_then_inverse_is_identity_on_a_batch_pytree(kind, n):
  rng = np.random.default_rng(n)
  s = 64
  seg = np.repeat(np.arange(1, 5), 16)[None].repeat(2, 0).astype(np.int32)
  batch = {
    "tokens": rng.integers(0, 100, (2, s)).astype(np.int32),  # numpy stays numpy
    "mask": masks.token_mask(jnp.asarray(seg), jnp.full((2, s), -1)),  # a TokenMask pytree
    "mrope": jnp.asarray(rng.integers(0, 9, (3, 2, s))),  # [3, B, S] positions
  }
  moved = context.to_order(batch, n, kind)
  assert isinstance(moved["tokens"], np.ndarray)
  perm = context.order_indices(s, n, kind)
  np.testing.assert_array_equal(moved["mrope"], np.asarray(batch["mrope"])[..., perm])
  # The key index field carries the original positions after the reorder.
  np.testing.assert_array_equal(moved["mask"].index[0], perm)
  back = context.from_order(moved, n, kind)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(batch)):
    np.testing.assert_array_equal(a, b)


def test_reordered_mask_is_the_permuted_dense_mask():
  seg = jnp.asarray([[1] * 20 + [2] * 28 + [0] * 16])
  frame = jnp.asarray([[-1] * 5 + [0] * 9 + [-1] * 6 + [0] * 13 + [1] * 15 + [-1] * 16])
  perm = context.zigzag_indices(64, 4)
  m = context.reorder(masks.token_mask(seg, frame), perm)
  dense = masks.dense(seg, frame)[0]
  np.testing.assert_array_equal(masks.allowed(m.lo, m.hi, m.index)[0], dense[perm][:, perm])


def test_activations_reorder_along_axis_1():
  x = jnp.arange(2 * 8 * 3).reshape(2, 8, 3)
  y = context.to_order(x, 2, "zigzag", axis=1)
  np.testing.assert_array_equal(y[:, :, 0], x[:, context.zigzag_indices(8, 2), 0])
  np.testing.assert_array_equal(context.from_order(y, 2, "zigzag", axis=1), x)


def test_bad_length_names_the_padding():
  with pytest.raises(ValueError, match=r"multiple of 16 .* pad by 6 tokens to 112"):
    context.zigzag_indices(106, 8)
  with pytest.raises(ValueError, match=r"pad by 2 tokens to 108"):
    context.striped_indices(106, 4)
  with pytest.raises(ValueError, match=r"sequence of length 8"):
    context.reorder({"a": np.zeros((2, 8)), "b": np.zeros((2, 5))}, np.arange(8))
  with pytest.raises(ValueError, match=r"kind="):
    context.required_multiple(2, "spiral")


def test_pad_to_multiple_uses_layout_pad_values():
  batch = {"segment_ids": np.ones((1, 10), np.int32), "frame_ids": np.zeros((1, 10), np.int32)}
  padded, added = context.pad_to_multiple(
    batch, context.required_multiple(4, "zigzag"), value={"segment_ids": 0, "frame_ids": -1}
  )
  assert added == 6
  np.testing.assert_array_equal(padded["segment_ids"][0], [1] * 10 + [0] * 6)
  np.testing.assert_array_equal(padded["frame_ids"][0], [0] * 10 + [-1] * 6)
  same, none_added = context.pad_to_multiple(padded, 8)
  assert none_added == 0 and same is padded
  scalar, _ = context.pad_to_multiple(jnp.ones((2, 3)), 4)
  np.testing.assert_array_equal(scalar[:, 3], [0, 0])
