"""Hopper (sm_90) attention with interval masks: wgmma + TMA + warp specialization.

The fast path of `lcv.kernels.flash_gpu` on H100 / H200, with the same contract (q [B, T, N, H],
k/v [B, S, K, H], DESIGN.md section 2 intervals `q_lo <= k_idx <= q_hi`, lse natural-log float32
[B, N, T], o = 0 and lse = -inf on rows with no key). The design is FlashAttention-3's
(arXiv 2407.08608, section 3): one CTA holds 128 rows as two *consumer* warpgroups of 64 rows
each plus one *producer* warpgroup that streams tiles into a ring of shared-memory stages with the
bulk tensor copy engine (TMA); the consumers run their matmuls as wgmma.

What lcv adds is the mask. Every CTA gets its tile range from `flash_gpu.tile_ranges` (computed
once per call in plain jnp outside the kernels, O(T/64 * S/bk) work): the producer loads only the
tiles in the CTA's range, so skipped tiles cost no loads and no FLOPs; each consumer splits its
own part of that range into boundary tiles (elementwise mask from the row intervals and the
tile's key indices) and a run of full tiles (no mask arithmetic), with the mode fixed per loop.

The modules, imported one way (this one uses the other five):
- `hopper_pipeline`: the shared pieces (plan, tile ranges, producers, wgmma helpers, launch);
- `hopper_forward`: the forward kernel (FA3's ping-pong between the consumers, section 3.1);
- `hopper_backward`: the dQ and the dK/dV kernels (FlashAttention-2's split of the backward);
- `hopper_fused_backward`: the backward as one kernel with dQ reduce-added (FA3's), which runs
  at H = 64 and at H = 128 without GQA (`Plan.fused_backward`);
- `hopper_wide_dkv`: the dK/dV kernel at H = 256 (one consumer per gradient);
- this module: the public API (`supported`, `forward`, `backward`, `attention`,
  `attention_reference`), the checks and the custom VJP.

Only bf16 / fp16 inputs and head dims 64 / 128 / 256 run here (`supported`); everything else goes
to the portable kernel. On a CPU backend the kernels run in Mosaic GPU's interpreter (tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcv.kernels import (
  flash_gpu,
  hopper_backward,
  hopper_forward,
  hopper_fused_backward,
  hopper_pipeline,
  hopper_wide_dkv,
  with_vjp,
)

# Head dims compiled and checked on an H200. H = 256 runs on 64-key tiles (`hopper_pipeline.plan`:
# with 128-key tiles a forward consumer would hold 256 registers per thread), a dQ kernel of one
# consumer (`Plan.dq_consumers`: two would not fit in shared memory) and its own dK/dV kernel
# (`hopper_wide_dkv`: a consumer of `hopper_backward.dkv` would hold dK and dV, 256 registers).
HEAD_DIMS = (64, 128, 256)


def supported(q, k) -> bool:
  """Whether these operands can take the Hopper kernels (dtype, head dim, a sm_90 device)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] not in HEAD_DIMS:
    return False
  if jax.default_backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "")
  return str(cc).startswith("9")


def _check(q, k, v, q_lo, q_hi, k_idx) -> None:
  flash_gpu._check(q, k, v, q_lo, q_hi, k_idx)
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"{q.dtype=} must be bfloat16 or float16 for the Hopper kernels")
  if q.shape[-1] not in HEAD_DIMS:
    raise ValueError(
      f"head dim H={q.shape[-1]} must be one of {HEAD_DIMS} for the Hopper kernels (other head "
      "dims run the portable kernel, lcv.kernels.flash_gpu)"
    )


def _forward(p, q, k, v, q_lo, q_hi, k_idx):
  o, lse = hopper_forward.forward(p, *hopper_pipeline.prepare(p, q, k, v, q_lo, q_hi, k_idx))
  return o[:, : p.t], lse[:, :, : p.t]


def dkv_kernel(p):
  """The dK/dV kernel of a plan without the fused backward: `hopper_backward.dkv` at H = 128
  (GQA), `hopper_wide_dkv.dkv` at H = 256 (the former's consumer would hold dK and dV,
  [64, 256] float32, 256 registers)."""
  return hopper_backward.dkv if p.h <= 128 else hopper_wide_dkv.dkv


def _backward(p, q, k, v, o, lse, do, dlse, q_lo, q_hi, k_idx):
  args = hopper_backward.operands(p, q, k, v, o, lse, do, q_lo, q_hi, k_idx, dlse)
  if p.fused_backward:  # dQ comes as an unscaled float32 sum: scaled and cast once
    dq, dk, dv = hopper_fused_backward.dkv_dq(p, *args)
    dq = (dq[:, : p.t] * p.scale).astype(q.dtype)
  else:
    dq = hopper_backward.dq(p, *args)[:, : p.t]
    dk, dv = dkv_kernel(p)(p, *args)
  return dq, dk[:, : p.s], dv[:, : p.s]


def forward(q, k, v, q_lo, q_hi, k_idx, *, scale=None, interpret=None):
  """Masked attention forward, no VJP; arguments and results as `flash_gpu.forward`."""
  _check(q, k, v, q_lo, q_hi, k_idx)
  return _forward(hopper_pipeline.plan(q, k, scale, interpret), q, k, v, q_lo, q_hi, k_idx)


def backward(q, k, v, o, lse, do, q_lo, q_hi, k_idx, *, scale=None, interpret=None):
  """Gradients from the row's final (o, lse); arguments and results as `flash_gpu.backward`."""
  _check(q, k, v, q_lo, q_hi, k_idx)
  p = hopper_pipeline.plan(q, k, scale, interpret)
  return _backward(p, q, k, v, o, lse, do, None, q_lo, q_hi, k_idx)


_attention = with_vjp(_forward, _backward)


def attention(q, k, v, q_lo, q_hi, k_idx, *, scale=None, interpret=None):
  """Differentiable masked attention (custom VJP, lse cotangent too); as `flash_gpu.attention`."""
  _check(q, k, v, q_lo, q_hi, k_idx)
  p = hopper_pipeline.plan(q, k, scale, interpret)
  return _attention(q, k, v, q_lo, q_hi, k_idx, p)


def attention_reference(q, k, v, q_lo, q_hi, k_idx, *, scale=None):
  """Dense float32 twin of `attention` (the same as `flash_gpu.attention_reference`)."""
  return flash_gpu.attention_reference(q, k, v, q_lo, q_hi, k_idx, scale=scale)
