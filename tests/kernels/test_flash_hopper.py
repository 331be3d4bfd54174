"""Hopper attention (`lcv.kernels.flash_hopper`, Mosaic GPU) against its dense twin.

On CPU the kernels run in Mosaic GPU's interpreter (threads for the warpgroups, simulated
barriers and bulk copies; matrix products as plain dots): that checks the pipeline protocol,
the tile ranges, the masks and the softmax on small packed inputs, forward and backward. The
compiled kernels are also lowered for a CUDA target on the host (Mosaic GPU's lowering runs
without a GPU). The `gpu`-marked tests run the compiled wgmma kernels on a Hopper GPU over packed
layouts with 257-token frames, GQA, every supported head dim, zig-zag key chunks and odd lengths.
`test_hopper_backward.py` runs the backward kernels under the interpreter's race detector.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcv import masks
from lcv.kernels import flash_gpu, flash_hopper, hopper_forward, hopper_pipeline
from tests.kernels.test_flash_gpu import _layout

TOL = {jnp.bfloat16: 2e-2, jnp.float16: 1e-2}


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6))


def _inputs(rng, b, t, s, n, kh, h, dtype):
  shapes = ((b, t, n, h), (b, s, kh, h), (b, s, kh, h), (b, t, n, h))
  return [jnp.asarray(rng.normal(size=x), dtype) for x in shapes]


def _check(q, k, v, do, lo, hi, kid):
  """Forward (o, lse) and all three gradients (through o and lse) against the dense twin.

  The cotangents are do for o and 0.1 for the finite lse (a ring merge sends one). Returns
  (o, lse, (dq, dk, dv)) of the kernel."""
  tol = TOL[q.dtype.type]

  def kern(q, k, v):
    return flash_hopper.attention(q, k, v, lo, hi, kid)

  def ref(q, k, v):
    return flash_hopper.attention_reference(q, k, v, lo, hi, kid)

  (o, lse), vjp = jax.vjp(kern, q, k, v)
  (ro, rlse), ref_vjp = jax.vjp(ref, q, k, v)
  assert o.dtype == q.dtype and lse.dtype == jnp.float32
  assert _rel(o, ro) < tol, _rel(o, ro)
  lse_np, rlse_np = np.asarray(lse), np.asarray(rlse)
  assert np.array_equal(np.isneginf(lse_np), np.isneginf(rlse_np))
  fin = np.isfinite(rlse_np)
  np.testing.assert_allclose(lse_np[fin], rlse_np[fin], atol=2e-2)
  dlse = jnp.where(jnp.asarray(fin), 0.1, 0.0).astype(jnp.float32)
  got = vjp((do, dlse))
  want = ref_vjp((do, dlse))
  for name, g, w in zip("qkv", got, want):
    assert g.dtype == q.dtype and not np.isnan(np.asarray(g, np.float32)).any(), name
    assert _rel(g, w) < tol, (name, _rel(g, w))
  return o, lse_np, got


def test_cta_ranges_partition_the_cta_range():
  """Each warpgroup's four bounds lie in its CTA's range and are ordered; empty warpgroups and
  empty CTAs get empty ranges; the CTA range covers both warpgroups' tiles."""
  r = jnp.asarray(
    [[[0, 1, 3, 4], [2, 2, 5, 6], [7, 7, 7, 7], [1, 1, 2, 3], [9, 9, 9, 9], [9, 9, 9, 9]]],
    jnp.int32,
  )
  out = np.asarray(hopper_pipeline.cta_ranges(r))[0]
  np.testing.assert_array_equal(out[0], [0, 6, 0, 1, 3, 4, 2, 2, 5, 6])
  np.testing.assert_array_equal(out[1], [1, 3, 1, 1, 1, 1, 1, 1, 2, 3])
  np.testing.assert_array_equal(out[2, :2], [0, 0])
  for row in out:
    c0, c1 = row[:2]
    for w in (row[2:6], row[6:10]):
      assert c0 <= w[0] <= w[1] <= w[2] <= w[3] <= c1


