"""Decoder LLM: shapes, scanned == unscanned, remat policies, sharding, FLOP accounting and input
validation, on the tiny variant (CPU, 8 emulated devices). Causality by gradients runs through the
whole VLM in test_vlm.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh

from lcv import masks, positions
from lcv.config import DecoderConfig
from lcv.models import decoder

B, S = 2, 16


def _layout():
  """Two packed samples per row (text, a 3-token frame, a 4-token frame, text) plus padding."""
  seg = np.array([[1] * 9 + [2] * 5 + [0] * 2, [1] * 4 + [2] * 12])
  frame = np.full((B, S), -1)
  frame[0, 2:5], frame[0, 5:9] = 0, 1
  frame[1, 6:9], frame[1, 9:13] = 0, 1
  seg, frame = jnp.asarray(seg, jnp.int32), jnp.asarray(frame, jnp.int32)
  mask = masks.token_mask(seg, frame, frame_bidirectional=True)
  return seg, frame, mask, positions.one_d(seg)


def _model(cfg, seed=0):
  return decoder.Decoder(cfg, rngs=nnx.Rngs(seed))


def _run(model, *args, **kwargs):
  """The model's forward under one jit (eager NNX dispatch is slow on CPU)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a, **kwargs))(state, *args)


def _inputs(cfg, seed=1):
  return jax.random.normal(jax.random.key(seed), (B, S, cfg.embed_dim), jnp.float32)


def test_shapes_and_finite():
  cfg = DecoderConfig.variant("tiny", scan_layers=False, dtype="bfloat16")
  model = _model(cfg)
  _, _, mask, pos = _layout()
  h = _run(model, _inputs(cfg), pos, mask)
  assert h.shape == (B, S, cfg.embed_dim) and h.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(h.astype(jnp.float32))))
  logits = _run(model, _inputs(cfg), pos, mask, logits_at=jnp.array([[0, 8], [3, 15]]))
  assert logits.shape == (B, 2, cfg.vocab_size) and logits.dtype == jnp.float32
  assert len(model.layers) == cfg.num_layers
  params = nnx.state(model, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_scanned_equals_unscanned():
  """The same seed gives the same parameters stacked or not (unstacked layers are slices of
  the stacked init), with per-layer axis names, and the same outputs."""
  cfg = DecoderConfig.variant("tiny")
  scanned = _model(cfg)
  looped = _model(dataclasses.replace(cfg, scan_layers=False))
  stacked = nnx.to_pure_dict(nnx.state(scanned.layers, nnx.Param))
  for i, block in enumerate(looped.layers):
    got = nnx.to_pure_dict(nnx.state(block, nnx.Param))
    jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a, b[i]), got, stacked)
    for _, v in nnx.to_flat_state(nnx.state(block, nnx.Param)):
      meta = v.get_metadata()  # the axis names' key differs across flax versions
      names = next(meta[k] for k in ("out_sharding", "sharding_names", "sharding") if meta.get(k))
      assert len(names) == v[...].ndim and "layers" not in names, (names, v[...].shape)
  for name in ("embed", "final_norm"):
    a, b = (nnx.to_pure_dict(nnx.state(getattr(m, name))) for m in (looped, scanned))
    jax.tree.map(np.testing.assert_array_equal, a, b)
  np.testing.assert_array_equal(looped.lm_head[...], scanned.lm_head[...])
  _, _, mask, pos = _layout()
  x = _inputs(cfg)
  np.testing.assert_allclose(
    _run(looped, x, pos, mask), _run(scanned, x, pos, mask), atol=1e-5, rtol=1e-5
  )


def test_remat_policies_agree():
  _, _, mask, pos = _layout()
  grads = {}
  # "offload" is "dots_saveable" on CPU (no pinned host memory space), so this covers both.
  for remat in ("none", "full", "attention", "dots_attention", "offload"):
    cfg = DecoderConfig.variant("tiny", remat=remat)
    model = _model(cfg)
    graphdef, params = nnx.split(model)

    def loss(params, x, graphdef=graphdef):
      h = nnx.merge(graphdef, params)(x, pos, mask)
      return jnp.sum(jnp.square(h))

    grads[remat] = jax.jit(jax.grad(loss))(params, _inputs(cfg))
  for remat in ("full", "attention", "offload"):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
      grads[remat],
      grads["none"],
    )


