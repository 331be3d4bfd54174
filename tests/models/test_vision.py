"""Vision encoder: shapes per family, feature layer, position interpolation, chunked video
encoding, logical axes, and clear errors. Parity with transformers is in test_parity.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcv.config import VisionConfig
from lcv.models import vision

TINY_SIGLIP = dataclasses.replace(
  VisionConfig.variant("tiny"),
  class_token=False,
  pre_norm=False,
  post_norm=True,
  act="gelu_tanh",
  feature_layer=-1,
  patch_bias=True,
  norm_eps=1e-6,
)


def _pixels(*shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


@pytest.mark.parametrize(
  ("cfg", "tokens"),
  [
    (VisionConfig.variant("tiny"), 4),  # class token dropped
    (VisionConfig.variant("tiny", keep_class_token=True), 5),
    (TINY_SIGLIP, 4),
  ],
)
def test_shapes_and_finite(cfg, tokens):
  enc = vision.VisionEncoder(cfg, rngs=nnx.Rngs(0))
  out = enc(_pixels(2, 28, 28, 3))
  assert out.shape == (2, tokens, cfg.width) and out.dtype == jnp.float32
  assert bool(jnp.isfinite(out).all())
  assert enc.tokens_per_image() == tokens


def test_real_variants_shapes():
  for name, tokens in (("clip_l14_336", 576), ("siglip_so400m14_384", 729)):
    cfg = VisionConfig.variant(name)
    enc = nnx.eval_shape(lambda cfg=cfg: vision.VisionEncoder(cfg, rngs=nnx.Rngs(0)))
    assert enc.tokens_per_image() == tokens
    assert enc.blocks.q_kernel.shape == (cfg.depth, cfg.width, cfg.heads, cfg.head_dim)


def test_feature_layer_runs_only_the_needed_blocks():
  cfg = VisionConfig.variant("tiny", feature_layer=-1, keep_class_token=True)
  enc = vision.VisionEncoder(cfg, rngs=nnx.Rngs(0))
  px = _pixels(1, 28, 28, 3)
  last = enc(px)
  # Blocks past the feature layer must not matter: break the last block, read layer -2.
  enc.blocks.fc2_bias[...] = enc.blocks.fc2_bias[...].at[-1].set(1e3)
  enc.cfg = dataclasses.replace(cfg, feature_layer=-2)
  second = enc(px)
  enc.blocks.fc2_bias[...] = enc.blocks.fc2_bias[...].at[-1].set(0.0)
  enc.cfg = dataclasses.replace(cfg, feature_layer=1)
  np.testing.assert_allclose(enc(px), second, rtol=1e-6, atol=1e-6)
  assert not np.allclose(last, second)
  enc.cfg = dataclasses.replace(cfg, feature_layer=0)  # embeddings (after CLIP's pre-norm)
  np.testing.assert_allclose(enc(px), enc.embed(px), rtol=1e-6)


def test_bicubic_matrix():
  np.testing.assert_allclose(vision.bicubic_matrix(5, 5), np.eye(5), atol=1e-12)
  for n_in, n_out in ((4, 7), (7, 3)):
    m = vision.bicubic_matrix(n_in, n_out)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)  # constants are preserved
  # Upsampling by 2 with half-pixel centres: output 3 sits at source 1.25, so t = 1/4 and the
  # Keys taps with A = -0.75 (torch's kernel) are (-27, 225, 67, -9) / 256 on sources 0..3.
  np.testing.assert_allclose(vision.bicubic_matrix(4, 8)[3], np.array([-27, 225, 67, -9]) / 256)


def test_position_interpolation_other_sizes():
  enc = vision.VisionEncoder(VisionConfig.variant("tiny"), rngs=nnx.Rngs(0))
  assert enc(_pixels(1, 42, 56, 3)).shape == (1, 12, 32)
  table = enc.pos_embed[1:]
  np.testing.assert_array_equal(vision.interpolate_positions(table, 2, 2, 2), table)


def test_video_chunks_equal_per_frame_encoding():
  enc = vision.VisionEncoder(VisionConfig.variant("tiny", frame_chunk=3), rngs=nnx.Rngs(0))
  video = _pixels(2, 5, 28, 28, 3, seed=1)  # 10 frames: 4 chunks of 3, the last one padded
  out = jax.jit(lambda m, v: m.encode_frames(v))(enc, video)
  want = enc(video.reshape(10, 28, 28, 3)).reshape(2, 5, 4, 32)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  pooled = enc.encode_frames(video, fn=lambda x: x.mean(1, keepdims=True))
  np.testing.assert_allclose(pooled, want.mean(2, keepdims=True), rtol=1e-5, atol=1e-5)


def test_parameters_carry_logical_axes():
  enc = vision.VisionEncoder(VisionConfig.variant("tiny"), rngs=nnx.Rngs(0))
  names = {
    "/".join(map(str, path)): v.get_metadata()["out_sharding"]
    for path, v in nnx.to_flat_state(nnx.state(enc, nnx.Param))
  }
  assert all(names.values()), names
  assert names["blocks/q_kernel"] == ("layers", "vision_embed", "heads", "head_dim")
  assert names["blocks/fc1_kernel"] == ("layers", "vision_embed", "mlp")
  assert names["pos_embed"] == ("patches", "vision_embed")
  assert all(v[0] == "layers" for k, v in names.items() if k.startswith("blocks/"))


def test_bad_input_errors():
  enc = vision.VisionEncoder(VisionConfig.variant("tiny"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="multiple of the patch size 14"):
    enc(_pixels(1, 30, 28, 3))
  with pytest.raises(ValueError, match="channels-last"):
    enc(_pixels(1, 3, 28, 28))
  with pytest.raises(ValueError, match=r"\[B, F, H, W, C\]"):
    enc.encode_frames(_pixels(1, 28, 28, 3))
  cropping = vision.VisionEncoder(
    VisionConfig.variant("tiny", drop_remainder=True), rngs=nnx.Rngs(0)
  )
  px = _pixels(1, 30, 29, 3)
  np.testing.assert_allclose(cropping(px), cropping(px[:, :28, :28]), rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of"):
    VisionConfig(image_size=30, patch=14)
  with pytest.raises(ValueError, match="feature_layer"):
    VisionConfig.variant("tiny", feature_layer=3)
  with pytest.raises(ValueError, match="unknown vision variant"):
    VisionConfig.variant("vit_huge")


def test_remat_keeps_values_and_gradients():
  px = _pixels(1, 28, 28, 3, seed=2)

  def grads(remat):
    enc = vision.VisionEncoder(VisionConfig.variant("tiny", remat=remat), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(enc)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(px) ** 2)
    return jax.jit(jax.grad(loss))(params)

  plain, remat = grads(False), grads(True)
  assert float(jnp.abs(plain["blocks"]["q_kernel"][...]).max()) > 0  # the tower is trainable
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sharded_equals_unsharded():
  """fsdp x tensor on 8 CPU devices: parameters laid out by the logical rules, same features."""
  from lcv.config import MeshConfig
  from lcv.parallel import mesh as mesh_lib
  from lcv.parallel import rules

  cfg = VisionConfig.variant("tiny", frame_chunk=4)  # a multiple of data x fsdp = 4
  video = _pixels(2, 4, 28, 28, 3, seed=3)
  want = vision.VisionEncoder(cfg, rngs=nnx.Rngs(0)).encode_frames(video)
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, context=1, tensor=2))
  with jax.set_mesh(mesh), rules.use_rules():
    enc = vision.VisionEncoder(cfg, rngs=nnx.Rngs(0))
    assert enc.blocks.fc1_kernel[...].sharding.spec[2] == "tensor"
    got = jax.jit(lambda m, v: m.encode_frames(v))(enc, video)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_frames_split_over_context_equal_unsharded():
  """fsdp 2 x context 4: each chunk's frames are spread over all 8 devices (context devices encode
  different frames), 10 frames pad to chunks of 8, the features are unchanged, and each device
  does about a third of the tower FLOPs it does with the frames split over fsdp only."""
  from lcv.config import MeshConfig
  from lcv.parallel import mesh as mesh_lib
  from lcv.parallel import rules

  cfg = VisionConfig.variant("tiny", frame_chunk=6)  # rounded up to a multiple of the split
  video = _pixels(2, 5, 28, 28, 3, seed=4)
  want = vision.VisionEncoder(cfg, rngs=nnx.Rngs(0)).encode_frames(video)
  flops = {}
  for context in (1, 4):
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=2, context=context, tensor=1),
                              jax.devices()[: 2 * context])  # fmt: skip
    with jax.set_mesh(mesh), rules.use_rules():
      assert rules.shards("frames") == 2 * context and rules.shards("batch") == 2
      enc = vision.VisionEncoder(cfg, rngs=nnx.Rngs(0))
      fn = jax.jit(lambda m, v: m.encode_frames(v))
      flops[context] = fn.lower(enc, video).compile().cost_analysis()["flops"]
      got = fn(enc, video)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # fsdp only: 2 chunks of 6 frames, 3 per device each; with context: 2 chunks of 8, 1 each.
  assert flops[4] < 0.5 * flops[1], flops
