"""GPU attention: the Hopper kernels (`flash_hopper`) where they apply, else the portable one.

The `impl="pallas_gpu"` backend of `lcv.attention.attend` and of the ring's per-step kernel. The
choice is made per call, from static facts only (device capability, dtype, head dim), so it is
fixed at trace time: sm_90 GPUs with bf16 / fp16 inputs and head dim 64, 128 or 256 run the
Mosaic GPU kernels (wgmma, TMA, warp specialization); anything else, and calls with the portable
kernel's own options (`block_sizes`, `interpret=True`), run the portable Pallas kernel
(`flash_gpu`). Both have the same contract (docs/internals.md), so a caller never sees which one
ran; `kernel=` (or the environment variable LCV_GPU_KERNEL) forces one: "hopper" | "portable".
"""

from __future__ import annotations

import os

from lcv.kernels import flash_gpu, flash_hopper

KERNELS = ("auto", "hopper", "portable")
ENV = "LCV_GPU_KERNEL"  # process-wide default for `kernel=` (e.g. "portable" to compare or debug)


def _pick(q, k, kernel: str | None, kwargs) -> bool:
  """True for the Hopper kernels. Drops `interpret` from `kwargs` when they run (they pick the
  interpreter from the backend themselves)."""
  kernel = kernel or os.environ.get(ENV, "auto")
  if kernel not in KERNELS:
    raise ValueError(f"{kernel=} (argument or ${ENV}) must be one of {KERNELS}")
  portable_options = [o for o in ("block_sizes", "interpret") if kwargs.get(o)]
  if kernel == "hopper" and portable_options:
    raise ValueError(
      f"kernel='hopper' does not take {portable_options} (options of the portable kernel); drop "
      "them, or use kernel='portable'"
    )
  hopper = kernel == "hopper" or (
    kernel == "auto" and not portable_options and flash_hopper.supported(q, k)
  )
  if hopper:
    kwargs.pop("interpret", None)
  return hopper


def forward(q, k, v, q_lo, q_hi, k_idx, *, kernel: str | None = None, **kwargs):
  """`flash_gpu.forward` / `flash_hopper.forward`, whichever applies."""
  mod = flash_hopper if _pick(q, k, kernel, kwargs) else flash_gpu
  return mod.forward(q, k, v, q_lo, q_hi, k_idx, **kwargs)


def backward(q, k, v, o, lse, do, q_lo, q_hi, k_idx, *, kernel: str | None = None, **kwargs):
  """`flash_gpu.backward` / `flash_hopper.backward`, whichever applies."""
  mod = flash_hopper if _pick(q, k, kernel, kwargs) else flash_gpu
  return mod.backward(q, k, v, o, lse, do, q_lo, q_hi, k_idx, **kwargs)


def attention(q, k, v, q_lo, q_hi, k_idx, *, kernel: str | None = None, **kwargs):
  """`flash_gpu.attention` / `flash_hopper.attention` (differentiable), whichever applies."""
  mod = flash_hopper if _pick(q, k, kernel, kwargs) else flash_gpu
  return mod.attention(q, k, v, q_lo, q_hi, k_idx, **kwargs)


def attention_reference(q, k, v, q_lo, q_hi, k_idx, *, scale=None):
  """The dense float32 twin both kernels are tested against."""
  return flash_gpu.attention_reference(q, k, v, q_lo, q_hi, k_idx, scale=scale)