@pytest.mark.parametrize("scan_layers", [True, False])
def test_sharded_equals_unsharded(scan_layers):
  cfg = DecoderConfig.variant("tiny", scan_layers=scan_layers)
  _, _, mask, pos = _layout()
  x = jnp.concatenate([_inputs(cfg)] * 2)  # batch 4 = fsdp size
  pos2 = positions.Positions(jnp.concatenate([pos.ticks] * 2))
  mask2 = masks.TokenMask(*(jnp.concatenate([m] * 2) for m in mask))
  expected = _run(_model(cfg), x, pos2, mask2)

  from lcv.parallel import rules

  devices = np.array(jax.devices()[:8]).reshape(1, 4, 1, 2)
  mesh = Mesh(devices, ("data", "fsdp", "context", "tensor"), axis_types=(AxisType.Auto,) * 4)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules.RULES):
    model = _model(cfg)
    if scan_layers:
      q_spec = model.layers.attn.q_proj[...].sharding.spec[1:]  # [L, D, N, H]
    else:
      q_spec = model.layers[1].attn.q_proj[...].sharding.spec  # [D, N, H]
    assert q_spec[0] in ("fsdp", ("fsdp", "context")) and q_spec[1] == "tensor", q_spec
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, x, pos, mask: nnx.merge(graphdef, p)(x, pos, mask))
    got = run(params, x, pos2, mask2)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_and_flops(tied):
  cfg = DecoderConfig.variant("tiny", tie_embeddings=tied)
  model = _model(cfg)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == decoder.param_count(cfg)
  d, layers, v = cfg.embed_dim, cfg.num_layers, cfg.vocab_size
  biases = layers * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
  matmul = n - 2 * layers * d - d - biases - (0 if tied else v * d)
  assert decoder.flops_per_token(cfg, 0, training=False) == 2 * matmul
  attn = decoder.flops_per_token(cfg, 1000, mask_density=0.5) - decoder.flops_per_token(cfg, 0)
  assert attn == pytest.approx(3 * 4 * layers * cfg.num_heads * cfg.head_dim * 1000 * 0.5)


def test_variant_rows_match_published_sizes():
  """Parameter counts of the real rows equal the released checkpoints' (embeddings included)."""
  published = {
    "qwen2-0.5b": 494_032_768,
    "qwen2-1.5b": 1_543_714_304,
    "qwen2-7b": 7_615_616_512,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
  }
  for name, count in published.items():
    assert decoder.param_count(DecoderConfig.variant(name)) == count, name


def test_attention_remat_runs_each_attention_forward_once():
  """remat="attention": the backward reuses the kernels' (o, lse) instead of re-running the
  forward kernel (counted in the jaxpr of the gradient: Pallas GPU kernel, interpret mode)."""
  _, _, mask, pos = _layout()
  counts = {}
  for remat in ("full", "attention", "dots_saveable", "dots_attention"):
    cfg = DecoderConfig.variant("tiny", remat=remat, attention_impl="pallas_gpu")
    graphdef, params = nnx.split(_model(cfg))

    def loss(params, x, graphdef=graphdef):
      return jnp.sum(jnp.square(nnx.merge(graphdef, params)(x, pos, mask)))

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, _inputs(cfg)))
    counts[remat] = jaxpr.count("name=lcv_flash_fwd")
  assert counts == {"full": 2, "attention": 1, "dots_saveable": 2, "dots_attention": 1}, counts