def test_own_range_of_three_consumers():
  """`cta_ranges` and `own_range` of CTAs of three consumers (the forward at H = 64): each
  consumer reads back its own four bounds, clipped into the CTA range."""
  r = jnp.asarray(
    [[[0, 1, 3, 4], [2, 2, 5, 6], [7, 7, 7, 7], [1, 1, 2, 3], [9, 9, 9, 9], [9, 9, 9, 9]]],
    jnp.int32,
  )
  rows = np.asarray(hopper_pipeline.cta_ranges(r, 3))[0]
  np.testing.assert_array_equal(rows[0], [0, 6, 0, 1, 3, 4, 2, 2, 5, 6, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows[1], [1, 3, 1, 1, 2, 3, 1, 1, 1, 1, 1, 1, 1, 1])
  for row in rows:
    for wg in range(3):
      got = [int(x) for x in hopper_pipeline.own_range(list(row), jnp.int32(wg), 3)]
      assert got == list(row[2 + 4 * wg : 6 + 4 * wg]), (wg, got)


@pytest.mark.parametrize("first_full", [False, True])
def test_run_range_carried_visits_each_tile_once(first_full):
  """`run_range_carried` on every ordered range inside [c0, c1) = [2, 9): each tile is stepped
  exactly once, in order; `own` marks the warpgroup's tiles, `pending` the tile after an own one;
  own tiles in [full first, full end) run unmasked except the first one, which runs unmasked only
  with `first_full` (the forward's causal tile 0)."""
  c0, c1 = 2, 9
  bounds = range(c0, c1 + 1)
  for w in [(a, b, c, d) for a in bounds for b in bounds for c in bounds for d in bounds]:
    if not w[0] <= w[1] <= w[2] <= w[3]:
      continue
    seen = []

    def step(j, carry, own, pending, mode, seen=seen):
      seen.append((int(j), own, pending, mode))
      return carry

    with jax.disable_jit():  # the loops run in Python with concrete tile indices
      hopper_pipeline.run_range_carried(c0, c1, [jnp.int32(x) for x in w], step, 0, first_full)
    assert [s[0] for s in seen] == list(range(c0, c1)), (w, seen)
    for j, own, pending, mode in seen:
      assert own == (w[0] <= j < w[3]), (w, j)
      assert pending == (w[0] < j <= w[3] and w[0] < w[3]), (w, j)
      full = own and w[1] <= j < w[2] and (first_full or j > w[0])
      assert mode == ("full" if full else "mask" if own else "skip"), (w, j, mode)


def test_interpreter_packed_gqa_padding():
  """Two packed samples with frames, GQA 2:1, T and S not multiples of the tiles (padding), a
  key range longer than the two smem stages: forward and gradients in the interpreter (at
  H = 64 the fused backward runs under GQA too, its whole dQ tiles formed by turns)."""
  rng = np.random.default_rng(0)
  b, t, n, kh, h = 1, 200, 2, 1, 64
  seg, fr = _layout(rng, b, t, 24, 2, 5)
  lo, hi = masks.intervals(seg, fr)
  q, k, v, do = _inputs(rng, b, t, t, n, kh, h, jnp.bfloat16)
  assert hopper_pipeline.plan(q, k, None, None).fused_backward
  _check(q, k, v, do, lo, hi, masks.key_indices(b, t))


def test_interpreter_head_dim_256():
  """H = 256 in the interpreter: the forward on 64-key tiles, the gradients from the dQ kernel
  with one consumer and `hopper_wide_dkv` (one consumer per gradient), without GQA (the race
  test in `test_hopper_backward.py` has it)."""
  rng = np.random.default_rng(7)
  b, t, n, kh, h = 1, 150, 2, 2, 256
  seg, fr = _layout(rng, b, t, 20, 2, 6)
  lo, hi = masks.intervals(seg, fr)
  q, k, v, do = _inputs(rng, b, t, t, n, kh, h, jnp.bfloat16)
  assert hopper_pipeline.plan(q, k, None, None).bk == 64
  _check(q, k, v, do, lo, hi, masks.key_indices(b, t))


def test_interpreter_zigzag_chunk_and_rows_without_keys():
  """A ring step's view in the interpreter: a key chunk of non-contiguous global indices (two
  zig-zag quarters), T != S, and rows that see none of it (o = 0, lse = -inf, no NaN)."""
  rng = np.random.default_rng(3)
  t, n, h = 256, 2, 64
  seg, fr = _layout(rng, 1, t, 24, 2, 0)
  lo, hi = masks.intervals(seg, fr)
  q, k, v, do = _inputs(rng, 1, t, t, n, n, h, jnp.bfloat16)
  c = t // 4
  idx = np.r_[c : 2 * c, 3 * c : 4 * c]  # quarters 1 and 3: early rows see none of them
  kid = jnp.asarray(idx[None], jnp.int32)
  o, lse, (dq, _, _) = _check(q, k[:, idx], v[:, idx], do, lo, hi, kid)
  empty = np.isneginf(lse)[0, 0]  # rows (every head alike) with no key in the chunk
  assert empty.sum() >= c // 2, empty.sum()  # most of the first quarter (frames may straddle it)
  assert np.all(np.asarray(o, np.float32)[0, empty] == 0)
  assert np.all(np.asarray(dq, np.float32)[0, empty] == 0)


def _every_layout(rng):
  """One row that holds all layouts (`test_interpreter_forward_every_layout`): (q, k, v, lo, hi,
  kid), the keys a chunk the first 32 rows do not see."""
  t, h = 384, 64
  seg = np.repeat(np.int32([1, 2, 0]), [300, 60, 24])[None]
  fr = np.full((1, t), -1, np.int32)
  fr[0, 100:262] = np.arange(162) // 27
  fr[0, 320:344] = 0
  lo, hi = masks.intervals(seg, fr)
  idx = np.r_[32:224, 256:384]  # rows 0-31 see none of these keys
  kid = jnp.asarray(idx[None], jnp.int32)
  q, k, v, _ = _inputs(rng, 1, t, t, 1, 1, h, jnp.bfloat16)
  return q, k[:, idx], v[:, idx], lo, hi, kid


def test_interpreter_forward_every_layout():
  """The forward in the interpreter on one row that holds all layouts: a sample of causal text,
  27-token frames (frame-block-causal) and text; a packed second sample with a 24-token frame;
  padding rows; and a key chunk (S != T, not a multiple of the tiles) that the first rows do not
  see (o = 0, lse = -inf there). The forward carries a tile's PV into the next tile's turn; here
  consumers' own tiles start after their CTA's (rows 320-383), end before them (rows 256-319)
  and hold a run of unmasked tiles (rows 192-255)."""
  q, k, v, lo, hi, kid = _every_layout(np.random.default_rng(21))
  o, lse = flash_hopper.forward(q, k, v, lo, hi, kid)
  ro, rlse = flash_hopper.attention_reference(q, k, v, lo, hi, kid)
  assert o.dtype == q.dtype and lse.dtype == jnp.float32
  assert _rel(o, ro) < TOL[jnp.bfloat16], _rel(o, ro)
  lse, rlse = np.asarray(lse), np.asarray(rlse)
  empty = np.isneginf(rlse)[0, 0]
  assert empty[:32].all() and empty[-24:].all() and not empty[32:360].any()
  assert np.array_equal(np.isneginf(lse), np.isneginf(rlse))
  np.testing.assert_allclose(lse[~np.isneginf(rlse)], rlse[~np.isneginf(rlse)], atol=2e-2)
  assert np.all(np.asarray(o, np.float32)[0, empty] == 0)


def test_interpreter_forward_three_consumers():
  """The forward with three consumers per CTA (its schedule at H = 64 on a GPU; two in the
  interpreter by default, `hopper_pipeline.plan`) on the every-layout row: turns rotate over
  three warpgroups and the CTA holds 192 rows, so consumer ranges fall differently. Every row
  of (o, lse) equals the two-consumer forward's bit for bit; that one is checked against the
  dense twin above."""
  q, k, v, lo, hi, kid = _every_layout(np.random.default_rng(21))
  outs = []
  for wgs in (2, 3):
    p = hopper_pipeline.plan(q, k, None, None, fwd_consumers=wgs)
    assert p.t_pad == 384 and p.fwd_consumers == wgs
    outs.append(hopper_forward.forward(p, *hopper_pipeline.prepare(p, q, k, v, lo, hi, kid)))
  (o2, l2), (o3, l3) = outs
  np.testing.assert_array_equal(np.asarray(o3, np.float32), np.asarray(o2, np.float32))
  np.testing.assert_array_equal(np.asarray(l3), np.asarray(l2))
  assert hopper_pipeline.plan(q, k, None, None).fwd_consumers == 2  # the interpreter's default
  assert hopper_pipeline.plan(q, k, None, False).fwd_consumers == 3  # compiled, H = 64
  with pytest.raises(ValueError, match="fwd_consumers=3 must be 2, or 3 at head dim 64"):
    hopper_pipeline.plan(jnp.zeros((1, 8, 1, 128)), jnp.zeros((1, 8, 1, 128)), None, None, 3)


@pytest.mark.parametrize("kh", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("h", flash_hopper.HEAD_DIMS)
def test_compiled_kernels_lower_for_cuda(h, kh):
  """The compiled form of every kernel (wgmma, TMA, warp specialization, the dQ kernel's early
  accumulator read, the pipelined dK/dV schedule, the H = 256 dK/dV kernel, the fused backward
  with its TMA reduce-add in both dQ splits) lowers to Mosaic GPU for a CUDA target on any
  host: operand layouts, transposed wgmma operands and smem transforms are checked without a
  GPU (ptxas and the run are not). Each kernel is named in profiles."""
  b, t, n = 1, 512, 4
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, kh, h), jnp.bfloat16)
  ints = [jax.ShapeDtypeStruct((b, t), jnp.int32)] * 3
  lse = jax.ShapeDtypeStruct((b, n, t), jnp.float32)

  def lower(f, *args):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

  def names(text):
    # (jax 0.11 may add a uniquing suffix: lcv_hopper_fwd_0.)
    return {re.sub(r"(_mosaic_gpu)?(_\d+)?$", "", m) for m in re.findall(r"lcv_hopper_\w+", text)}

  def fwd(q, k, v, *m):
    return flash_hopper.forward(q, k, v, *m, interpret=False)

  def bwd(q, k, v, o, lse, do, *m):
    return flash_hopper.backward(q, k, v, o, lse, do, *m, interpret=False)

  text = lower(fwd, q, kv, kv, *ints)
  assert "wgmma" in text and names(text) == {"lcv_hopper_fwd"}, names(text)
  text = lower(bwd, q, kv, kv, q, lse, q, *ints)
  dkv = "lcv_hopper_dkv" if h <= 128 else "lcv_hopper_dkv_wide"
  assert "wgmma" in text
  if h == 64 or (h == 128 and kh == n):  # one kernel, `hopper_fused_backward` (launched
    # through `pl.kernel`, which takes its dQ Ref: the text holds its source locations, not its
    # name)
    assert text.count("custom_call @mosaic_gpu") == 1 and "hopper_fused_backward.py" in text
  else:
    assert names(text) == {"lcv_hopper_dq", dkv}, names(text)


