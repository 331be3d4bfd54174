"""Attention backends with one contract (docs/internals.md): attention / forward / backward on
q [B, T, N, H], k/v [B, S, K, H] and interval masks (q_lo, q_hi, k_idx), returning (o, lse).

`blockwise` is plain jnp (any platform); `flash_gpu` (portable), `flash_hopper` (sm_90, Mosaic GPU;
`gpu` picks between them) and `flash_tpu` are Pallas kernels. Import the module you need; this
package init imports none of them. It holds what they share: `with_vjp` (the custom VJP of the
Pallas kernels) and `name_residuals`, with which every backend's VJP names its (o, lse) residuals,
so the decoder's `remat="attention"` policy can keep them and the backward never re-runs an
attention forward.
"""

import functools

import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name

RESIDUAL_NAMES = ("attention_out", "attention_lse")


def name_residuals(o, lse):
  """(o, lse) tagged for `jax.checkpoint` policies (`save_only_these_names(*RESIDUAL_NAMES)`)."""
  return checkpoint_name(o, RESIDUAL_NAMES[0]), checkpoint_name(lse, RESIDUAL_NAMES[1])


def with_vjp(forward_fn, backward_fn):
  """A differentiable attention(q, k, v, q_lo, q_hi, k_idx, plan) from a kernel's two halves.

  forward_fn(plan, q, k, v, q_lo, q_hi, k_idx) -> (o, lse); backward_fn(plan, q, k, v, o, lse, do,
  dlse, q_lo, q_hi, k_idx) -> (dq, dk, dv). The residuals are the inputs and (o, lse); the lse
  cotangent reaches the backward. Shared by the Pallas kernels (portable GPU, Hopper, TPU).
  `plan` is a static argument of both halves, so it must be hashable (a frozen dataclass).
  """

  # Each half is a jit of its own: a model calling the kernel at many sites (unstacked layers)
  # then lowers it once per distinct plan and shapes, not once per site (JAX caches the lowering
  # of a jitted call by its jaxpr, and jit hands every site the same jaxpr). XLA inlines the
  # calls, so the compiled program is the same. A 28-layer step on an H200 lowered in 92 s
  # before (84 Mosaic GPU kernel lowerings), ~7 s after.
  forward_fn = jax.jit(forward_fn, static_argnums=0)
  backward_fn = jax.jit(backward_fn, static_argnums=0)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
  def attn(q, k, v, q_lo, q_hi, k_idx, plan):
    return forward_fn(plan, q, k, v, q_lo, q_hi, k_idx)

  def attn_fwd(q, k, v, q_lo, q_hi, k_idx, plan):
    o, lse = attn(q, k, v, q_lo, q_hi, k_idx, plan)
    # When a scan saves (o, lse) for the backward, XLA's GPU dynamic-slice fusion clones the
    # kernel into a fusion that writes them straight into the stacked residual buffers, while
    # the original call still feeds the output projection: the forward kernel ran twice per
    # layer (measured: 56 launches for 28 layers, a 32K training step, H200, jax 0.11.2). A
    # barrier (free at run time) keeps the kernel out of that rewrite.
    o, lse = name_residuals(*jax.lax.optimization_barrier((o, lse)))
    return (o, lse), (q, k, v, o, lse, q_lo, q_hi, k_idx)

  def attn_bwd(plan, res, cotangents):
    q, k, v, o, lse, q_lo, q_hi, k_idx = res
    do, dlse = cotangents
    dq, dk, dv = backward_fn(plan, q, k, v, o, lse, do, dlse, q_lo, q_hi, k_idx)
    # Integer mask arguments take float0 cotangents.
    ints = tuple(np.zeros(np.shape(x), jax.dtypes.float0) for x in (q_lo, q_hi, k_idx))
    return (dq, dk, dv, *ints)

  attn.defvjp(attn_fwd, attn_bwd)
  return attn
