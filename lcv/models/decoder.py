"""Llama / Qwen2 decoder LLM in Flax NNX: RMSNorm, SwiGLU, grouped-query attention with optional
qkv bias, tied or untied LM head, RoPE from exact positions, stacked and scanned layers.

The decoder takes embeddings, not token ids, so the VLM can splice visual tokens in first
(`lcv.models.vlm`); `Decoder.embed` is the token table. Attention goes only through
`lcv.attention.attend` with the interval mask (`lcv.masks.TokenMask`), RoPE only through
`lcv.rope.apply_rope`. The LM head runs only where asked (`logits_at`), so a 1M-token forward
never forms [S, V]; training uses `lcv.models.loss.chunked_cross_entropy` on the hidden states.

Parameter tree (stable names; the Hugging Face import maps onto it). With `scan_layers` every
`layers.*` leaf has a leading L axis ("layers"); without it `layers` is a list (`layers.0...`).

    embed.embedding               [V, D]     ("vocab", "embed")       HF embed_tokens.weight
    layers.input_norm.scale       [L, D]     ("layers", "norm")       input_layernorm.weight
    layers.attn.q_proj            [L, D, N, H] (.., "embed", "heads", "head_dim")   q_proj.weight^T
    layers.attn.k_proj            [L, D, K, H] (.., "embed", "kv_heads", "head_dim")
    layers.attn.v_proj            [L, D, K, H] (.., "embed", "kv_heads", "head_dim")
    layers.attn.q_bias            [L, N, H]  (qkv_bias only)          q_proj.bias
    layers.attn.k_bias, v_bias    [L, K, H]  (qkv_bias only)
    layers.attn.o_proj            [L, N, H, D] (.., "heads", "head_dim", "embed")   o_proj.weight^T
    layers.post_attn_norm.scale   [L, D]                              post_attention_layernorm
    layers.mlp.gate_proj, up_proj [L, D, F]  (.., "embed", "mlp")
    layers.mlp.down_proj          [L, F, D]  (.., "mlp", "embed")
    final_norm.scale              [D]                                 model.norm.weight
    lm_head                       [D, V]     ("embed", "vocab")       lm_head.weight^T (untied only)

Axis letters: B batch, T query length, S key length, N q-heads, K kv-heads, H head dim, D model
dim, F mlp dim, V vocab, L layers (or logits positions where noted).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcv import attention, kernels, masks, rope
from lcv.config import REMAT_POLICIES, DecoderConfig
from lcv.masks import TokenMask
from lcv.models.layers import (
  MLP,
  Embed,
  RMSNorm,
  constrain,
  default_init,
  dtype_of,
  length_shards,
  logits_dot,
  param,
)
from lcv.parallel import ring_attention
from lcv.positions import Positions, as_positions


class KVCache(NamedTuple):
  """Keys and values of every token seen so far, with their mask description (a pytree).

  k, v: dtype[L, B, S, K, H]; keys are stored after RoPE. S is the cache capacity.
  mask: `TokenMask` int32[B, S] of the cached tokens as keys (their global `index`); empty slots
    hold index = `masks.NO_KEY`, which no query interval contains.
  length: int32[] slots filled so far (the same for every row: prompts are left-padded).
  """

  k: jax.Array
  v: jax.Array
  mask: TokenMask
  length: jax.Array


def init_cache(cfg: DecoderConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for at least `max_len` tokens (prompt + generated).

  Under a mesh whose "length" rule splits the sequence, the capacity is rounded up to a multiple
  of the shard count and the cache is sharded along it (`sharded_decode_attention`).
  """
  _, shards = length_shards()
  max_len = -(-max_len // shards) * shards
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  kv_dtype = dtype_of(dtype or cfg.dtype)
  empty = TokenMask(
    lo=jnp.zeros((batch, max_len), jnp.int32),
    hi=jnp.full((batch, max_len), -1, jnp.int32),
    index=jnp.full((batch, max_len), masks.NO_KEY, jnp.int32),
  )
  k, v = jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype)  # distinct buffers (donation)
  return KVCache(k=k, v=v, mask=empty, length=jnp.zeros((), jnp.int32))


def _rope(cfg: DecoderConfig, x: jax.Array, positions: Positions, seq_len=None) -> jax.Array:
  r = cfg.rope
  return rope.apply_rope(
    x,
    positions,
    theta=r.theta,
    scaling=r.scaling,
    mrope_sections=r.mrope_sections,
    seq_len=seq_len,
  )


