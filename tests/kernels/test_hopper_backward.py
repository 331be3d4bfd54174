"""The Hopper backward kernels (`lcv.kernels.hopper_backward`: dQ and dK/dV; `hopper_wide_dkv`:
dK/dV at H = 256; `hopper_fused_backward`: the single kernel at H = 64 and 128) in Mosaic GPU's
interpreter with its race detector on.

Warpgroups run as threads with simulated barriers and bulk copies (products as plain float32
dots), so this checks each kernel's protocol (stage rings, slot releases, the dK/dV kernel's dK
product carried into the next step, the GQA group loop, tile ranges, masks) for races between
the warpgroups and the copy engine, and the gradients against the dense twin's. The end-to-end
VJP and the compiled forms are tested in `test_flash_hopper.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcv import masks
from lcv.kernels import (
  flash_hopper,
  hopper_backward,
  hopper_fused_backward,
  hopper_pipeline,
  hopper_wide_dkv,
)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6))


def _every_layout(kh, h):
  """One row holding every layout: a causal text sample, a frame-block-causal video sample, a
  packed sample of frames and text, padding rows; a key chunk of non-contiguous global indices
  (S != T, neither a multiple of the tiles) that the first 32 rows do not see; 2 query heads on
  kh kv heads. Returns (q, k, v, do, lo, hi, kid, lse, dlse, want): the dense twin's (o, lse)
  VJP `want` (dq, dk, dv) for do and an lse cotangent (a ring merge sends one)."""
  rng = np.random.default_rng(4)
  t, n = 256, 2
  seg = np.repeat(np.int32([1, 2, 3, 0]), [80, 90, 60, 26])[None]
  fr = np.full((1, t), -1, np.int32)
  fr[0, 83:164] = np.arange(81) // 27  # three 27-token frames after a little text
  fr[0, 170:194], fr[0, 200:224] = 0, 1  # two 24-token frames with text between and after
  lo, hi = masks.intervals(seg, fr)
  idx = np.r_[32:128, 160:250]  # rows 0-31 see none of these keys
  kid = jnp.asarray(idx[None], jnp.int32)
  q, do = (jnp.asarray(rng.normal(size=(1, t, n, h)), jnp.bfloat16) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(1, len(idx), kh, h)), jnp.bfloat16) for _ in range(2))
  ref = lambda q, k, v: flash_hopper.attention_reference(q, k, v, lo, hi, kid)  # noqa: E731
  (o, lse), vjp = jax.vjp(ref, q, k, v)
  dlse = jnp.where(jnp.isfinite(lse), jnp.asarray(rng.normal(size=lse.shape), jnp.float32), 0.0)
  return q, k, v, do, lo, hi, kid, o, lse, dlse, vjp((do, dlse))


def _check_gradients(got, want, lse, dtype):
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert g.shape == w.shape and g.dtype == dtype, name
    assert np.isfinite(np.asarray(g, np.float32)).all(), name
    assert _rel(g, w) < 2e-2, (name, _rel(g, w))
  empty = np.isneginf(np.asarray(lse))[0].all(0)  # rows (every head alike) with no key
  assert empty[:32].all() and empty[-26:].all() and not empty.all()
  assert np.all(np.asarray(got[0], np.float32)[0, empty] == 0)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the interpreter's test")
@pytest.mark.parametrize("h", [128, 256])
def test_interpreter_backward_kernels_race_free_every_layout(h):
  """The split kernels on the every-layout row (`_every_layout`) with GQA 2:1, where they run:
  at H = 128 (the pipelined dK/dV schedule) and H = 256 (the dQ kernel with one consumer,
  `hopper_wide_dkv`). dq, dk, dv match the dense twin's, rows without keys get dq = 0, and
  neither kernel races."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

  q, k, v, do, lo, hi, kid, o, lse, dlse, want = _every_layout(1, h)
  p = hopper_pipeline.plan(q, k, None, InterpretGPUParams(detect_races=True))
  assert not p.fused_backward
  ops = hopper_backward.operands(p, q, k, v, o, lse, do, lo, hi, kid, dlse)
  dq = jax.block_until_ready(hopper_backward.dq(p, *ops))[:, : q.shape[1]]
  assert not interpret_pallas_call.get_races().races_found, "dQ kernel"
  dkv = flash_hopper.dkv_kernel(p)
  assert dkv is (hopper_backward.dkv if h <= 128 else hopper_wide_dkv.dkv)
  dk, dv = (x[:, : k.shape[1]] for x in jax.block_until_ready(dkv(p, *ops)))
  assert not interpret_pallas_call.get_races().races_found, "dK/dV kernel"
  _check_gradients((dq, dk, dv), want, lse, q.dtype)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the interpreter's test")
@pytest.mark.parametrize(
  "kh, h", [(2, 128), (1, 128), (2, 64), (1, 64)], ids=["mha", "gqa", "h64-mha", "h64-gqa"]
)
def test_interpreter_fused_backward_race_free_every_layout(kh, h):
  """The fused backward (`hopper_fused_backward`: dQ one position behind, reduce-added by the
  producer) on the every-layout row, without and with GQA 2:1: at H = 128 dQ's column halves
  (GQA called directly: `flash_hopper.backward` picks the split kernels there), at H = 64 whole
  dQ tiles by turns (picked with and without GQA). The gradients match the dense twin's, rows
  without keys get dq = 0, and nothing races (the dS^T exchange between the consumers, the
  staging buffers between consumers and producer)."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

  q, k, v, do, lo, hi, kid, o, lse, dlse, want = _every_layout(kh, h)
  params = InterpretGPUParams(detect_races=True)
  p = hopper_pipeline.plan(q, k, None, params)
  assert p.fused_backward == (h == 64 or kh == 2)
  if p.fused_backward:
    got = flash_hopper._backward(p, q, k, v, o, lse, do, dlse, lo, hi, kid)
  else:
    ops = hopper_backward.operands(p, q, k, v, o, lse, do, lo, hi, kid, dlse)
    dq, dk, dv = hopper_fused_backward.dkv_dq(p, *ops)
    assert dq.dtype == jnp.float32
    got = (
      (dq[:, : q.shape[1]] * p.scale).astype(q.dtype),
      dk[:, : k.shape[1]],
      dv[:, : k.shape[1]],
    )
  jax.block_until_ready(got)
  assert not interpret_pallas_call.get_races().races_found
  _check_gradients(got, want, lse, q.dtype)
