"""Projector: mlp2x_gelu math, InternVL pixel shuffle, LongVA 2 x 2 pooling, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcv.config import ProjectorConfig
from lcv.models import projector


def _internvl_pixel_shuffle(x, scale):
  """InternVL's `pixel_shuffle` (ps_version v2) on [N, h, w, C], written with numpy views."""
  n, w, h, c = x.shape
  x = x.reshape(n, w, int(h * scale), int(c / scale))
  x = x.transpose(0, 2, 1, 3)
  x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
  return x.transpose(0, 2, 1, 3)


def test_pixel_shuffle_matches_internvl():
  x = np.random.RandomState(0).randn(2, 6, 6, 5).astype(np.float32)
  want = _internvl_pixel_shuffle(x, 0.5).reshape(2, 9, 20)
  got = projector.pixel_shuffle(jnp.asarray(x.reshape(2, 36, 5)), 2)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_avg_pool_is_windowed_mean_and_drops_partial_windows():
  x = np.random.RandomState(1).randn(1, 25, 3).astype(np.float32)  # 5 x 5 grid
  got = np.asarray(projector.avg_pool(jnp.asarray(x), 2))
  grid = x.reshape(5, 5, 3)
  want = np.stack(
    [grid[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((0, 1)) for i in range(2) for j in range(2)]
  )
  np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-6)


def test_mlp2x_gelu_matches_numpy():
  cfg = ProjectorConfig(in_dim=8, out_dim=16)
  proj = projector.Projector(cfg, rngs=nnx.Rngs(0))
  proj.fc1_bias[...] = jnp.linspace(-1, 1, 16)
  x = np.random.RandomState(2).randn(2, 9, 8).astype(np.float32)
  h = x @ np.asarray(proj.fc1_kernel[...]) + np.asarray(proj.fc1_bias[...])
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))  # exact GELU
  want = h @ np.asarray(proj.fc2_kernel[...]) + np.asarray(proj.fc2_bias[...])
  np.testing.assert_allclose(np.asarray(proj(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  ("kwargs", "patches", "tokens"),
  [
    (dict(pool=2), 576, 144),  # LongVA: CLIP-L/336 24 x 24 -> 12 x 12
    (dict(pixel_shuffle=0.5, norm=True), 1024, 256),  # InternVL: 32 x 32 -> 16 x 16
    (dict(), 16, 16),
  ],
)
def test_token_counts(kwargs, patches, tokens):
  cfg = ProjectorConfig(in_dim=4, out_dim=8, **kwargs)
  proj = projector.Projector(cfg, rngs=nnx.Rngs(0))
  out = jax.eval_shape(proj, jax.ShapeDtypeStruct((2, patches, 4), jnp.float32))
  assert out.shape == (2, tokens, 8) and proj.tokens_out(patches) == tokens


def test_pool_after_mlp_and_finite():
  proj = projector.Projector(ProjectorConfig(in_dim=4, out_dim=8, pool=2), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(3).randn(1, 16, 4), jnp.float32)
  unpooled = projector.Projector(ProjectorConfig(in_dim=4, out_dim=8), rngs=nnx.Rngs(0))(x)
  out = proj(x)
  assert bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(out, projector.avg_pool(unpooled, 2), rtol=1e-6, atol=1e-6)


def test_parameters_carry_logical_axes():
  proj = projector.Projector(
    ProjectorConfig(in_dim=4, out_dim=8, norm=True, pixel_shuffle=0.5), rngs=nnx.Rngs(0)
  )
  names = {
    "/".join(map(str, path)): v.get_metadata()["out_sharding"]
    for path, v in nnx.to_flat_state(nnx.state(proj, nnx.Param))
  }
  assert names["fc1_kernel"] == ("vision_embed", "mlp")
  assert names["fc2_kernel"] == ("mlp", "embed")
  assert names["norm_scale"] == ("norm",)


def test_bad_input_errors():
  with pytest.raises(ValueError, match="not a square patch grid"):
    projector.avg_pool(jnp.zeros((1, 577, 4)), 2)  # class token left in
  with pytest.raises(ValueError, match="multiple of the pixel-shuffle"):
    projector.pixel_shuffle(jnp.zeros((1, 25, 4)), 2)
  with pytest.raises(ValueError, match="pixel_shuffle"):
    ProjectorConfig(pixel_shuffle=0.3)
  with pytest.raises(ValueError, match="pool"):
    ProjectorConfig(pool=0)
  proj = projector.Projector(ProjectorConfig(in_dim=4, out_dim=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="in_dim"):
    proj(jnp.zeros((1, 4, 5)))