def test_supported_and_errors():
  q = jnp.zeros((1, 8, 2, 128), jnp.bfloat16)
  assert not flash_hopper.supported(q.astype(jnp.float32), q)
  assert not flash_hopper.supported(jnp.zeros((1, 8, 2, 80), jnp.bfloat16), q)
  if jax.default_backend() != "gpu":
    assert not flash_hopper.supported(q, q)
  lo = hi = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    x = q.astype(jnp.float32)
    flash_hopper.forward(x, x, x, lo, hi, lo)
  with pytest.raises(ValueError, match="portable kernel"):
    x = jnp.zeros((1, 8, 2, 96), jnp.bfloat16)
    flash_hopper.forward(x, x, x, lo, hi, lo)


GPU_CASES = [
  # (t, s, n, kh, h, frame, segments, pad, dtype)
  (2048, 2048, 2, 2, 128, 1, 1, 0, jnp.bfloat16),  # causal text
  (2048, 2048, 4, 2, 128, 257, 3, 100, jnp.bfloat16),  # packed video, GQA, padding
  (2048, 2048, 2, 2, 128, 144, 3, 60, jnp.float16),  # H = 128 fused backward, packed video
  (1500, 1500, 2, 1, 64, 144, 2, 7, jnp.float16),
  (1800, 1800, 2, 2, 64, 257, 3, 40, jnp.bfloat16),  # H = 64 fused backward, packed video
  (1100, 1100, 2, 1, 256, 257, 2, 30, jnp.bfloat16),  # H = 256: hopper_wide_dkv, one dQ consumer
]


