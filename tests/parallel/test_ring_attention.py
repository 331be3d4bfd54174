"""Ring / Ulysses / hybrid / all-gather attention equal the single-device oracle (fp32, 1e-5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcv import masks
from lcv.config import MeshConfig
from lcv.parallel import mesh as mesh_lib
from lcv.parallel import ring_attention as ra

from .layouts import context_mesh, random_layout, reference_attention

S, H = 288, 8
TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(seed, batch=2, heads=4, kv_heads=2):
  rng = np.random.default_rng(seed)
  seg, frame = random_layout(rng, batch, S)
  q, k, v, do = (
    jnp.asarray(rng.standard_normal(shape), jnp.float32)
    for shape in [(batch, S, heads, H)] + [(batch, S, kv_heads, H)] * 2 + [(batch, S, heads, H)]
  )
  return q, k, v, do, seg, frame


def _value_and_grads(attend, q, k, v, do):
  o, vjp = jax.vjp(attend, q, k, v)
  return (o, *vjp(do))


@jax.jit
def _reference(q, k, v, do, seg, frame):
  return _value_and_grads(lambda *a: reference_attention(*a, seg, frame), q, k, v, do)


@functools.cache
def _parallel(strategy, n, load_balance, **kw):
  """jit'd (q, k, v, do, seg, frame) -> (o, dq, dk, dv); cached so equal configs compile once."""

  def run(q, k, v, do, seg, frame):
    attend = functools.partial(
      ra.ring_attention,
      segment_ids=seg,
      frame_ids=frame,
      mesh=context_mesh(n),
      load_balance=load_balance,
      strategy=strategy,
      **kw,
    )
    return _value_and_grads(attend, q, k, v, do)

  return jax.jit(run)


def _check(strategy, n, load_balance, heads=4, kv_heads=2, **kw):
  q, k, v, do, seg, frame = _inputs(n, heads=heads, kv_heads=kv_heads)
  got = _parallel(strategy, n, load_balance, **kw)(q, k, v, do, seg, frame)
  for name, g, r in zip(("o", "dq", "dk", "dv"), got, _reference(q, k, v, do, seg, frame)):
    np.testing.assert_allclose(g, r, **TOL, err_msg=f"{strategy} n={n} {load_balance}: {name}")


@pytest.mark.parametrize("n, load_balance", [(2, True), (4, False), (8, True)])
def test_ring_matches_reference(n, load_balance):
  _check("ring", n, load_balance, block_q=32, block_k=32)


@pytest.mark.parametrize("n, load_balance", [(2, "striped"), (4, True)])
def test_ulysses_matches_reference(n, load_balance):
  _check("ulysses", n, load_balance, heads=8, kv_heads=4)


@pytest.mark.parametrize("n, ulysses_size, load_balance", [(4, 2, False), (8, 2, True)])
def test_hybrid_matches_reference(n, ulysses_size, load_balance):
  _check("hybrid", n, load_balance, heads=4, kv_heads=2, ulysses_size=ulysses_size)


def test_all_gather_matches_reference():
  _check("all_gather", 8, True)


def test_four_axis_mesh_batch_and_heads_sharded():
  # data=2 shards the batch, tensor=2 the heads, context=2 the sequence: specs come from the rules.
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=1, context=2, tensor=2))
  q, k, v, do, seg, frame = _inputs(3)
  attend = functools.partial(ra.ring_attention, segment_ids=seg, frame_ids=frame, mesh=mesh)
  got = jax.jit(lambda *a: _value_and_grads(attend, *a))(q, k, v, do)
  for g, r in zip(got, _reference(q, k, v, do, seg, frame)):
    np.testing.assert_allclose(g, r, **TOL)


def test_ambient_mesh_sequence_parallel_attention_in_jit():
  q, k, v, _, seg, frame = _inputs(4)
  mask = masks.token_mask(seg, frame)
  mesh = context_mesh(4)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v, m: ra.sequence_parallel_attention(q, k, v, m))(q, k, v, mask)
  np.testing.assert_allclose(got, _reference(q, k, v, q, seg, frame)[0], **TOL)


def test_fully_masked_steps_are_skipped_and_padding_rows_are_zero():
  # One short sample at the start, the rest padding: most ring steps meet no query interval.
  q, k, v, do, _, _ = _inputs(5)
  seg = np.zeros((2, S), np.int32)
  seg[:, :40] = 1
  frame = np.full((2, S), -1, np.int32)
  # Same configuration as test_ring_matches_reference[4-False]: reuses its compiled program.
  got = _parallel("ring", 4, False, block_q=32, block_k=32)(q, k, v, do, seg, frame)
  for g, r in zip(got, _reference(q, k, v, do, seg, frame)):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, r, **TOL)
  assert np.all(got[0][:, 40:] == 0)