# Single-device kernels that take any (queries, cached keys) pair.
_LOCAL_IMPLS = ("xla", "pallas_gpu", "pallas_tpu")


class Attention(nnx.Module):
  """Grouped-query self-attention (Ainslie et al. 2023) with RoPE on q and k."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h, pd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
    self.q_proj = param(rngs, default_init, (d, n, h), ("embed", "heads", "head_dim"), pd)
    self.k_proj = param(rngs, default_init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.v_proj = param(rngs, default_init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.o_proj = param(rngs, default_init, (n, h, d), ("heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      zeros = nnx.initializers.zeros_init()
      self.q_bias = param(rngs, zeros, (n, h), ("heads", "head_dim"), pd)
      self.k_bias = param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pd)
      self.v_bias = param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pd)

  def _project(self, x, w, b, eq):
    dtype = dtype_of(self.cfg.dtype)
    y = jnp.einsum(eq, x, w[...].astype(dtype))
    return y if b is None else y + b[...].astype(dtype)

  def __call__(self, x, positions, mask, kv_mask, kv=None, start=None):
    """x: dtype[B, T, D]; positions: `Positions` [B, T] or [3, B, T]; mask: `TokenMask` [B, T] of
    the queries; kv_mask: `TokenMask` [B, S] of the keys attended to.

    kv: None (keys are this call's tokens) or (k, v) dtype[B, S, K, H] cache of one layer, into
    which this call's keys are written at slot `start` before attending.

    Returns (dtype[B, T, D], updated (k, v) or None).
    """
    bias = lambda name: getattr(self, name) if self.cfg.qkv_bias else None
    q = self._project(x, self.q_proj, bias("q_bias"), "BTD,DNH->BTNH")
    k = self._project(x, self.k_proj, bias("k_bias"), "BTD,DKH->BTKH")
    v = self._project(x, self.v_proj, bias("v_bias"), "BTD,DKH->BTKH")
    # With a cache the few new queries stay whole; the cache itself is sharded along "length".
    seq = "length" if kv is None else None
    # Dynamic NTK scales by the sequence length: with a cache that is the cache's, not the chunk's.
    seq_len = None if kv is None else kv[0].shape[1]
    q = constrain(_rope(self.cfg, q, positions, seq_len), ("batch", seq, "act_heads", None))
    if self.cfg.logn_scale_len:
      # Scaling q scales its logits: every attention backend and the ring see plain queries.
      factor = attention.logn_scale(mask.lo, mask.hi, self.cfg.logn_scale_len)
      q = (q * factor[:, :, None, None]).astype(q.dtype)
    k = constrain(_rope(self.cfg, k, positions, seq_len), ("batch", seq, "act_kv_heads", None))
    if kv is not None:
      k_cache, v_cache = kv
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
      k = constrain(k, ("batch", "length", "act_kv_heads", None))
      v = constrain(v, ("batch", "length", "act_kv_heads", None))
      kv = (k, v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    impl = self.cfg.attention_impl
    axis, shards = (None, 1) if kv is None else length_shards()
    if shards > 1:
      # Sequence-sharded cache: partial attention per shard, merged by lse; no cache rotation.
      o = ring_attention.sharded_decode_attention(
        q, k, v, mask.lo, mask.hi, kv_mask.index, axis_name=axis
      )
    else:
      if kv is not None and impl not in _LOCAL_IMPLS:
        # A whole cache on one device: sequence-parallel strategies and cuDNN's causal-only
        # path do not apply to a few queries against a cache.
        impl = "auto"
      o = attention.attend(q, k, v, mask=mask, kv_mask=kv_mask, impl=impl)
    out = jnp.einsum("BTNH,NHD->BTD", o, self.o_proj[...].astype(q.dtype))
    return out, kv


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.input_norm = RMSNorm(cfg.embed_dim, **norm)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.embed_dim, **norm)
    self.mlp = MLP(
      cfg.embed_dim, cfg.mlp_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
    )

  def __call__(self, x, positions, mask, kv_mask, kv=None, start=None):
    """Same arguments as `Attention`; x: dtype[B, T, D] -> (dtype[B, T, D], kv)."""
    seq = "length" if kv is None else None  # decoding: a few new tokens, never split
    x = constrain(x, ("batch", seq, "act_embed"))
    h, kv = self.attn(self.input_norm(x), positions, mask, kv_mask, kv, start)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x), seq)
    return x, kv


def remat_policy(name: str):
  """`jax.checkpoint` policy for a config's `remat` (None = save nothing, i.e. full remat)."""
  cp = jax.checkpoint_policies
  if name == "attention":
    # Full remat except the attention kernels' (o, lse) residuals (named in every backend's VJP,
    # lcv.kernels.RESIDUAL_NAMES): the backward re-runs projections and MLP, never attention.
    return cp.save_only_these_names(*kernels.RESIDUAL_NAMES)
  if name == "dots_saveable":
    return cp.dots_with_no_batch_dims_saveable
  if name == "dots_attention":
    # Both: nothing but elementwise work (norms, RoPE, SwiGLU) is recomputed. The kernels' outputs
    # are not dots to XLA, so "dots_saveable" alone re-runs every attention forward.
    return cp.save_from_both_policies(
      cp.dots_with_no_batch_dims_saveable, cp.save_only_these_names(*kernels.RESIDUAL_NAMES)
    )
  if name == "offload":
    if jax.devices()[0].platform == "cpu":
      # CPU has no separate host memory space to offload to; keeping the dots is the same trade.
      return cp.dots_with_no_batch_dims_saveable
    return cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
  if name in ("full", "none"):
    return None
  raise ValueError(f"remat={name!r}; choose one of {REMAT_POLICIES}")


class Decoder(nnx.Module):
  """The decoder stack: embedding, L blocks, final norm, LM head.

  `__call__` maps embeddings to hidden states (or to logits at `logits_at`); see the module
  docstring for the parameter tree.
  """

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(
      cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
    )

    # One Block with every parameter stacked on a leading "layers" axis (nnx.vmap at init).
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stack(rngs):
      return Block(cfg, rngs=rngs)

    stacked = stack(rngs)
    if cfg.scan_layers:
      self.layers = stacked
    else:
      # Unstacked layers are slices of the stacked init, taken as plain arrays (the stacked
      # variables' metadata also names the "layers" axis): the scanned model's values for the
      # same seed, and one set of init kernels. L blocks initialised one by one compiled for
      # 5 minutes on an H200 at L = 28, every layer's random init its own kernels. The barrier
      # makes XLA materialise the stacked arrays before slicing; without it the init still
      # compiled for minutes on the GPU (likely the random-bit generation fused into each
      # layer's slice again), with it in 7.8 s against the stacked model's 7.2 s (H200).
      values = jax.lax.optimization_barrier(nnx.to_pure_dict(nnx.state(stacked)))
      graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
      self.layers = nnx.List()
      for i in range(cfg.num_layers):
        state = jax.tree.map(lambda x: x, abstract)  # a fresh State (filled in place next)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda x, i=i: x[i], values))
        self.layers.append(nnx.merge(graphdef, state))
    self.final_norm = RMSNorm(
      cfg.embed_dim, eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
    )
    if not cfg.tie_embeddings:
      self.lm_head = param(
        rngs, default_init, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype
      )

  def head(self) -> tuple[jax.Array, str]:
    """The LM head's weight as stored (param dtype) and its layout for
    `lcv.models.loss.chunked_cross_entropy`: ([D, V], "DV") untied, ([V, D], "VD") tied."""
    if self.cfg.tie_embeddings:
      return self.embed.embedding[...], "VD"
    return self.lm_head[...], "DV"

  def logits(self, h: jax.Array) -> jax.Array:
    """LM head: h [B, L, D] -> logits float32[B, L, V] (matmul in the compute dtype)."""
    h = h.astype(dtype_of(self.cfg.dtype))
    if self.cfg.tie_embeddings:
      out = self.embed.attend(h)
    else:
      w = self.lm_head[...].astype(h.dtype)
      out = logits_dot("BLD,DV->BLV", h, w)
    return constrain(out, ("batch", None, "act_vocab"))

  def __call__(self, x, positions, mask, *, logits_at=None, cache: KVCache | None = None):
    """Run the stack.

    Args:
      x: float[B, T, D] input embeddings (cast to the compute dtype).
      positions: `Positions` ticks [B, T] (1-D / V2PE / TAD) or [3, B, T] (M-RoPE).
      mask: `TokenMask` int32[B, T] of these tokens (queries; also keys unless `cache`).
      logits_at: optional int32[B, L] indices into T; then returns logits float32[B, L, V] there.
      cache: optional `KVCache`; these tokens are appended at slot `cache.length` and attend to
        everything cached (chunked prefill and decoding).

    Returns:
      hidden dtype[B, T, D] (after the final norm) or logits float32[B, L, V]; with `cache`, the
      pair (that, updated cache).
    """
    cfg = self.cfg
    positions = as_positions(positions)
    b, t, d = x.shape
    if d != cfg.embed_dim:
      raise ValueError(f"input width {d} must equal {cfg.embed_dim=}")
    pos_shape = (3, b, t) if cfg.rope.positions == "mrope" else (b, t)
    if tuple(positions.ticks.shape) != pos_shape:
      raise ValueError(
        f"positions.ticks.shape={tuple(positions.ticks.shape)} must be {pos_shape} for "
        f"{cfg.rope.positions=} positions"
      )
    if tuple(mask.lo.shape) != (b, t):
      raise ValueError(f"mask.lo.shape={tuple(mask.lo.shape)} must be [B, T] = {(b, t)}")
    x = x.astype(dtype_of(cfg.dtype))

    kv_mask, start, kv = mask, None, None
    if cache is not None:
      if cache.k.shape[1] != b:
        raise ValueError(f"cache batch {cache.k.shape[1]} must equal the input batch {b}")
      start = cache.length
      kv_mask = TokenMask(
        *(jax.lax.dynamic_update_slice(c, m, (0, start)) for c, m in zip(cache.mask, mask))
      )
      kv = (cache.k, cache.v)

    x, kv = self._layers(x, positions, mask, kv_mask, kv, start)
    h = self.final_norm(x)
    out = h
    if logits_at is not None:
      picked = jnp.take_along_axis(h, jnp.asarray(logits_at, jnp.int32)[..., None], axis=1)
      out = self.logits(picked)
    if cache is None:
      return out
    return out, KVCache(k=kv[0], v=kv[1], mask=kv_mask, length=cache.length + t)

  def _layers(self, x, positions, mask, kv_mask, kv, start):
    """All blocks, scanned or looped, each wrapped in `jax.checkpoint` per `cfg.remat`."""
    cfg = self.cfg

    def runner(graphdef):
      def run(state, x, kv):
        block = nnx.merge(graphdef, state)
        return block(x, positions, mask, kv_mask, kv, start)

      if cfg.remat == "none":
        return run
      # Inside scan the loop already keeps XLA from merging the recomputation with the forward,
      # so CSE prevention (extra barriers) is only needed for the unrolled stack.
      return jax.checkpoint(run, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)

    if cfg.scan_layers:
      graphdef, state = nnx.split(self.layers)
      run = runner(graphdef)
      return jax.lax.scan(lambda x, xs: run(xs[0], x, xs[1]), x, (state, kv))

    outs = []
    for i, block in enumerate(self.layers):
      graphdef, state = nnx.split(block)
      x, layer_kv = runner(graphdef)(state, x, None if kv is None else (kv[0][i], kv[1][i]))
      outs.append(layer_kv)
    if kv is None:
      return x, None
    return x, (jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs]))