@pytest.mark.gpu
@pytest.mark.parametrize("remat", ["none", "attention", "dots_attention", "full"])
def test_compiled_step_runs_each_attention_forward_once(remat):
  """What XLA compiles, not just the jaxpr: one forward kernel call per layer when (o, lse) are
  saved (XLA's dynamic-slice fusion once cloned it to write the scan's residual stack), two with
  full remat (the backward's recompute). Hopper-kernel shapes (bf16, head dim 128), 4 layers."""
  seg = jnp.ones((1, 512), jnp.int32)
  mask = masks.token_mask(seg, jnp.full((1, 512), -1, jnp.int32))
  cfg = DecoderConfig.variant(
    "tiny", remat=remat, dtype="bfloat16", head_dim=128, num_layers=4, embed_dim=256
  )
  graphdef, params = nnx.split(_model(cfg))
  x = jax.random.normal(jax.random.key(0), (1, 512, cfg.embed_dim), jnp.bfloat16)

  def loss(params, x):
    y = nnx.merge(graphdef, params)(x, positions.one_d(seg), mask)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
  calls = [
    line
    for line in hlo.splitlines()
    if "custom-call(" in line and ("lcv_hopper_fwd" in line or "lcv_flash_fwd" in line)
  ]
  assert len(calls) == (2 if remat == "full" else 1), calls


def test_remat_policy_names():
  cp = jax.checkpoint_policies
  assert decoder.remat_policy("dots_saveable") is cp.dots_with_no_batch_dims_saveable
  assert decoder.remat_policy("full") is None
  with pytest.raises(ValueError, match="remat="):
    decoder.remat_policy("everything")


def test_bad_inputs_raise():
  cfg = DecoderConfig.variant("tiny")
  model = _model(cfg)
  _, _, mask, pos = _layout()
  with pytest.raises(ValueError, match="positions.ticks.shape"):
    model(_inputs(cfg), positions.Positions(pos.ticks[:, :-1]), mask)
  with pytest.raises(ValueError, match="input width"):
    model(jnp.zeros((B, S, 8)), pos, mask)
  with pytest.raises(ValueError, match="num_kv_heads"):
    DecoderConfig.variant("tiny", num_heads=3)
  with pytest.raises(ValueError, match="unknown decoder variant"):
    DecoderConfig.variant("llama9")
  with pytest.raises(ValueError, match="remat"):
    DecoderConfig.variant("tiny", remat="some")


def test_logn_scaling_is_identity_up_to_its_length_and_scales_logits_beyond(monkeypatch):
  """LogN-scaling: factor max(1, ln n / ln L) for a query seeing n keys (counted from its
  interval, packing and frame blocks included); with L >= every row's key count the decoder is
  unchanged, with a small L it equals attention on queries pre-multiplied by the factor."""
  from lcv import attention

  _, _, mask, pos = _layout()
  n = np.asarray(mask.hi - mask.lo + 1)
  want = np.where(n > 4, np.log(np.maximum(n, 1)) / np.log(4), 1.0)
  np.testing.assert_allclose(attention.logn_scale(mask.lo, mask.hi, 4), want, rtol=1e-6)
  assert float(attention.logn_scale(mask.lo, mask.hi, 4)[0, -1]) == 1.0  # padding row: no keys
  base = DecoderConfig.variant("tiny")
  x = _inputs(base)
  run = lambda L: _run(_model(dataclasses.replace(base, logn_scale_len=L)), x, pos, mask)  # noqa: E731
  h0, h_long, h4 = run(0), run(S), run(4)
  np.testing.assert_array_equal(np.asarray(h_long), np.asarray(h0))
  assert not np.allclose(np.asarray(h4), np.asarray(h0), atol=1e-4)
  # The same model without scaling, its attention fed pre-scaled queries, is the scaled model.
  orig = attention.attend
  factor = jnp.asarray(want, jnp.float32)[:, :, None, None]
  monkeypatch.setattr(attention, "attend", lambda q, *a, **kw: orig(q * factor, *a, **kw))
  np.testing.assert_allclose(np.asarray(h4), np.asarray(run(0)), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="logn_scale_len"):
    DecoderConfig.variant("tiny", logn_scale_len=1)