@pytest.mark.gpu
@pytest.mark.parametrize(
  "case", GPU_CASES, ids=lambda c: f"t{c[0]}-h{c[4]}-f{c[5]}-g{c[2] // c[3]}"
)
def test_gpu_matches_reference(case):
  t, s, n, kh, h, frame, segs, pad, dtype = case
  rng = np.random.default_rng(t + h)
  seg, fr = _layout(rng, 1, t, frame, segs, pad)
  lo, hi = masks.intervals(seg, fr)
  q, k, v, do = _inputs(rng, 1, t, s, n, kh, h, dtype)
  _check(q, k, v, do, lo, hi, masks.key_indices(1, s))


@pytest.mark.gpu
def test_gpu_zigzag_chunks_and_empty_rows():
  """A ring step's view: zig-zag key chunks (non-contiguous global indices) and rows that see
  no key of the chunk (o = 0, lse = -inf), forward and backward per chunk."""
  rng = np.random.default_rng(3)
  t, n, h = 2048, 2, 128
  seg, fr = _layout(rng, 1, t, 257, 2, 0)
  lo, hi = masks.intervals(seg, fr)
  q, k, v, do = _inputs(rng, 1, t, t, n, n, h, jnp.bfloat16)
  c = t // 4
  idx = np.r_[c : 2 * c, 2 * c : 3 * c]  # the middle chunks: early rows see none of them
  kid = jnp.asarray(idx[None], jnp.int32)
  _check(q, k[:, idx], v[:, idx], do, lo, hi, kid)
  o, lse = flash_hopper.forward(q, k[:, idx], v[:, idx], lo, hi, kid)
  assert np.all(np.isneginf(np.asarray(lse)[:, :, :100]))
  assert np.all(np.asarray(o, np.float32)[:, :100] == 0)