def param_count(cfg: DecoderConfig) -> int:
  """Number of parameters of the decoder (embedding and LM head included)."""
  d, f, n, k, h = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = d * n * h * 2 + d * k * h * 2 + (n * h + 2 * k * h) * cfg.qkv_bias
  block = attn + 3 * d * f + 2 * d
  head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  return cfg.num_layers * block + cfg.vocab_size * d + d + head


def flops_per_token(
  cfg: DecoderConfig, seq_len: int, *, mask_density: float = 1.0, training: bool = True
) -> float:
  """Model FLOPs per token for MFU (PaLM appendix B style, attention counted by its mask).

  Matmuls cost 2 FLOPs per weight per token (the embedding lookup costs none; the LM head does).
  Attention adds, per layer, 2 * 2 * N * H per allowed (query, key) pair (QK^T and PV), i.e.
  4 * N * H * seq_len * mask_density per token, where `mask_density` is the allowed fraction of
  the [S, S] grid (`lcv.masks.density`: ~0.5 causal, less with packing). Training = 3x forward
  (backward is two matmuls per forward one); remat recomputation is not counted, as MFU requires.
  """
  d, f, n, k, h = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  matmul_weights = cfg.num_layers * (2 * d * n * h + 2 * d * k * h + 3 * d * f)
  matmul_weights += d * cfg.vocab_size
  forward = 2 * matmul_weights + cfg.num_layers * 4 * n * h * seq_len * mask_density
  return float(3 * forward if training else forward)
