"""Model FLOPs and MFU.

Training FLOPs per step = 3 x forward (backward costs twice the forward), forward = 2 x MACs:
  dense:     2 * (matmul params touched per token) * tokens        (embedding lookups excluded)
  attention: 2 * 2 * N * H * (allowed query-key pairs) per layer   (QK^T and PV), where the pairs
             are counted from the mask itself (`lcv.masks.density`), so packing and frame-block
             masks are charged for what they compute, not for S^2 (PaLM appendix B accounting,
             with the mask's density instead of 1/2).
MFU = model FLOPs per second / the chips' peak dense bf16 FLOPs (remat recompute is not counted).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Peak dense bf16 FLOP/s per chip (vendor data sheets).
PEAK_FLOPS = {
  "h100": 989e12,
  "h200": 989e12,
  "h800": 989e12,
  "gh200": 989e12,
  "a100": 312e12,
  "l4": 121e12,
  "tpu v4": 275e12,
  "tpu v5 lite": 197e12,
  "tpu v5e": 197e12,
  "tpu v5p": 459e12,
  "tpu v5": 459e12,
  "tpu v6 lite": 918e12,
  "tpu v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one chip of `device_kind` (jax.Device.device_kind), None when unknown
  (CPU, or a chip missing from the table): MFU is then reported as n/a."""
  kind = device_kind.lower()
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name in kind:
      return PEAK_FLOPS[name]
  return None


@dataclasses.dataclass(frozen=True)
class Shape:
  """The FLOP-relevant shape of a transformer stack.

  layers, embed (D), heads (N), kv_heads (K), head_dim (H), mlp (F, with `gated` for SwiGLU's
  three matrices), vocab (V, the LM head; 0 for a vision tower).
  """

  layers: int
  embed: int
  heads: int
  kv_heads: int
  head_dim: int
  mlp: int
  vocab: int = 0
  gated: bool = True

  @property
  def matmul_params_per_layer(self) -> int:
    d, n, k, h, f = self.embed, self.heads, self.kv_heads, self.head_dim, self.mlp
    attn = d * n * h * 2 + d * k * h * 2  # q, o, k, v
    return attn + d * f * (3 if self.gated else 2)


def train_flops(shape: Shape, tokens: int, attended_pairs: float) -> float:
  """FLOPs of one training step of a stack over `tokens` tokens with `attended_pairs` allowed
  (query, key) pairs summed over the batch."""
  dense = 2 * tokens * (shape.layers * shape.matmul_params_per_layer + shape.embed * shape.vocab)
  attention = 4 * shape.heads * shape.head_dim * attended_pairs * shape.layers
  return 3 * (dense + attention)


def attended_pairs(lo, hi, index) -> float:
  """Allowed (query, key) pairs of a batch's mask intervals (any token order), summed over rows."""
  from lcv import masks

  lo, hi, index = (np.asarray(x) for x in (lo, hi, index))
  return float(np.sum(np.asarray(masks.density(lo, hi, index))) * lo.shape[1] * index.shape[1])


def mfu(flops_per_step: float, step_seconds: float, device_kind: str, num_devices: int):
  """Model FLOPs utilisation in [0, 1], or None where the peak is unknown."""
  peak = peak_flops(device_kind)
  if peak is None or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / (peak * num_devices)
