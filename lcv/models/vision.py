"""ViT image / video encoder: the CLIP and SigLIP towers of LLaVA-style VLMs, in Flax NNX.

One architecture, two checkpoint families as rows of `lcv.config.VISION_VARIANTS`:
- CLIP ViT-L/14-336 (arXiv 2103.00020): class token, LayerNorm after the embeddings
  (`pre_layrnorm`), quick-GELU MLP; LLaVA and LongVA read the *second-to-last* block's output and
  drop the class token (576 tokens at 336 px).
- SigLIP so400m/14 (arXiv 2303.15343, shape-optimised 2305.13035): no class token, tanh-GELU,
  LayerNorm on the last block's output (729 tokens at 384 px).

Blocks are pre-LN transformer layers with full bidirectional attention, stacked along a leading
"layers" axis and run with `lax.scan`; only the blocks up to `feature_layer` run. Other image sizes
interpolate the position table bicubically (torch `interpolate(mode="bicubic",
align_corners=False)` exactly, the class position kept as is), as Hugging Face's
`interpolate_pos_encoding` does. Videos fold frames into the batch and run `frame_chunk` frames
per step of a `lax.map`, so thousands of frames never hold more than one chunk of activations.

Axis letters: B batch, P patches (+ class token), D width, N heads, H head dim, F the MLP width
in einsums and the frame count in video shapes (as in the model contract), C channels. Pixels are
channels-last float[B, Hpx, Wpx, C].
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcv import attention, masks
from lcv.config import VisionConfig
from lcv.models.layers import constrain, param
from lcv.parallel import rules


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis, statistics in float32, result in x.dtype."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, -1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias
  return y.astype(x.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
  """The MLP nonlinearity of a `VisionConfig.act` name."""
  if name == "quick_gelu":  # CLIP's sigmoid approximation of GELU.
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu_tanh":
    return jax.nn.gelu(x, approximate=True)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  raise ValueError(f"unknown activation {name!r}; use quick_gelu, gelu_tanh or gelu")


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Keys cubic convolution weights of the 4 taps at offsets -1..2, A = -0.75 (torch's choice)."""
  a = -0.75

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """float64[n_out, n_in] that resizes a 1-D signal like torch bicubic, align_corners=False.

  Half-pixel source coordinates, edge taps clamped, no antialiasing (also when shrinking), so
  the 2-D resize W_h @ grid @ W_w^T equals `torch.nn.functional.interpolate(..., "bicubic")`.
  """
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src)
  w = _cubic_weights(src - base)
  m = np.zeros((n_out, n_in))
  for k in range(4):
    idx = np.clip(base.astype(np.int64) + k - 1, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), w[:, k])
  return m


