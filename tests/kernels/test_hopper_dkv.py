"""The dK/dV kernel's schedules (`lcv.kernels.hopper_dkv`) against `flash_hopper._dkv` and the
dense twin.

On CPU the kernels run in Mosaic GPU's interpreter with its race detector on (warpgroups as
threads, simulated barriers and bulk copies, products as plain float32 dots): that checks each
schedule's protocol (stage ring, slot releases, turns, the pipelined dK product, tile ranges,
masks) and its results, which must equal `_dkv`'s. The compiled forms (wgmma, TMA, warp
specialization) are lowered for a CUDA target on the host; their speed is measured on a GPU by
scripts/check_hopper_dkv.py, whose --smoke mode runs here.
"""

import functools
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcv import masks
from lcv.kernels import flash_hopper, hopper_dkv


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6))


@functools.cache
def _case():
  """One row holding every layout: a causal text sample, a frame-block-causal video sample, a
  packed sample of frames and text, padding rows; a key chunk of non-contiguous global indices
  (S != T, neither a multiple of the tiles) that the first rows do not see; GQA 2:1 (the kernel
  loops over the group), H = 64. Returns the inputs, the dense twin's (dk, dv) and `_dkv`'s."""
  rng = np.random.default_rng(4)
  t, n, kh, h = 256, 2, 1, 64
  seg = np.repeat(np.int32([1, 2, 3, 0]), [80, 90, 60, 26])[None]
  fr = np.full((1, t), -1, np.int32)
  fr[0, 83:164] = np.arange(81) // 27  # three 27-token frames after a little text
  fr[0, 170:194], fr[0, 200:224] = 0, 1  # two 24-token frames with text between and after
  lo, hi = masks.intervals(seg, fr)
  idx = np.r_[32:128, 160:250]  # rows 0-31 see none of these keys
  kid = jnp.asarray(idx[None], jnp.int32)
  q, do = (jnp.asarray(rng.normal(size=(1, t, n, h)), jnp.bfloat16) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(1, len(idx), kh, h)), jnp.bfloat16) for _ in range(2))
  (o, lse), vjp = jax.vjp(lambda k, v: flash_hopper.attention_reference(q, k, v, lo, hi, kid), k, v)
  # The lse cotangent too (a ring merge sends one): delta = rowsum(dO * O) - dlse.
  dlse = jnp.where(jnp.isfinite(lse), jnp.asarray(rng.normal(size=lse.shape), jnp.float32), 0.0)
  want = vjp((do, dlse))
  p = flash_hopper._plan(q, k, None, None, False)
  ops = hopper_dkv.operands(p, q, k, v, o, lse, do, lo, hi, kid, dlse)
  current = [x[:, : k.shape[1]] for x in flash_hopper._dkv(p, *ops)]
  return (q, k, v, o, lse, do, lo, hi, kid, dlse), want, current


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the interpreter's test (gpu: below)")
@pytest.mark.parametrize(
  "variant, stages",
  [("pipelined", None), ("pingpong", 2), ("grouped", 2), ("grouped_pingpong", None)],
)
def test_interpreter_variant_equals_current_kernel(variant, stages):
  """dk, dv of each schedule equal `_dkv`'s (same products, same accumulation order) and the
  dense twin's gradients; no race between the warpgroups and the copy engine; the rows without
  keys and the padding contribute nothing (no NaN)."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

  (q, k, v, o, lse, do, lo, hi, kid, dlse), want, current = _case()
  p = flash_hopper._plan(q, k, None, InterpretGPUParams(detect_races=True), False)
  ops = hopper_dkv.operands(p, q, k, v, o, lse, do, lo, hi, kid, dlse)
  got = hopper_dkv.dkv(p, *ops, variant=variant, stages=stages)
  got = [x[:, : k.shape[1]] for x in jax.block_until_ready(got)]
  assert not interpret_pallas_call.get_races().races_found
  for name, g, c, w in zip(("dk", "dv"), got, current, want):
    assert g.dtype == q.dtype and np.isfinite(np.asarray(g, np.float32)).all(), name
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(c, np.float32), rtol=1e-6)
    assert _rel(g, w) < 2e-2, (name, _rel(g, w))


def test_backward_kv_trims_and_matches_reference():
  """The public wrapper (unpadded in, trimmed out) on a causal row with padding rows, T = S not
  a multiple of the tiles, no GQA: dk, dv of the dense twin."""
  rng = np.random.default_rng(9)
  t, n, h = 130, 1, 64
  seg = np.r_[np.ones(120, np.int32), np.zeros(10, np.int32)][None]
  lo, hi = masks.intervals(seg, np.full((1, t), -1, np.int32))
  kid = masks.key_indices(1, t)
  q, k, v, do = (jnp.asarray(rng.normal(size=(1, t, n, h)), jnp.bfloat16) for _ in range(4))
  (o, lse), vjp = jax.vjp(lambda k, v: flash_hopper.attention_reference(q, k, v, lo, hi, kid), k, v)
  want = vjp((do, jnp.zeros_like(lse)))
  got = hopper_dkv.backward_kv(q, k, v, o, lse, do, lo, hi, kid, variant="pingpong")
  for name, g, w in zip(("dk", "dv"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert _rel(g, w) < 2e-2, (name, _rel(g, w))


def test_options_checked():
  """A bad variant or ring depth raises before tracing, naming the value and the fix."""
  q = jnp.zeros((1, 8, 2, 128), jnp.bfloat16)
  lo = hi = jnp.zeros((1, 8), jnp.int32)
  lse = jnp.zeros((1, 2, 8), jnp.float32)
  bad = [
    ({"variant": "zigzag"}, "must be one of"),
    ({"variant": "pingpong", "stages": 1}, ">= 2"),
    ({"variant": "pingpong", "stages": 5}, "fewer stages"),  # 5 x 32 KB of Q / dO tiles
  ]
  for options, match in bad:
    with pytest.raises(ValueError, match=match):
      hopper_dkv.backward_kv(q, q, q, q, lse, q, lo, hi, lo, **options)
  assert hopper_dkv.smem_bytes(128, 64, 4) < 227 * 1024 - 4096 < hopper_dkv.smem_bytes(128, 64, 5)


@pytest.mark.parametrize("h", flash_hopper.HEAD_DIMS)
def test_compiled_variants_lower_for_cuda(h):
  """Every schedule's compiled form (wgmma with register and transposed smem operands, TMA, the
  turn barriers) lowers through Mosaic GPU for a CUDA target on any host; each kernel is named
  in profiles. (ptxas, the register count and the run are checked on a GPU only.)"""
  b, t, n, kh = 1, 512, 2, 1
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, kh, h), jnp.bfloat16)
  ints = [jax.ShapeDtypeStruct((b, t), jnp.int32)] * 3
  lse = jax.ShapeDtypeStruct((b, n, t), jnp.float32)
  for variant in hopper_dkv.VARIANTS:

    def f(q, k, v, o, lse, do, *m, variant=variant):
      return hopper_dkv.backward_kv(q, k, v, o, lse, do, *m, variant=variant, interpret=False)

    lowered = jax.jit(f).trace(q, kv, kv, q, lse, q, *ints).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "wgmma.mma_async" in text and f"lcv_hopper_dkv_{variant}" in text, variant


def test_check_script_smoke(tmp_path):
  """scripts/check_hopper_dkv.py --smoke: the current kernel and one schedule checked and timed
  (tiny sizes, interpreter), one JSON line per (variant, layout)."""
  path = pathlib.Path(__file__).parents[2] / "scripts" / "check_hopper_dkv.py"
  spec = importlib.util.spec_from_file_location("check_hopper_dkv", path)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  out = tmp_path / "dkv.jsonl"
  script.main(
    ["--smoke", "--layouts", "frame144", "--variants", "current,pingpong", "--out", str(out)]
  )
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["variant"] for r in rows] == ["current", "pingpong"], rows
  assert all(r["pass"] and r["ms"] > 0 and r["tflops"] > 0 for r in rows), rows
  assert rows[1]["dk_rel"] < 1e-6 and rows[1]["dv_rel"] < 1e-6, rows


@pytest.mark.gpu
@pytest.mark.parametrize(
  "variant, stages",
  [("pipelined", 3), ("pingpong", 3), ("pingpong", 2), ("grouped", 2), ("grouped_pingpong", 2)],
)
def test_gpu_variant_equals_current_kernel(variant, stages):
  """On a Hopper GPU the compiled schedules (wgmma, TMA, turns) give `_dkv`'s dk, dv on a packed
  GQA layout with 257-token frames and padding rows, and on a zig-zag key chunk whose first rows
  see no key; and the dense twin's gradients."""
  from tests.kernels.test_flash_gpu import _layout

  rng = np.random.default_rng(17)
  t, n, kh, h = 2048, 4, 2, 128
  seg, fr = _layout(rng, 1, t, 257, 3, 100)
  lo, hi = masks.intervals(seg, fr)
  q, do = (jnp.asarray(rng.normal(size=(1, t, n, h)), jnp.bfloat16) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(1, t, kh, h)), jnp.bfloat16) for _ in range(2))
  c = t // 4
  for idx in (np.arange(t), np.r_[c : 2 * c, 3 * c : 4 * c]):
    kid = jnp.asarray(idx[None], jnp.int32)
    kc, vc = k[:, idx], v[:, idx]
    (o, lse), vjp = jax.vjp(
      lambda k, v, kid=kid: flash_hopper.attention_reference(q, k, v, lo, hi, kid), kc, vc
    )
    want = vjp((do, jnp.zeros_like(lse)))
    p = flash_hopper._plan(q, kc, None, None, False)
    ops = hopper_dkv.operands(p, q, kc, vc, o, lse, do, lo, hi, kid)
    current = flash_hopper._dkv(p, *ops)
    got = hopper_dkv.dkv(p, *ops, variant=variant, stages=stages)
    for name, g, cur, w in zip(("dk", "dv"), got, current, want):
      g, cur = g[:, : len(idx)], cur[:, : len(idx)]
      assert np.isfinite(np.asarray(g, np.float32)).all(), name
      assert _rel(g, cur) < 1e-3, (name, _rel(g, cur))
      assert _rel(g, w) < 2e-2, (name, _rel(g, w))