@pytest.mark.gpu
def test_gpu_same_as_portable_kernel():
  """The Hopper and the portable kernel agree on a long causal row (the dispatch is invisible)."""
  rng = np.random.default_rng(5)
  t, n, h = 8192, 2, 128
  seg, fr = _layout(rng, 1, t, 1, 1, 0)
  lo, hi = masks.intervals(seg, fr)
  kid = masks.key_indices(1, t)
  q, k, v, _ = _inputs(rng, 1, t, t, n, n, h, jnp.bfloat16)
  o1, l1 = flash_hopper.forward(q, k, v, lo, hi, kid)
  o2, l2 = flash_gpu.forward(q, k, v, lo, hi, kid)
  assert _rel(o1, o2) < 1e-2
  np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), atol=1e-2)


def test_gpu_dispatch_picks_by_static_facts(monkeypatch):
  """`lcv.kernels.gpu` runs the portable kernel off Hopper (here: CPU, interpret) with identical
  results, honours kernel= and $LCV_GPU_KERNEL, and names a bad choice."""
  from lcv.kernels import gpu

  rng = np.random.default_rng(7)
  q, k, v, _ = _inputs(rng, 1, 40, 40, 2, 1, 64, jnp.bfloat16)
  lo, hi = masks.intervals(np.ones((1, 40), np.int32), np.full((1, 40), -1, np.int32))
  kid = masks.key_indices(1, 40)
  got = gpu.attention(q, k, v, lo, hi, kid, interpret=True)
  want = flash_gpu.attention(q, k, v, lo, hi, kid, interpret=True)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  assert not gpu._pick(q, k, "portable", {})
  assert gpu._pick(q, k, "hopper", {}) and gpu._pick(q, k, None, {}) == flash_hopper.supported(q, k)
  assert not gpu._pick(q, k, None, {"interpret": True})  # portable options pick the portable one
  with pytest.raises(ValueError, match="portable kernel"):
    gpu._pick(q, k, "hopper", {"block_sizes": flash_gpu.BlockSizes()})
  with pytest.raises(ValueError, match="kernel='fast'"):
    gpu.forward(q, k, v, lo, hi, kid, kernel="fast")
  monkeypatch.setenv(gpu.ENV, "portable")
  assert not gpu._pick(q, k, None, {})
  monkeypatch.setenv(gpu.ENV, "cudnn")
  with pytest.raises(ValueError, match="LCV_GPU_KERNEL"):
    gpu.forward(q, k, v, lo, hi, kid)