def interpolate_positions(table: jax.Array, grid: int, out_h: int, out_w: int) -> jax.Array:
  """Resize a [grid * grid, D] position table to [out_h * out_w, D] (bicubic, row-major)."""
  if (out_h, out_w) == (grid, grid):
    return table
  wh = jnp.asarray(bicubic_matrix(grid, out_h), jnp.float32)
  ww = jnp.asarray(bicubic_matrix(grid, out_w), jnp.float32)
  t = table.astype(jnp.float32).reshape(grid, grid, -1)
  # Separable resize: rows with wh, columns with ww (letters here are grid rows / columns).
  out = jnp.einsum("ya,xb,abD->yxD", wh, ww, t, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(out_h * out_w, -1).astype(table.dtype)


class Block(nnx.Module):
  """Pre-LN transformer layer: x + attn(ln1(x)), then + mlp(ln2(x)).

  Parameters (kernels [in, ..., out], torch's weights transposed): `ln{1,2}_{scale,bias}` [D];
  `{q,k,v}_kernel` [D, N, H], `{q,k,v}_bias` [N, H]; `o_kernel` [N, H, D], `o_bias` [D];
  `fc1_kernel` [D, F], `fc1_bias` [F]; `fc2_kernel` [F, D], `fc2_bias` [D].
  """

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, h, f = cfg.width, cfg.heads, cfg.head_dim, cfg.mlp
    pd = cfg.param_dtype
    zeros, ones = nnx.initializers.zeros_init(), nnx.initializers.ones_init()
    dense = nnx.initializers.lecun_normal()
    qkv_init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    o_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    qkv_names = ("vision_embed", "heads", "head_dim")
    self.ln1_scale = param(rngs, ones, (d,), ("norm",), pd)
    self.ln1_bias = param(rngs, zeros, (d,), ("norm",), pd)
    self.q_kernel = param(rngs, qkv_init, (d, n, h), qkv_names, pd)
    self.q_bias = param(rngs, zeros, (n, h), ("heads", "head_dim"), pd)
    self.k_kernel = param(rngs, qkv_init, (d, n, h), qkv_names, pd)
    self.k_bias = param(rngs, zeros, (n, h), ("heads", "head_dim"), pd)
    self.v_kernel = param(rngs, qkv_init, (d, n, h), qkv_names, pd)
    self.v_bias = param(rngs, zeros, (n, h), ("heads", "head_dim"), pd)
    self.o_kernel = param(rngs, o_init, (n, h, d), ("heads", "head_dim", "vision_embed"), pd)
    self.o_bias = param(rngs, zeros, (d,), ("vision_embed",), pd)
    self.ln2_scale = param(rngs, ones, (d,), ("norm",), pd)
    self.ln2_bias = param(rngs, zeros, (d,), ("norm",), pd)
    self.fc1_kernel = param(rngs, dense, (d, f), ("vision_embed", "mlp"), pd)
    self.fc1_bias = param(rngs, zeros, (f,), ("mlp",), pd)
    self.fc2_kernel = param(rngs, dense, (f, d), ("mlp", "vision_embed"), pd)
    self.fc2_bias = param(rngs, zeros, (d,), ("vision_embed",), pd)

  def __call__(self, x: jax.Array, mask: masks.TokenMask) -> jax.Array:
    """x: [B, P, D] in cfg.dtype -> [B, P, D]; `mask` lets every token see every token."""
    cfg = self.cfg
    cast = lambda v: v[...].astype(x.dtype)
    y = layer_norm(x, self.ln1_scale[...], self.ln1_bias[...], cfg.norm_eps)
    q = jnp.einsum("BPD,DNH->BPNH", y, cast(self.q_kernel)) + cast(self.q_bias)
    k = jnp.einsum("BPD,DNH->BPNH", y, cast(self.k_kernel)) + cast(self.k_bias)
    v = jnp.einsum("BPD,DNH->BPNH", y, cast(self.v_kernel)) + cast(self.v_bias)
    # Patch axes stay unsharded (None, not "length"): an image's 577 tokens are short, rarely
    # divide the context axis, and frames already spread over "batch".
    q, k, v = (constrain(t, ("frames", None, "act_heads", None)) for t in (q, k, v))
    impl = cfg.attention_impl
    if impl == "auto" and jax.default_backend() == "gpu" and x.dtype in (jnp.bfloat16, jnp.float16):
      impl = "cudnn"
    # cuDNN cannot inspect a traced mask; this one is full by construction (`__call__`).
    full = {"full_only": True} if impl == "cudnn" else {}
    o = attention.attend(q, k, v, mask=mask, kv_mask=mask, impl=impl, **full)
    x = x + jnp.einsum("BPNH,NHD->BPD", o, cast(self.o_kernel)) + cast(self.o_bias)
    y = layer_norm(x, self.ln2_scale[...], self.ln2_bias[...], cfg.norm_eps)
    y = jnp.einsum("BPD,DF->BPF", y, cast(self.fc1_kernel)) + cast(self.fc1_bias)
    y = constrain(activation(cfg.act, y), ("frames", None, "act_mlp"))
    x = x + jnp.einsum("BPF,FD->BPD", y, cast(self.fc2_kernel)) + cast(self.fc2_bias)
    return constrain(x, ("frames", None, "act_embed"))


class VisionEncoder(nnx.Module):
  """ViT tower: pixels -> patch features of `feature_layer`.

  Parameters: `patch_kernel` [p, p, C, D] (+ `patch_bias` [D]), `class_embed` [D] (class token
  rows only), `pos_embed` [P, D] (P = grid^2, + 1 with a class token, class first),
  `pre_norm_{scale,bias}`, `post_norm_{scale,bias}` (per config), and `blocks`: one `Block` whose
  parameters carry a leading "layers" axis of size depth.
  """

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p, c = cfg.width, cfg.patch, cfg.channels
    pd = cfg.param_dtype
    zeros, ones = nnx.initializers.zeros_init(), nnx.initializers.ones_init()
    patch_init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
    self.patch_kernel = param(
      rngs, patch_init, (p, p, c, d), (None, None, None, "vision_embed"), pd
    )
    if cfg.patch_bias:
      self.patch_bias = param(rngs, zeros, (d,), ("vision_embed",), pd)
    small = nnx.initializers.normal(0.02)
    if cfg.class_token:
      self.class_embed = param(rngs, small, (d,), ("vision_embed",), pd)
    n_pos = cfg.grid**2 + int(cfg.class_token)
    self.pos_embed = param(rngs, small, (n_pos, d), ("patches", "vision_embed"), pd)
    if cfg.pre_norm:
      self.pre_norm_scale = param(rngs, ones, (d,), ("norm",), pd)
      self.pre_norm_bias = param(rngs, zeros, (d,), ("norm",), pd)
    if cfg.post_norm:
      self.post_norm_scale = param(rngs, ones, (d,), ("norm",), pd)
      self.post_norm_bias = param(rngs, zeros, (d,), ("norm",), pd)

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stack(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = stack(rngs)

  def grid_of(self, height: int, width: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of an image; a clear error when the size does not fit the patch."""
    p = self.cfg.patch
    if (height % p or width % p) and not self.cfg.drop_remainder:
      raise ValueError(
        f"image size {height}x{width} must be a multiple of the patch size {p}: resize to "
        f"{height // p * p}x{width // p * p} or {-(-height // p) * p}x{-(-width // p) * p}, or "
        "set VisionConfig.drop_remainder=True to ignore trailing pixels like a strided conv"
      )
    if height < p or width < p:
      raise ValueError(f"image size {height}x{width} is smaller than one {p}x{p} patch")
    return height // p, width // p

  def tokens_per_image(self, height: int | None = None, width: int | None = None) -> int:
    """Feature tokens per image of the given size (default: cfg.image_size)."""
    gh, gw = self.grid_of(height or self.cfg.image_size, width or self.cfg.image_size)
    return gh * gw + int(self.cfg.keep_class_token)

  def embed(self, pixels: jax.Array) -> jax.Array:
    """Patch + class + position embeddings (+ pre-norm): float[B, Hpx, Wpx, C] -> [B, P, D]."""
    cfg = self.cfg
    if pixels.ndim != 4 or pixels.shape[-1] != cfg.channels:
      raise ValueError(
        f"pixels must be channels-last [B, H, W, C={cfg.channels}]; got shape {pixels.shape}"
      )
    b, height, width, c = pixels.shape
    gh, gw = self.grid_of(height, width)
    p, dt = cfg.patch, jnp.dtype(cfg.dtype)
    x = pixels[:, : gh * p, : gw * p].astype(dt)
    x = einops.rearrange(x, "b (h i) (w j) c -> b (h w) (i j c)", i=p, j=p)
    kernel = self.patch_kernel[...].astype(dt).reshape(p * p * c, -1)
    x = jnp.einsum("BPC,CD->BPD", x, kernel)
    if cfg.patch_bias:
      x = x + self.patch_bias[...].astype(dt)
    table = self.pos_embed[...]
    if cfg.class_token:
      cls_pos, table = table[:1], table[1:]
    pos = interpolate_positions(table, cfg.grid, gh, gw).astype(dt)
    x = x + pos[None]
    if cfg.class_token:
      cls = (self.class_embed[...] + cls_pos[0]).astype(dt)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, x.shape[-1])), x], axis=1)
    if cfg.pre_norm:
      x = layer_norm(x, self.pre_norm_scale[...], self.pre_norm_bias[...], cfg.norm_eps)
    return x

  def __call__(self, pixels: jax.Array, *, unroll: bool = False) -> jax.Array:
    """Features of images.

    Args:
      pixels: float[B, Hpx, Wpx, C], already normalised with the checkpoint's mean / std.
      unroll: unroll the loop over blocks (`encode_frames` does, see there).

    Returns:
      float[B, P, D] in cfg.dtype: the `feature_layer` hidden state (post-normed when
      cfg.post_norm), class token dropped unless cfg.keep_class_token.
    """
    cfg = self.cfg
    x = self.embed(pixels)
    n = cfg.num_layers_run
    if n:
      b, t = x.shape[:2]
      # One segment, one frame, bidirectional: every patch sees every patch.
      mask = masks.token_mask(jnp.ones((b, t), jnp.int32), jnp.zeros((b, t), jnp.int32), True)
      graph, params = nnx.split(self.blocks)
      params = jax.tree.map(lambda a: a[:n], params)

      def body(x, layer_params):
        return nnx.merge(graph, layer_params)(x, mask), None

      if cfg.remat:
        body = jax.checkpoint(body)
      x, _ = jax.lax.scan(body, x, params, unroll=unroll)
    if cfg.post_norm:
      x = layer_norm(x, self.post_norm_scale[...], self.post_norm_bias[...], cfg.norm_eps)
    if cfg.class_token and not cfg.keep_class_token:
      x = x[:, 1:]
    return x

  def encode_frames(self, pixels: jax.Array, fn=None) -> jax.Array:
    """Features of videos, frames folded into the batch and encoded `frame_chunk` at a time.

    Args:
      pixels: float[B, F, Hpx, Wpx, C].
      fn: optional map applied to each chunk's features [chunk, P, D] -> [chunk, P', D'] inside
        the loop (the projector, so only projected tokens are kept).

    Returns:
      float[B, F, P', D'] (P', D' = P, D without `fn`).
    """
    if pixels.ndim != 5:
      raise ValueError(f"video pixels must be [B, F, H, W, C]; got shape {pixels.shape}")
    b, f = pixels.shape[:2]
    frames = pixels.reshape(b * f, *pixels.shape[2:])
    # Each chunk's frames are split over the mesh's "frames" axes (data x fsdp x context), so the
    # chunk is a multiple of that split. The frames are spread evenly over the fewest steps of
    # at most `frame_chunk` frames, so padding is a few frames, not up to a whole chunk (226
    # frames on one device: 8 steps of 29, not 8 of 32, 13% of the tower's work).
    ways = rules.shards("frames")
    per_device = -(-(b * f) // ways)
    steps = -(-per_device // max(self.cfg.frame_chunk // ways, 1))
    chunk = -(-per_device // steps) * ways
    pad = (-(b * f)) % chunk
    frames = jnp.pad(frames, ((0, pad),) + ((0, 0),) * 3)
    frames = frames.reshape(-1, chunk, *frames.shape[1:])
    graph, state = nnx.split(self)

    def one(chunk_pixels):
      chunk_pixels = constrain(chunk_pixels, ("frames", None, None, None))
      # Blocks unrolled: each block's weights are then static slices of loop-invariant arrays
      # that XLA may hoist out of this frame loop. Rolled, every (chunk, block) step sliced them
      # afresh: ~11 device copies per step, 2,000 per 32K training step (39 ms, H200); unrolled,
      # the tower's forward took 0.191 s instead of 0.196 s there.
      out = nnx.merge(graph, state)(chunk_pixels, unroll=True)
      return out if fn is None else fn(out)

    out = jax.lax.map(one, frames)
    out = out.reshape(-1, *out.shape[2:])[: b * f]
    return out.reshape(b, f, *out.shape[1:])
