"""`attend` equals naive masked softmax attention; dispatch errors are clear.

The naive reference here is the textbook one: scores, the dense mask predicate, softmax, zeros on
rows with no allowed key. It shares no code with the blockwise implementation.
"""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcv import attention, masks
from tests.test_masks import pack, zigzag

_ROWS = [
  [[("text", 5), ("image", 21), ("text", 3)], [("video", 2, 9, 1), ("text", 4)], [("text", 30)]],
  [[("text", 2), ("image", 57), ("text", 6)]],
]


# Jitted helpers: on a busy CPU, compiling every eager op costs more than the tests themselves.
_dense = jax.jit(masks.dense, static_argnums=2)
_token_mask = jax.jit(masks.token_mask, static_argnums=2)


def _normal(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32).astype(dtype)


def _qkv(b, t, s, n, k, h, dtype=jnp.float32, seed=0):
  q = _normal((b, t, n, h), 3 * seed, dtype)
  return q, _normal((b, s, k, h), 3 * seed + 1, dtype), _normal((b, s, k, h), 3 * seed + 2, dtype)


@jax.jit
def naive(q, k, v, allowed):
  """Dense softmax attention; allowed: bool[B, T, S]. Returns (o [B, T, N, H], lse [B, N, T])."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32)
  scores = scores / np.sqrt(q.shape[-1])
  allowed = allowed[:, None]
  p = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1) * allowed
  o = jnp.einsum("BNTS,BSNH->BTNH", p, v.astype(jnp.float32)).astype(q.dtype)
  return o, jax.nn.logsumexp(jnp.where(allowed, scores, -jnp.inf), axis=-1)


def _rel(x, y):
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  return np.linalg.norm(x - y) / np.linalg.norm(y)


@pytest.mark.parametrize(
  "s, n, k, bidir, dtype",
  [
    (97, 4, 2, True, jnp.float32),  # GQA, odd length, frames, packing, padding
    (97, 2, 2, False, jnp.float32),  # plain causal within samples
    (90, 4, 1, True, jnp.bfloat16),
  ],
)
def test_xla_matches_naive(s, n, k, bidir, dtype):
  seg, frame = pack(_ROWS, s)
  q, kk, v = _qkv(2, s, s, n, k, 16, dtype)
  run = jax.jit(
    functools.partial(
      attention.attend,
      impl="xla",
      return_lse=True,
      block_q=32,
      block_k=16,
      frame_bidirectional=bidir,
    )
  )
  o, lse = run(q, kk, v, segment_ids=seg, frame_ids=frame)
  want, want_lse = naive(q, kk, v, _dense(seg, frame, bidir))
  assert o.shape == q.shape and o.dtype == dtype and lse.shape == (2, n, s)
  assert not np.isnan(np.asarray(o, np.float32)).any()
  pad = seg == 0
  assert pad.any() and (np.asarray(o, np.float32)[pad] == 0).all()
  if dtype == jnp.float32:
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)
  else:
    assert _rel(o, want) < 2e-2
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  fin = np.isfinite(np.asarray(want_lse))
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(want_lse)[fin], rtol=tol, atol=tol)


def test_query_chunk_with_kv_mask():
  # Chunked prefill: queries 40..70 of a 97-token layout against all 97 keys.
  s, lo_row, hi_row = 97, 40, 71
  seg, frame = pack(_ROWS, s)
  full = _token_mask(seg, frame)
  chunk = masks.TokenMask(*(x[:, lo_row:hi_row] for x in full))
  q, k, v = _qkv(2, hi_row - lo_row, s, 4, 2, 8, seed=1)
  run = jax.jit(functools.partial(attention.attend, impl="xla", block_q=16, block_k=32))
  o = run(q, k, v, mask=chunk, kv_mask=full)
  want, _ = naive(q, k, v, _dense(seg, frame)[:, lo_row:hi_row])
  np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)


def test_reordered_tokens_give_reordered_output():
  # Zig-zag order: the TokenMask carries the original indices, so the result is just permuted.
  s = 96
  seg, frame = pack(_ROWS, s)
  q, k, v = _qkv(2, s, s, 2, 1, 8, seed=2)
  order = zigzag(s, 2)
  tm = _token_mask(seg, frame)
  shuffled = masks.TokenMask(*(x[:, order] for x in tm))
  run = jax.jit(functools.partial(attention.attend, impl="xla", block_q=32, block_k=32))
  o = run(q[:, order], k[:, order], v[:, order], mask=shuffled)
  want = run(q, k, v, mask=tm)
  np.testing.assert_allclose(o, want[:, order], rtol=1e-5, atol=1e-5)


def test_gradients_match_naive():
  s = 70
  seg, frame = pack(_ROWS, s)
  q, k, v = _qkv(2, s, s, 4, 2, 8, seed=3)
  w = _normal(q.shape, 30)
  allowed = _dense(seg, frame)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * w)

  ours = functools.partial(
    attention.attend, segment_ids=seg, frame_ids=frame, impl="xla", block_q=16, block_k=32
  )
  got = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(q, k, v)
  ref = lambda q, k, v: naive(q, k, v, allowed)[0]
  want = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_causality_by_gradients():
  """d out_i / d k_j and d out_i / d v_j vanish exactly where the mask forbids (i, j)."""
  s = 40
  seg, frame = pack([[[("text", 3), ("image", 9), ("text", 4)], [("video", 2, 5, 1)]]], s)
  q, k, v = _qkv(1, s, s, 2, 1, 8, seed=4)
  f = lambda k, v: attention.attend(
    q, k, v, segment_ids=seg, frame_ids=frame, impl="xla", block_q=16, block_k=16
  )
  jac_k, jac_v = jax.jit(jax.jacrev(f, argnums=(0, 1)))(k, v)  # [B, T, N, H, B, S, K, H]
  allowed = np.asarray(_dense(seg, frame))[0]
  dk = np.abs(np.asarray(jac_k))[0, :, :, :, 0].sum(axis=(1, 2, 4, 5))  # [T, S]
  dv = np.abs(np.asarray(jac_v))[0, :, :, :, 0].sum(axis=(1, 2, 4, 5))
  assert (dk[~allowed] == 0).all() and (dv[~allowed] == 0).all()
  np.testing.assert_array_equal(dv > 0, allowed)  # every allowed key carries weight
  assert (dk[allowed] > 0).any()


def test_cudnn_rejects_masked_layouts_and_cpu():
  s = 32
  q, k, v = _qkv(2, s, s, 2, 2, 8, jnp.bfloat16)
  one_image, frame = pack([[[("text", 4), ("image", 8)]], [[("text", 32)]]], s)
  with pytest.raises(ValueError, match="frame_bidirectional masks / packing"):
    attention.attend(q, k, v, segment_ids=one_image, frame_ids=frame, impl="cudnn")
  packed, no_frames = pack([[[("text", 10)], [("text", 10)]], [[("text", 5)]]], s)
  with pytest.raises(ValueError, match="frame_bidirectional masks / packing"):
    attention.attend(q, k, v, segment_ids=packed, frame_ids=no_frames, impl="cudnn")
  causal, text = pack([[[("text", 32)]], [[("text", 20)]]], s)  # causal + trailing padding
  assert (attention.causal_lengths(*(_token_mask(causal, text),) * 2) == [32, 20]).all()
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
      attention.attend(q, k, v, segment_ids=causal, frame_ids=text, impl="cudnn")
  traced = jax.jit(lambda seg: attention.attend(q, k, v, segment_ids=seg, impl="cudnn"))
  with pytest.raises(ValueError, match="causal_only=True"):
    traced(causal)
  if jax.default_backend() != "gpu":
    # Ids known at trace time are checked on the host; a hint lets traced ids through.
    closed = jax.jit(lambda q: attention.attend(q, k, v, segment_ids=causal, impl="cudnn"))
    hinted = jax.jit(
      lambda seg: attention.attend(q, k, v, segment_ids=seg, impl="cudnn", causal_only=True)
    )
    for run, arg in ((closed, q), (hinted, causal)):
      with pytest.raises(ValueError, match="needs a CUDA GPU"):
        run(arg)


def test_cudnn_full_masks():
  """A vision tower's mask (every query sees every key) is cuDNN's other supported case: found on
  the host for concrete masks, asserted with full_only=True under jit."""
  s = 16
  q, k, v = _qkv(2, s, s, 2, 2, 8, jnp.bfloat16)
  ones, zeros = np.ones((2, s), np.int32), np.zeros((2, s), np.int32)
  full = _token_mask(ones, zeros)  # one bidirectional frame per row
  causal, text = pack([[[("text", s)]], [[("text", s)]]], s)
  assert attention.full_mask(full, full)
  assert not attention.full_mask(*(_token_mask(causal, text),) * 2)
  padded, frame = pack([[[("image", 12)]], [[("image", s)]]], s)
  assert not attention.full_mask(*(_token_mask(padded, frame),) * 2)  # padding: not full
  with pytest.raises(ValueError, match="at most one"):
    attention.attend(q, k, v, mask=full, impl="cudnn", causal_only=True, full_only=True)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
      attention.attend(q, k, v, mask=full, impl="cudnn")
    hinted = jax.jit(lambda m: attention.attend(q, k, v, mask=m, impl="cudnn", full_only=True))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
      hinted(full)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["full", "causal"])
def test_cudnn_matches_xla_on_gpu(layout):
  """cuDNN's two supported masks against the reference (bf16, GQA, a non-multiple-of-64 length
  like a 577-token CLIP frame)."""
  b, s = 3, 577
  q, k, v = _qkv(b, s, s, 4, 2, 64, jnp.bfloat16)
  if layout == "full":
    seg, frame = np.ones((b, s), np.int32), np.zeros((b, s), np.int32)
  else:
    seg, frame = pack([[[("text", s)]], [[("text", 300)]], [[("text", s)]]], s)
  mask = _token_mask(seg, frame)
  got = attention.attend(q, k, v, mask=mask, impl="cudnn")
  want = attention.attend(q, k, v, mask=mask, impl="xla")
  np.testing.assert_allclose(np.float32(got), np.float32(want), atol=2e-2, rtol=2e-2)


def test_bad_arguments_raise():
  q, k, v = _qkv(1, 8, 8, 2, 1, 8)
  seg = np.ones((1, 8), np.int32)
  with pytest.raises(ValueError, match="unknown impl='flash'.*'xla'"):
    attention.attend(q, k, v, segment_ids=seg, impl="flash")
  with pytest.raises(ValueError, match="segment_ids"):
    attention.attend(q, k, v, impl="xla")
  with pytest.raises(ValueError, match="kv_mask"):
    attention.attend(q, k[:, :6], v[:, :6], mask=_token_mask(seg, seg * -1), impl="xla")
  with pytest.raises(ValueError, match="multiple of kv heads"):
    attention.attend(_normal((1, 8, 3, 8), 9), k.repeat(2, 2), v.repeat(2, 2), segment_ids=seg)
  with pytest.raises(ValueError, match="head dim"):
    attention.attend(q, k[..., :4], v[..., :4], segment_ids=seg)
  with pytest.raises(ValueError, match="q_lo.shape"):
    attention.attend(q, k, v, segment_ids=seg[:, :8].repeat(2, 0))
  with pytest.raises(ValueError, match="not both"):
    attention.attend(q, k, v, segment_ids=seg, mask=_token_mask(seg, seg * -1))


def test_auto_is_xla_on_cpu_and_imports_are_lazy():
  if jax.default_backend() == "cpu":
    q, k, v = _qkv(1, 8, 8, 2, 1, 8)
    seg = np.ones((1, 8), np.int32)
    np.testing.assert_array_equal(
      attention.attend(q, k, v, segment_ids=seg, prefer_cudnn=True),
      attention.attend(q, k, v, segment_ids=seg, impl="xla"),
    )
  code = (
    "import sys, lcv.attention as a; "
    "assert {'pallas_gpu', 'pallas_tpu', 'ring', 'ulysses', 'cudnn', 'xla'} "
    "<= set(a.IMPLEMENTATIONS); "
    "bad = [m for m in ('lcv.kernels.flash_gpu', 'lcv.kernels.flash_tpu', "
    "'lcv.parallel.ring_attention') if m in sys.modules]; assert not bad, bad"
  )
  root = pathlib.Path(__file__).parents[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_dispatch_matches_xla(impl):
  s = 40
  seg, frame = pack(_ROWS, s)
  q, k, v = _qkv(2, s, s, 2, 1, 16, seed=5)
  kw = dict(segment_ids=seg, frame_ids=frame, return_lse=True)
  o, lse = attention.attend(q, k, v, impl=impl, **kw)  # interpret mode off its platform
  want, want_lse = attention.attend(q, k, v, impl="xla", **kw)
  np.testing.assert_allclose(o, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-4, atol=1e-4)
