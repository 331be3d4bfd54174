"""Vision -> language projector: LLaVA's mlp2x_gelu plus optional visual token reduction.

    features [B, P, C] --pixel_shuffle--> [B, P / r^2, C r^2] --(LayerNorm)--> Linear -> GELU
    -> Linear --avg_pool--> [B, P / (r w)^2, D]

- mlp2x_gelu (LLaVA-1.5, arXiv 2310.03744 section 3): two linear layers with the exact (erf) GELU
  between them, the projector of LLaVA-NeXT / LongVA.
- Pixel shuffle (InternVL 1.5, arXiv 2404.16821 section 3.1, `down_sample_ratio` 0.5): each r x r
  block of neighbouring patches becomes one token of r^2 times the width *before* the MLP, whose
  input then starts with a LayerNorm (InternVL's `mlp1`).
- Average pooling (LongVA, arXiv 2406.16852; notes vlm_methods.md section 1.1): a w x w average
  pool on the patch grid *after* the MLP, 24 x 24 = 576 -> 12 x 12 = 144 tokens per frame with
  w = 2. Like torch's `avg_pool2d`, a grid side that is not a multiple of w drops its last
  partial window.

Axis letters: B batch, P patches (a square grid, row-major), C vision width, D and E model width.
"""

from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from lcv.config import ProjectorConfig
from lcv.models.layers import constrain, param
from lcv.models.vision import layer_norm


def grid_side(num_patches: int) -> int:
  """Side of the square patch grid holding `num_patches` tokens; a clear error if not square."""
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(
      f"{num_patches=} is not a square patch grid; drop the class token from the vision "
      "features (VisionConfig.keep_class_token=False) before spatial pooling or pixel shuffle"
    )
  return side


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
  """InternVL's pixel shuffle (ps_version v2): r x r neighbours -> one wider token.

  Args:
    x: [B, P, C] on a square grid of side g (row-major), g a multiple of `factor` r.
    factor: r, patches merged per side (ratio 0.5 -> r = 2).

  Returns:
    [B, P / r^2, r^2 C]; token (i, j) concatenates x at grid (r i + a, r j + b) in (a, b) order.
  """
  g = grid_side(x.shape[1])
  if g % factor:
    raise ValueError(f"patch grid side {g} must be a multiple of the pixel-shuffle {factor=}")
  return einops.rearrange(
    x, "b (h a w c) d -> b (h w) (a c d)", a=factor, c=factor, h=g // factor, w=g // factor
  )


def avg_pool(x: jax.Array, window: int) -> jax.Array:
  """w x w average pool with stride w on the square patch grid (torch `avg_pool2d` semantics).

  Args:
    x: [B, P, D] on a square grid of side g.
    window: w; trailing rows / columns beyond the last full window are dropped.

  Returns:
    [B, (g // w)^2, D].
  """
  g = grid_side(x.shape[1])
  n = g // window
  if n == 0:
    raise ValueError(f"pool {window=} is larger than the patch grid side {g}")
  x = x.reshape(x.shape[0], g, g, x.shape[-1])[:, : n * window, : n * window]
  x = x.reshape(x.shape[0], n, window, n, window, x.shape[-1])
  # Mean in float32: bf16 features would lose bits in the w^2-term sum.
  pooled = jnp.mean(x.astype(jnp.float32), axis=(2, 4)).astype(x.dtype)
  return pooled.reshape(x.shape[0], n * n, x.shape[-1])


class Projector(nnx.Module):
  """mlp2x_gelu with optional pixel shuffle (before) and average pooling (after).

  Parameters: `norm_scale`, `norm_bias` [C r^2] (only with cfg.norm); `fc1_kernel` [C r^2, D],
  `fc1_bias` [D], `fc2_kernel` [D, D], `fc2_bias` [D]. Kernels are [in, out] (torch's weight
  transposed).
  """

  def __init__(self, cfg: ProjectorConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    init, zeros, ones = (
      nnx.initializers.lecun_normal(),
      nnx.initializers.zeros_init(),
      nnx.initializers.ones_init(),
    )
    c, d = cfg.mlp_in, cfg.out_dim
    if cfg.norm:
      self.norm_scale = param(rngs, ones, (c,), ("norm",), pd)
      self.norm_bias = param(rngs, zeros, (c,), ("norm",), pd)
    self.fc1_kernel = param(rngs, init, (c, d), ("vision_embed", "mlp"), pd)
    self.fc1_bias = param(rngs, zeros, (d,), ("mlp",), pd)
    self.fc2_kernel = param(rngs, init, (d, d), ("mlp", "embed"), pd)
    self.fc2_bias = param(rngs, zeros, (d,), ("embed",), pd)

  def tokens_out(self, num_patches: int) -> int:
    """Tokens per frame produced from `num_patches` vision tokens."""
    g = grid_side(num_patches) // self.cfg.shuffle_factor
    return (g // self.cfg.pool) ** 2

  def __call__(self, x: jax.Array) -> jax.Array:
    """Project vision features.

    Args:
      x: float[B, P, C] vision features (P a square grid unless no shuffle and no pooling).

    Returns:
      float[B, P', D] in cfg.dtype, P' = `tokens_out(P)`.
    """
    cfg = self.cfg
    if x.shape[-1] != cfg.in_dim:
      raise ValueError(f"feature width {x.shape[-1]} must equal ProjectorConfig.{cfg.in_dim=}")
    dtype = jnp.dtype(cfg.dtype)
    x = x.astype(dtype)
    if cfg.shuffle_factor > 1:
      x = pixel_shuffle(x, cfg.shuffle_factor)
    if cfg.norm:
      x = layer_norm(x, self.norm_scale[...], self.norm_bias[...], cfg.norm_eps)
    cast = lambda v: v[...].astype(dtype)
    x = jnp.einsum("BPC,CD->BPD", x, cast(self.fc1_kernel)) + cast(self.fc1_bias)
    x = constrain(jax.nn.gelu(x, approximate=False), ("frames", None, "act_mlp"))
    x = jnp.einsum("BPD,DE->BPE", x, cast(self.fc2_kernel)) + cast(self.fc2_bias)
    if cfg.pool > 1:
      x = avg_pool(x, cfg.pool)
    return x
