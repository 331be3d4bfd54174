"""Small layers shared by the decoder and the VLM glue: parameters with logical axes, RMSNorm,
the SwiGLU MLP and the token embedding.

Every parameter is made by `param`, which names its axes with `nnx.with_partitioning` (logical
names only: "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "norm"; `lcv.parallel.rules`
maps them to mesh axes). Built under `jax.set_mesh(mesh)` and `nnx.logical_axis_rules(rules)`,
parameters are created already sharded; without a mesh they are plain arrays carrying the names.

Activations are pinned at block boundaries with `constrain(x, names)` (activation names "batch",
"length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab"); it is a no-op without
a mesh.

Parameters are stored in `param_dtype` and cast to the compute `dtype` where they are used, so a
bf16 forward reads fp32 master weights (mixed precision without a separate copy).

Axis letters: B batch, S length, D model dim, F mlp dim, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lcv.parallel.rules import constrain, logical_to_spec

# Hugging Face Llama / Qwen2 initialise every matrix from N(0, 0.02) (`initializer_range`).
default_init = nnx.initializers.normal(0.02)


def dtype_of(name) -> jnp.dtype:
  """jnp dtype from a config string ("bfloat16", "float32", ...) or a dtype."""
  return jnp.dtype(name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def logits_dot(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """The LM head's matmul: `einsum(eq, x, w)` with float32 logits from compute-dtype operands.

  The backward takes the logits' cotangent (softmax minus one-hot, bounded by the weights) back to
  the operands' dtype first. Left to autodiff, the float32 cotangent promotes both backward
  matmuls, the two largest of a small model's step at a 152K vocabulary, to float32 (TF32 on
  Hopper, half bf16's rate); every other weight gradient of the model is a bf16 product already.

  x, w: operands in one dtype, e.g. h bf16[B, L, D] and the table bf16[V, D] ("BLD,VD->BLV").
  Returns float32 logits.
  """
  return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)


def _logits_dot_fwd(eq, x, w):
  return logits_dot(eq, x, w), (x, w)


def _logits_dot_bwd(eq, res, ct):
  x, w = res
  _, vjp = jax.vjp(lambda x, w: jnp.einsum(eq, x, w), x, w)
  return vjp(ct.astype(x.dtype))


logits_dot.defvjp(_logits_dot_fwd, _logits_dot_bwd)


def length_shards() -> tuple[str | None, int]:
  """(mesh axis, shard count) of the "length" rule on the ambient mesh; (None, 1) without one.

  Lets model code ask whether the sequence is split without naming mesh axes itself.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None, 1
  entry = logical_to_spec(("length",), mesh)[0]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  axes = tuple(a for a in axes if mesh.shape[a] > 1)
  if len(axes) > 1:
    raise ValueError(f"the 'length' rule maps to several mesh axes {axes}; decoding needs one")
  return (axes[0], mesh.shape[axes[0]]) if axes else (None, 1)


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str | None], dtype):
  """An `nnx.Param` of `shape` whose axes carry the logical `names`.

  Sharded at creation when a mesh is set (`jax.set_mesh`), so a 7B model is never materialised on
  one device; without a mesh the names are kept as metadata only.
  """
  if len(shape) != len(names):
    raise ValueError(f"parameter {shape=} needs one logical name per axis, got {names=}")
  value = nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), dtype_of(dtype))
  return nnx.Param(value, eager_sharding=not jax.sharding.get_abstract_mesh().empty)


class RMSNorm(nnx.Module):
  """Root-mean-square norm (Zhang & Sennrich 2019), statistics in float32 as Llama / Qwen2 do.

  Params: scale float[D] ("norm"), initialised to ones.
  """

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype_of(dtype)
    self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[..., D] -> dtype[..., D]."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward (Shazeer 2020): down(silu(x @ gate) * (x @ up)).

  Params: gate_proj, up_proj float[D, F] ("embed", "mlp"); down_proj float[F, D] ("mlp", "embed").
  """

  def __init__(self, embed_dim: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype_of(dtype)
    d, f = embed_dim, mlp_dim
    self.gate_proj = param(rngs, default_init, (d, f), ("embed", "mlp"), param_dtype)
    self.up_proj = param(rngs, default_init, (d, f), ("embed", "mlp"), param_dtype)
    self.down_proj = param(rngs, default_init, (f, d), ("mlp", "embed"), param_dtype)

  def __call__(self, x: jax.Array, seq: str | None = "length") -> jax.Array:
    """x: dtype[B, S, D] -> dtype[B, S, D]; `seq` names the S axis for sharding (None = whole)."""
    cast = lambda p: p[...].astype(self.dtype)
    gate = jnp.einsum("BSD,DF->BSF", x, cast(self.gate_proj))
    up = jnp.einsum("BSD,DF->BSF", x, cast(self.up_proj))
    h = constrain(jax.nn.silu(gate) * up, ("batch", seq, "act_mlp"))
    return jnp.einsum("BSF,FD->BSD", h, cast(self.down_proj))


class Embed(nnx.Module):
  """Token embedding; `attend` is the tied LM head (logits = x @ embedding^T).

  Params: embedding float[V, D] ("vocab", "embed").
  """

  def __init__(self, vocab_size: int, embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype_of(dtype)
    self.embedding = param(
      rngs, default_init, (vocab_size, embed_dim), ("vocab", "embed"), param_dtype
    )

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids: int[B, S] -> dtype[B, S, D]."""
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """x: [B, S, D] -> logits float32[B, S, V]."""
    table = self.embedding[...].astype(self.dtype)
    return logits_dot("BSD,VD->BSV", x.astype(self.dtype), table)