def test_sharded_decode_matches_reference():
  rng = np.random.default_rng(6)
  b, t, cache = 2, 2, 256
  q = jnp.asarray(rng.standard_normal((b, t, 4, H)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, cache, 2, H)), jnp.float32) for _ in range(2))
  # Row 0 decodes at positions 100, 101; row 1 at 7, 8 (most of its cache slots are empty).
  pos = np.array([[100, 101], [7, 8]], np.int32)
  lo = np.zeros((b, t), np.int32)
  decode = jax.jit(functools.partial(ra.sharded_decode_attention, mesh=context_mesh(8)))
  got = decode(q, k, v, lo, pos)
  kidx = masks.key_indices(b, cache)
  allow = masks.allowed(lo, pos, kidx)[:, None]
  kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, kr, precision="highest") * H**-0.5
  p = jax.nn.softmax(jnp.where(allow, logits, -jnp.inf), axis=-1)
  ref = jnp.einsum("BNTS,BSNH->BTNH", p, vr, precision="highest")
  np.testing.assert_allclose(got, ref, **TOL)


def test_bad_shapes_name_the_padding():
  q, k, v, _, seg, frame = _inputs(7)
  cut = (x[:, : S - 4] for x in (q, k, v, seg, frame))
  q2, k2, v2, seg2, frame2 = cut
  with pytest.raises(ValueError, match=r"pad by 4 tokens to 288"):
    ra.ring_attention(q2, k2, v2, segment_ids=seg2, frame_ids=frame2, mesh=context_mesh(8))
  with pytest.raises(ValueError, match=r"pad by 2 tokens"):
    q3, k3, v3, seg3, frame3 = (x[:, : S - 2] for x in (q, k, v, seg, frame))
    ra.sequence_parallel_attention(q3, k3, v3, masks.token_mask(seg3, frame3), mesh=context_mesh(8))
  with pytest.raises(ValueError, match=r"kv heads K=2 to be a multiple of 4"):
    ra.ring_attention(
      q, k, v, segment_ids=seg, frame_ids=frame, mesh=context_mesh(4), strategy="ulysses"
    )
  with pytest.raises(ValueError, match=r"ulysses_size"):
    ra.ring_attention(
      q, k, v, segment_ids=seg, frame_ids=frame, mesh=context_mesh(4), strategy="hybrid"
    )
  with pytest.raises(ValueError, match=r"strategy="):
    ra.ring_attention(q, k, v, segment_ids=seg, frame_ids=frame, mesh=context_mesh(2), strategy="x")


def _ppermuted_dtypes(jaxpr) -> set:
  """dtypes of every ppermute operand in a jaxpr and its sub-jaxprs (scan, cond, shard_map...)."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "ppermute":
      found |= {str(x.aval.dtype) for x in eqn.invars}
    for param in eqn.params.values():
      for inner in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
        if hasattr(inner, "eqns"):
          found |= _ppermuted_dtypes(inner)
  return found


def test_bf16_kv_travel_in_bf16_and_grads_keep_dtypes():
  q, k, v, do, seg, frame = (
    x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in _inputs(8)
  )
  attend = functools.partial(
    ra.ring_attention, segment_ids=seg, frame_ids=frame, mesh=context_mesh(4)
  )
  fwd = jax.make_jaxpr(attend)(q, k, v).jaxpr
  assert _ppermuted_dtypes(fwd) == {"bfloat16", "int32"}
  grads = jax.eval_shape(lambda *a: _value_and_grads(attend, *a), q, k, v, do)
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 4


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_pallas_gpu_steps_match_reference_in_bf16(strategy):
  n = min(4, len(jax.devices()))
  if n < 2:
    pytest.skip("needs at least 2 GPUs")
  rng = np.random.default_rng(9)
  s = 2048
  seg, frame = random_layout(rng, 1, s)
  shapes = [(1, s, 4, 64), (1, s, 4, 64), (1, s, 4, 64), (1, s, 4, 64)]
  q, k, v, do = (jnp.asarray(rng.standard_normal(x), jnp.bfloat16) for x in shapes)
  attend = functools.partial(
    ra.ring_attention, segment_ids=seg, frame_ids=frame, mesh=context_mesh(n), strategy=strategy
  )
  got = jax.jit(lambda *a: _value_and_grads(attend, *a))(q, k, v, do)
  ref = _reference(*(x.astype(jnp.float32) for x in (q, k, v, do)), seg, frame)
  for name, g, r in zip(("o", "dq", "dk", "dv"), got, ref):
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
    assert err < 2e-2, f"{strategy} {name}: relative error {err}"
