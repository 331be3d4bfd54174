"""Blockwise online-softmax attention equals its dense twin: outputs, lse, gradients, ring merge."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcv import masks
from lcv.kernels import blockwise
from tests.test_masks import pack

# Up to 300 tokens per row: packed samples, text, odd frame sizes, a 257-token frame, end padding.
_ROWS = [
  [[("text", 7), ("image", 33), ("text", 5)], [("video", 3, 19, 1), ("text", 4)], [("text", 60)]],
  [[("text", 3), ("image", 257), ("text", 9)], [("video", 2, 11, 1)]],
]


# Jitted once per shape and block size (eager calls would recompile the scans every time).
_static = ("scale", "block_q", "block_k")
_forward = jax.jit(blockwise.forward, static_argnames=_static)
_reference = jax.jit(blockwise.attention_reference, static_argnames="scale")
_intervals = jax.jit(masks.intervals, static_argnums=2)


def _layout(s: int, bidir: bool = True):
  seg, frame = pack(_ROWS, s)
  return _intervals(seg, frame, bidir)


def _normal(shape, seed, dtype=jnp.float32):
  # numpy draws: jax.random compiles per shape, which costs seconds on a busy CPU.
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32).astype(dtype)


def _qkv(b, t, s, n, k, h, dtype=jnp.float32, seed=0):
  q = _normal((b, t, n, h), 3 * seed, dtype)
  return q, _normal((b, s, k, h), 3 * seed + 1, dtype), _normal((b, s, k, h), 3 * seed + 2, dtype)


def _assert_lse(lse, want):
  lse, want = np.asarray(lse), np.asarray(want)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(lse[fin], want[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "t, s, n, k, h, bq, bk",
  [
    (300, 300, 4, 2, 16, 64, 64),  # GQA, ragged last tiles
    (37, 300, 4, 1, 32, 16, 48),  # T != S: a chunk of 37 queries (chunked prefill), MQA
    (1, 300, 2, 1, 8, 512, 512),  # decode: one query row; blocks clamped to the lengths
  ],
)
def test_forward_matches_reference(t, s, n, k, h, bq, bk):
  lo, hi = _layout(s)
  off = min(100, s - t)  # the query chunk at rows off..off+t-1 (chunked prefill / decode)
  lo, hi, k_idx = lo[:, off : off + t], hi[:, off : off + t], masks.key_indices(2, s)
  q, kk, v = _qkv(2, t, s, n, k, h)
  o, lse = _forward(q, kk, v, lo, hi, k_idx, block_q=bq, block_k=bk)
  want_o, want_lse = _reference(q, kk, v, lo, hi, k_idx)
  assert o.shape == q.shape and o.dtype == q.dtype
  assert lse.shape == (2, n, t) and lse.dtype == jnp.float32
  np.testing.assert_allclose(o, want_o, rtol=1e-5, atol=1e-5)
  _assert_lse(lse, want_lse)


def test_reference_equals_naive_softmax():
  # The dense twin itself against a textbook softmax with the dense predicate (GQA by repeat).
  s = 120
  seg, frame = pack(_ROWS, s)
  q, k, v = _qkv(2, s, s, 4, 2, 8)

  @jax.jit
  def both(q, k, v):
    lo, hi = masks.intervals(seg, frame)
    ours = blockwise.attention_reference(q, k, v, lo, hi, masks.key_indices(2, s))
    kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, kr) / np.sqrt(8)
    mask = masks.dense(seg, frame)[:, None]
    p = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1) * mask
    lse = jnp.where(mask.any(-1), jax.nn.logsumexp(scores, -1, where=mask), -jnp.inf)
    return ours, (jnp.einsum("BNTS,BSNH->BTNH", p, vr), lse)

  (o, lse), (want_o, want_lse) = both(q, k, v)
  np.testing.assert_allclose(o, want_o, rtol=1e-5, atol=1e-5)
  _assert_lse(lse, want_lse)


def test_padding_rows_are_zero_without_nan():
  s = 300
  lo, hi = _layout(s)
  pad = np.asarray(hi < lo)
  assert pad.any()
  q, k, v = _qkv(2, s, s, 2, 1, 8)

  k_idx = masks.key_indices(2, s)

  @jax.jit
  def value_and_grad(q, k, v):
    def loss(q, k, v):
      o, lse = blockwise.attention(q, k, v, lo, hi, k_idx, block_q=64, block_k=64)
      return jnp.sum(o**2), (o, lse)

    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  (dq, dk, dv), (o, lse) = value_and_grad(q, k, v)
  assert not np.isnan(np.asarray(o)).any()
  assert (np.asarray(o)[pad] == 0).all()
  assert np.isneginf(np.asarray(lse).transpose(0, 2, 1)[pad]).all()
  for g in (dq, dk, dv):
    assert np.isfinite(np.asarray(g)).all()
  assert (np.asarray(dq)[pad] == 0).all()


def test_gradients_match_reference():
  # A query chunk (T != S), GQA, ragged tiles; T = S gradients are covered by the ring test.
  t, s, bq, bk = 45, 150, 16, 32
  lo, hi = _layout(s)
  off = min(100, s - t)  # the query chunk at rows off..off+t-1 (chunked prefill / decode)
  lo, hi, k_idx = lo[:, off : off + t], hi[:, off : off + t], masks.key_indices(2, s)
  q, k, v = _qkv(2, t, s, 4, 2, 16, seed=1)
  w_o = _normal(q.shape, 70)
  w_lse = _normal((2, 4, t), 80)

  def loss(fn, q, k, v):
    o, lse = fn(q, k, v, lo, hi, k_idx)
    # Both outputs carry cotangents; lse's matters to callers that merge chunks themselves.
    return jnp.sum(o * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse)

  ours = functools.partial(blockwise.attention, block_q=bq, block_k=bk)
  got = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(functools.partial(loss, _reference), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_bf16_close_to_fp32():
  """bf16 inputs (fp32 accumulation): outputs, lse and gradients within 2e-2 of fp32 math."""
  s = 200
  lo, hi = _layout(s)
  k_idx = masks.key_indices(2, s)
  q, k, v = _qkv(2, s, s, 4, 2, 32, dtype=jnp.bfloat16, seed=2)
  w = _normal(q.shape, 20)

  def run(fn, q, k, v):
    def loss(q, k, v):
      o, lse = fn(q, k, v, lo, hi, k_idx)
      return jnp.sum(o.astype(jnp.float32) * w), (o, lse)

    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  ours = functools.partial(blockwise.attention, block_q=64, block_k=64)
  grads, (o, lse) = jax.jit(functools.partial(run, ours))(q, k, v)
  assert o.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want_grads, (want, want_lse) = jax.jit(functools.partial(run, _reference))(*f32)
  rel = lambda x, y: np.linalg.norm(np.asarray(x, np.float32) - y) / np.linalg.norm(y)
  assert rel(o, want) < 2e-2
  for g, want_g in zip(grads, want_grads):
    assert rel(g, want_g) < 2e-2
  fin = np.isfinite(np.asarray(want_lse))
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(want_lse)[fin], rtol=2e-2, atol=2e-2)


def test_ring_property_two_key_halves():
  """Forward on two key chunks merged by lse, and backward per chunk with the merged (o, lse),
  equal the single-call results: what one ring step needs. Keys in zig-zag order."""
  s = 160
  lo, hi = _layout(s)
  q, k, v = _qkv(2, s, s, 4, 2, 8, seed=3)
  order = np.concatenate([np.arange(0, 40), np.arange(120, 160), np.arange(40, 120)])
  k_idx = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (2, s))
  k, v = k[:, order], v[:, order]
  do = _normal(q.shape, 40)
  kw = dict(block_q=32, block_k=32)

  @jax.jit
  def chunked_and_full(q, k, v, do):
    halves = [slice(0, 80), slice(80, 160)]
    parts = [blockwise.forward(q, k[:, c], v[:, c], lo, hi, k_idx[:, c], **kw) for c in halves]
    lse = jnp.logaddexp(parts[0][1], parts[1][1])
    lse_safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    o = sum(jnp.einsum("BNT->BTN", jnp.exp(p[1] - lse_safe))[..., None] * p[0] for p in parts)
    grads = [
      blockwise.backward(q, k[:, c], v[:, c], o, lse, do, lo, hi, k_idx[:, c], **kw) for c in halves
    ]
    dq = grads[0][0] + grads[1][0]
    dk, dv = (jnp.concatenate([grads[0][i], grads[1][i]], axis=1) for i in (1, 2))
    full_o, full_lse = blockwise.forward(q, k, v, lo, hi, k_idx, **kw)
    full_grads = blockwise.backward(q, k, v, full_o, full_lse, do, lo, hi, k_idx, **kw)
    return (o, lse, dq, dk, dv), (full_o, full_lse, *full_grads)

  (o, lse, *grads), (full_o, full_lse, *full_grads) = chunked_and_full(q, k, v, do)
  np.testing.assert_allclose(o, full_o, rtol=1e-5, atol=1e-5)
  _assert_lse(lse, full_lse)
  for g, want in zip(grads, full_grads):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "q_shape, k_shape, match",
  [
    ((1, 8, 3, 8), (1, 8, 2, 8), "multiple of kv heads"),
    ((1, 8, 2, 8), (1, 8, 2, 16), "head dim"),
    ((2, 8, 2, 8), (1, 8, 2, 8), "batch"),
    ((1, 8, 2, 8), (1, 8, 2), r"\[B, S, K, H\]"),
  ],
)
def test_bad_shapes_raise(q_shape, k_shape, match):
  q, k = jnp.zeros(q_shape), jnp.zeros(k_shape)
  lo = jnp.zeros(q_shape[:2], jnp.int32)
  with pytest.raises(ValueError, match=match):
    blockwise.attention(q, k, k, lo, lo, jnp.zeros(k_shape[:2], jnp.int32))


def test_bad_mask_args_raise():
  q = jnp.zeros((1, 8, 2, 8))
  ok = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match=r"q_hi.shape=\(1, 7\)"):
    blockwise.forward(q, q, q, ok, ok[:, :7], ok)
  with pytest.raises(ValueError, match="integer"):
    blockwise.forward(q, q, q, ok, ok, ok.astype(jnp.float32))
  with pytest.raises(ValueError, match="lse.shape"):
    blockwise.backward(q, q, q, q, jnp.zeros((1, 8, 2)), q, ok, ok, ok)


def test_memory_is_linear_in_length():
  """fwd + bwd at S = 4096 needs far less scratch than one float32 [S, S] score matrix."""
  s = 4096
  q = jax.ShapeDtypeStruct((1, s, 2, 16), jnp.float32)
  k = jax.ShapeDtypeStruct((1, s, 1, 16), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, s), jnp.int32)

  def grads(q, k, v, lo, hi, k_idx):
    def loss(q, k, v):
      return blockwise.attention(q, k, v, lo, hi, k_idx, block_q=256, block_k=256)[0].sum()

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  compiled = jax.jit(grads).lower(q, k, k, ids, ids, ids).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < s * s * 4 / 8
