"""The Pallas TPU kernel equals its dense twin and the blockwise jnp path: outputs, lse, gradients.

On CPU the kernels run in Pallas' TPU interpret mode with 128-wide tiles, so 257-token frames,
packed samples and ragged ends straddle tile borders and every tile kind (skip, partial, full)
occurs. The `tpu`-marked test runs the compiled kernels on a real TPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from lcv import attention, masks
from lcv.kernels import blockwise, flash_tpu
from tests.test_masks import pack

# Jitted once per shape: eager calls compile every small op, which costs seconds on a busy CPU.
_schedule = jax.jit(flash_tpu._schedule, static_argnums=(3, 4, 5))
_tile_map = jax.jit(masks.tile_map, static_argnums=(3, 4))
_intervals = jax.jit(masks.intervals, static_argnums=2)
_SMALL = flash_tpu.BlockSizes(128, 128, 128, 128, 128, 128)
_MIXED = flash_tpu.BlockSizes(256, 128, 128, 256, 256, 128)


def _random_rows(rng, batch: int, length: int):
  """Random packed rows: text runs, 257-token images, short videos, then padding."""
  rows = []
  for _ in range(batch):
    row, used = [], 0
    while used < length - 40:
      sample = [("text", int(rng.integers(1, 30)))]
      kind = rng.integers(3)
      if kind == 0:
        sample.append(("image", 257))
      elif kind == 1:
        sample.append(("video", int(rng.integers(2, 4)), int(rng.integers(5, 40)), 1))
      sample.append(("text", int(rng.integers(1, 20))))
      row.append(sample)
      used += sum(c[1] if c[0] != "video" else c[1] * (c[2] + 1) for c in sample)
    rows.append(row)
  seg, frame = pack(rows, length)
  pad = rng.integers(1, 20, size=batch)  # trailing padding in every row
  tail = np.arange(length)[None, :] >= length - pad[:, None]
  return np.where(tail, 0, seg), np.where(tail, -1, frame)


def _normal(rng, shape, dtype):
  return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)


def _inputs(seed, b, t, s, n, kh, h, dtype):
  rng = np.random.default_rng(seed)
  q = _normal(rng, (b, t, n, h), dtype)
  k, v = _normal(rng, (b, s, kh, h), dtype), _normal(rng, (b, s, kh, h), dtype)
  do = _normal(rng, (b, t, n, h), dtype)
  dlse = _normal(rng, (b, n, t), jnp.float32)
  return rng, q, k, v, do, dlse


def _vjp(fn, q, k, v, do, dlse):
  """(o, lse) and the gradients of <o, do> + <lse, dlse> (finite lse only) w.r.t. q, k, v."""
  (o, lse), pull = jax.vjp(fn, q, k, v)
  return o, lse, pull((do, jnp.where(jnp.isfinite(lse), dlse, 0.0)))


@functools.partial(jax.jit, static_argnames="blocks")
def _flash_vjp(q, k, v, do, dlse, lo, hi, kid, blocks):
  attend = functools.partial(flash_tpu.attention, q_lo=lo, q_hi=hi, k_idx=kid, block_sizes=blocks)
  return _vjp(attend, q, k, v, do, dlse)


@jax.jit
def _reference_vjp(q, k, v, do, dlse, lo, hi, kid):
  attend = functools.partial(flash_tpu.flash_tpu_reference, q_lo=lo, q_hi=hi, k_idx=kid)
  return _vjp(attend, q, k, v, do, dlse)


def _close(got, want, tol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.isfinite(got).all()
  err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
  assert err <= tol, f"relative error {err:.2e} > {tol}"


def _close_lse(lse, want, tol):
  lse, want = np.asarray(lse), np.asarray(want)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want))
  assert not np.isnan(lse).any()
  fin = np.isfinite(want)
  np.testing.assert_allclose(lse[fin], want[fin], rtol=tol, atol=tol)


CASES = [
  # b, t, n, kh, h, dtype, blocks, tol
  pytest.param(2, 300, 4, 2, 64, jnp.float32, _SMALL, 1e-4, id="gqa-fp32-h64"),
  pytest.param(1, 384, 2, 1, 128, jnp.bfloat16, _MIXED, 2e-2, id="mqa-bf16-h128-mixed-tiles"),
]


@pytest.mark.parametrize("b, t, n, kh, h, dtype, blocks, tol", CASES)
def test_random_layouts_match_reference(b, t, n, kh, h, dtype, blocks, tol):
  rng, q, k, v, do, dlse = _inputs(b * t, b, t, t, n, kh, h, dtype)
  seg, frame = _random_rows(rng, b, t)
  assert (seg == 0).any()  # padding rows: no allowed key
  lo, hi = _intervals(seg, frame, True)
  kid = masks.key_indices(b, t)
  o, lse, grads = _flash_vjp(q, k, v, do, dlse, lo, hi, kid, blocks)
  want_o, want_lse, want_grads = _reference_vjp(q, k, v, do, dlse, lo, hi, kid)
  _close(o, want_o, tol)
  _close_lse(lse, want_lse, tol)
  for g, w in zip(grads, want_grads, strict=True):
    _close(g, w, tol)
  pad = np.asarray(seg == 0)
  assert (np.asarray(o)[pad] == 0).all() and np.isneginf(
    np.asarray(lse).transpose(0, 2, 1)[pad]
  ).all()
  assert (np.asarray(grads[0])[pad] == 0).all()


def test_zigzag_chunks_forward_backward_match_reference():
  """A ring step: a query chunk against a zig-zag key chunk (two non-adjacent runs), T != S."""
  b, s_full, n, kh, h = 1, 512, 2, 2, 64
  rng, q_all, k_all, v_all, do_all, _ = _inputs(7, b, s_full, s_full, n, kh, h, jnp.float32)
  seg, frame = _random_rows(rng, b, s_full)
  lo, hi = _intervals(seg, frame, True)
  q_rows = np.r_[64:128, 384:448]  # zig-zag pair of query chunks
  k_rows = np.r_[0:64, 448:512, 128:192]  # keys in a scrambled order: tiles are never full
  q, do = q_all[:, q_rows], do_all[:, q_rows]
  k, v = k_all[:, k_rows], v_all[:, k_rows]
  args = (lo[:, q_rows], hi[:, q_rows], jnp.asarray(k_rows, jnp.int32)[None])
  # The TPU simulator of interpret mode: raises on out-of-bounds block reads, NaN-fills memory
  # that is read before being written.
  kw = dict(block_sizes=_SMALL, interpret=pltpu.InterpretParams())
  o, lse = flash_tpu.forward(q, k, v, *args, **kw)
  # `backward` of the exact (o, lse) is the dense twin's gradient with no lse cotangent.
  want_o, want_lse, want_grads = _reference_vjp(q, k, v, do, jnp.zeros_like(lse), *args)
  _close(o, want_o, 1e-4)
  _close_lse(lse, want_lse, 1e-4)
  grads = flash_tpu.backward(q, k, v, o, lse, do, *args, **kw)
  for g, w in zip(grads, want_grads, strict=True):
    _close(g, w, 1e-4)


def test_rows_without_any_key_give_zeros_not_nan():
  """A chunk pair the mask forbids entirely: every tile is skipped, o = 0, lse = -inf, no NaN."""
  b, t, n, kh, h = 2, 300, 4, 2, 64  # the shapes of the gqa-fp32 case: its compilation is reused
  _, q, k, v, do, dlse = _inputs(3, b, t, t, n, kh, h, jnp.float32)
  lo = jnp.full((b, t), 1000, jnp.int32)  # queries of a later chunk see keys 1000.., absent here
  hi = lo + jnp.arange(t, dtype=jnp.int32)
  args = (lo, hi, masks.key_indices(b, t))
  o, lse, grads = _flash_vjp(q, k, v, do, dlse, *args, _SMALL)
  assert (np.asarray(o) == 0).all() and np.isneginf(np.asarray(lse)).all()
  for g in grads:
    assert (np.asarray(g) == 0).all()


@functools.partial(jax.jit, static_argnames=("impl", "block_sizes"))
def _attend_vjp(q, k, v, do, dlse, seg, frame, impl, **kw):
  def attend(q, k, v):
    kw_all = dict(segment_ids=seg, frame_ids=frame, impl=impl, return_lse=True, **kw)
    return attention.attend(q, k, v, **kw_all)

  return _vjp(attend, q, k, v, do, dlse)


def test_attend_pallas_tpu_matches_xla_with_gradients():
  """attend(impl="pallas_tpu") runs interpret mode off TPU and equals the blockwise xla path."""
  b, t, n, kh, h = 1, 200, 4, 2, 64
  rng, q, k, v, do, dlse = _inputs(11, b, t, t, n, kh, h, jnp.float32)
  seg, frame = _random_rows(rng, b, t)
  o, lse, grads = _attend_vjp(q, k, v, do, dlse, seg, frame, "pallas_tpu", block_sizes=_SMALL)
  want_o, want_lse, want_grads = _attend_vjp(q, k, v, do, dlse, seg, frame, "xla")
  _close(o, want_o, 1e-4)
  _close_lse(lse, want_lse, 1e-4)
  for g, w in zip(grads, want_grads, strict=True):
    _close(g, w, 1e-4)


def test_schedule_lists_exactly_the_live_tiles():
  rng = np.random.default_rng(5)
  seg, frame = _random_rows(rng, 1, 768)
  lo, hi = _intervals(seg, frame, True)
  kid = masks.key_indices(1, 768)
  kinds = np.asarray(_tile_map(lo, hi, kid, 128, 128))
  assert {masks.SKIP, masks.PARTIAL, masks.FULL} <= set(np.unique(kinds))
  for by_key in (False, True):
    count, code = _schedule(lo, hi, kid, 128, 128, by_key)
    want = kinds.transpose(0, 2, 1) if by_key else kinds
    count = np.asarray(count).reshape(want.shape[:2])
    code = np.asarray(code).reshape(want.shape)
    for b, r in np.ndindex(*want.shape[:2]):
      live = np.flatnonzero(want[b, r] != masks.SKIP)
      assert count[b, r] == len(live)
      np.testing.assert_array_equal(code[b, r, : len(live)] >> 1, live)
      np.testing.assert_array_equal(code[b, r, : len(live)] & 1, want[b, r, live] == masks.FULL)
      # Slots past the list repeat its last tile: the same block index, so no DMA is issued.
      assert (code[b, r, len(live) :] >> 1 == (live[-1] if len(live) else 0)).all()


def test_kernels_lower_to_mosaic_tpu():
  """The three kernels lower to Mosaic TPU MLIR (checked on any host; compiling needs a TPU)."""
  q = jax.ShapeDtypeStruct((1, 640, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 640, 2, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 640), jnp.int32)

  def loss(q, k, v, lo, hi, kid):
    o, lse = flash_tpu.attention(q, k, v, lo, hi, kid, interpret=False)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, ids, ids, ids)
  text = traced.lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3


def test_bad_inputs_raise_clear_errors():
  q = jnp.zeros((1, 8, 2, 16))
  k = jnp.zeros((1, 8, 1, 16))
  ids = masks.key_indices(1, 8)
  with pytest.raises(ValueError, match="multiple of 128"):
    flash_tpu.BlockSizes(block_q=100)
  with pytest.raises(ValueError, match="block_sizes"):
    flash_tpu.forward(q, k, k, ids, ids, ids, block_sizes=(128, 128))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    flash_tpu.forward(q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)), ids, ids, ids)
  with pytest.raises(ValueError, match="floating point"):
    flash_tpu.forward(q.astype(jnp.int32), k.astype(jnp.int32), k.astype(jnp.int32), ids, ids, ids)
  long = jnp.zeros((1, 1 << 18, 1, 128), jnp.bfloat16)
  long_ids = masks.key_indices(1, 1 << 18)
  with pytest.raises(ValueError, match="SMEM words"):  # checked before tracing, for real TPUs
    flash_tpu.forward(long, long, long, long_ids, long_ids, long_ids, interpret=False)
  o, lse = jnp.zeros_like(q), jnp.zeros((1, 8, 2))
  with pytest.raises(ValueError, match="lse.shape"):
    flash_tpu.backward(q, k, k, o, lse, o, ids, ids, ids)


@pytest.mark.tpu
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
def test_compiled_on_tpu_matches_reference(dtype, tol):
  b, t, n, kh, h = 2, 4096, 8, 2, 128
  rng, q, k, v, do, dlse = _inputs(13, b, t, t, n, kh, h, dtype)
  seg, frame = _random_rows(rng, b, t)
  args = (*_intervals(seg, frame, True), masks.key_indices(b, t))
  o, lse, grads = _vjp(
    lambda q, k, v: flash_tpu.attention(q, k, v, *args, interpret=False), q, k, v, do, dlse
  )
  want_o, want_lse, want_grads = _vjp(
    lambda q, k, v: blockwise.attention(q, k, v, *args), q, k, v, do, dlse
  )
  _close(o, want_o, tol)
  _close_lse(lse, want_lse, tol)
  for g, w in zip(grads, want_grads, strict=True):
    _close(g, w, tol)


def test_ring_attention_with_pallas_tpu_steps_matches_reference():
  """Ring steps merge the kernel's (o, lse) and feed the merged ones to `backward` (2 devices)."""
  from lcv.parallel import ring_attention

  b, t, n, kh, h = 1, 512, 2, 1, 64
  rng, q, k, v, do, _ = _inputs(17, b, t, t, n, kh, h, jnp.float32)
  seg, frame = _random_rows(rng, b, t)
  devices = np.asarray(jax.devices()[:2])
  mesh = jax.sharding.Mesh(devices, ("context",), axis_types=(jax.sharding.AxisType.Auto,))

  def loss(q, k, v):
    o = ring_attention.ring_attention(
      q, k, v, segment_ids=seg, frame_ids=frame, mesh=mesh, load_balance=True, strategy="ring",
      backend="pallas_tpu", block_sizes=_SMALL, interpret=True,
    )  # fmt: skip
    return jnp.sum(o * do)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  lo, hi = _intervals(seg, frame, True)
  *_, want = _reference_vjp(q, k, v, do, jnp.zeros((b, n, t)), lo, hi, masks.key_indices(b, t))
  for g, w in zip(got, want, strict=True):
    _close(g, w, 1e-4)
