"""Rotary position embedding from exact positions (DESIGN.md section 2, `lcv.positions`).

Rotate-half layout (Llama / Qwen2 / Hugging Face): frequency j rotates the pair (x[j], x[j + H/2]),
so imported weights need no permutation. Cos and sin are formed on the fly from the positions; there
is no [max_len, H] table.

Precision. The angle is position * inv_freq, and at positions near 2^22 float32 cannot hold it (its
ulp at 4e6 is 0.25 rad). Positions arrive as int32 ticks of 1/256, so the angle in turns is
ticks * g with g = inv_freq / (256 * 2 pi), a host float64 constant. Only frac(ticks * g) matters:
split frac(g) * 2^32 into an integer word G1 and a remainder g2 (< 2^-32); then

    turns = (uint32(ticks) * G1 mod 2^32) * 2^-32 + ticks * g2   (mod 1)

The first product is exact in wrapping uint32 arithmetic (negative ticks work by two's complement),
the second is below 0.5 turns and float32 keeps it to ~1e-7, so the angle is good to ~1e-6 rad at
any int32 position, with no float64 on the device.

Axis letters: B batch, S sequence, N heads, H head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lcv.config import RopeScaling
from lcv.positions import TICKS, as_positions


def _base_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def inv_freq(
  head_dim: int, theta: float, scaling: RopeScaling | None = None, seq_len: int | None = None
) -> tuple[np.ndarray, float]:
  """Inverse frequencies and attention factor, float64 on the host (static config).

  Same formulas as Hugging Face's `ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py).

  Args:
    head_dim: H (even).
    theta: RoPE base.
    scaling: context extension, or None.
    seq_len: sequence length for dynamic NTK (static).

  Returns:
    (float64[H/2] inverse frequencies in rad per position, attention factor multiplying cos/sin).
  """
  if head_dim % 2:
    raise ValueError(f"{head_dim=} must be even for rotate-half RoPE.")
  kind = "none" if scaling is None else scaling.kind
  if kind == "none":
    return _base_inv_freq(head_dim, theta), 1.0
  factor = scaling.factor
  original = scaling.original_max_position_embeddings
  if kind == "linear":
    # Position interpolation (Chen et al. 2023): positions / factor == inv_freq / factor.
    return _base_inv_freq(head_dim, theta) / factor, 1.0
  if kind == "ntk":
    # NTK-aware base change (bloc97): theta * factor^(H / (H - 2)).
    return _base_inv_freq(head_dim, theta * factor ** (head_dim / (head_dim - 2))), 1.0
  if kind == "dynamic":
    if seq_len is None:
      raise ValueError("dynamic NTK RoPE needs the static seq_len.")
    length = max(seq_len, original)
    new_theta = theta * ((factor * length / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _base_inv_freq(head_dim, new_theta), 1.0
  if kind == "yarn":
    return _yarn(head_dim, theta, scaling)
  if kind == "llama3":
    return _llama3(head_dim, theta, scaling), 1.0
  raise ValueError(f"Unknown RoPE scaling {kind=}; use none, linear, ntk, dynamic, yarn or llama3.")


def _yarn(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[np.ndarray, float]:
  """YaRN (Peng et al. 2023, arXiv 2309.00071 section 3): per-band interpolation + temperature."""
  factor, original = scaling.factor, scaling.original_max_position_embeddings

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention = scaling.attention_factor
  if attention is None:
    if scaling.mscale and scaling.mscale_all_dim:
      attention = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
    else:
      attention = mscale(factor)

  def correction_dim(rotations):
    # The dim whose wavelength fits `rotations` times into the original context (eq. 17).
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # avoids 0 / 0, as in the reference implementation
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  extrapolate = 1.0 - ramp  # 1: keep the frequency (high freq), 0: interpolate (low freq)
  base = _base_inv_freq(head_dim, theta)
  return base / factor * (1 - extrapolate) + base * extrapolate, float(attention)


def _llama3(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
  """Llama-3.1 scaling: long wavelengths / factor, short ones kept, a smooth band in between."""
  base = _base_inv_freq(head_dim, theta)
  factor, original = scaling.factor, scaling.original_max_position_embeddings
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  wavelen = 2 * math.pi / base
  scaled = np.where(wavelen > original / low, base / factor, base)
  smooth = (original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= original / high) & (wavelen <= original / low)
  return np.where(medium, smoothed, scaled)


def _turn_words(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Split turns-per-tick g = freqs / (TICKS * 2 pi) into uint32 G1 and float32 g2 (see module)."""
  g = freqs / (TICKS * 2 * np.pi)
  scaled = (g - np.floor(g)) * 2.0**32
  g1 = np.floor(scaled)
  g2 = (scaled - g1) * 2.0**-32
  return g1.astype(np.uint32), g2.astype(np.float32)


def angles(ticks, freqs: np.ndarray) -> jax.Array:
  """Rotation angles in [0, 2 pi), float32[..., F], by the exact method of the module docstring.

  Args:
    ticks: int32[..., 1] positions in 1/256 (or int32[..., F], one per frequency, for M-RoPE).
    freqs: float64[F] inverse frequencies, rad per position.
  """
  g1, g2 = _turn_words(np.asarray(freqs, np.float64))
  ticks = jnp.asarray(ticks, jnp.int32)
  word = ticks.astype(jnp.uint32) * jnp.asarray(g1)  # wraps: exact mod 2^32
  turns = word.astype(jnp.float32) * 2.0**-32 + ticks.astype(jnp.float32) * jnp.asarray(g2)
  return (turns - jnp.floor(turns)) * (2 * np.pi)


def cos_sin(
  positions,
  head_dim: int,
  *,
  theta: float,
  scaling: RopeScaling | None = None,
  mrope_sections=None,
  seq_len: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotation angles, float32[B, S, H/2] each (attention factor applied).

  Computed once per forward pass and shared by every layer's queries and keys (`rotate`).
  Arguments as in `apply_rope`; `seq_len` (dynamic NTK) defaults to S.
  """
  pos = as_positions(positions)
  ticks = pos.ticks
  if seq_len is None:
    seq_len = ticks.shape[-1]
  freqs, attention = inv_freq(head_dim, theta, scaling, seq_len)
  if ticks.ndim == 3:
    if mrope_sections is None:
      raise ValueError(
        f"3-D (M-RoPE) positions {pos.shape} need mrope_sections, e.g. (16, 24, 24)."
      )
    if sum(mrope_sections) != head_dim // 2:
      raise ValueError(f"{mrope_sections=} must sum to head_dim / 2 = {head_dim // 2}.")
    # The frequencies of section i use position component i % 3: t, h, w (Qwen2-VL).
    component = np.repeat(np.arange(len(mrope_sections)) % 3, mrope_sections)
    ticks = jnp.moveaxis(jnp.take(ticks, jnp.asarray(component), axis=0), 0, -1)  # [B, S, H/2]
  elif ticks.ndim == 2:
    ticks = ticks[..., None]  # [B, S, 1]
  else:
    raise ValueError(f"positions {pos.shape} must be [B, S] or [3, B, S] (M-RoPE).")
  angle = angles(ticks, freqs)
  return jnp.cos(angle) * attention, jnp.sin(angle) * attention


def rotate(x, cos, sin) -> jax.Array:
  """Rotate-half RoPE of x [B, S, N, H] by cos/sin float32[B, S, H/2]; float32 math, x.dtype out."""
  if cos.shape != (*x.shape[:2], x.shape[-1] // 2):
    raise ValueError(f"cos/sin {cos.shape} do not match x {x.shape} ([B, S, N, H]).")
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def apply_rope(
  x,
  positions,
  *,
  theta: float,
  scaling: RopeScaling | None = None,
  mrope_sections=None,
  seq_len: int | None = None,
) -> jax.Array:
  """Rotates x by its positions (rotate-half layout).

  Args:
    x: [B, S, N, H] queries or keys, any float dtype.
    positions: `Positions` (int32 ticks [B, S], or [3, B, S] for M-RoPE), or a plain [B, S] array
      (integers = whole positions; floats are rounded to 1/256).
    theta: RoPE base.
    scaling: optional context extension (`RopeScaling`); YaRN's attention factor scales cos/sin.
    mrope_sections: M-RoPE split of the H/2 frequencies into (t, h, w) parts, e.g. (16, 24, 24);
      with [B, S] positions it changes nothing (t = h = w).
    seq_len: static length for dynamic NTK (the full sequence when x is a chunk); defaults to S.

  Returns:
    x rotated, same shape and dtype; computed in float32.
  """
  if x.shape[-1] % 2:
    raise ValueError(f"head_dim={x.shape[-1]} must be even for rotate-half RoPE.")
  cs = cos_sin(
    positions,
    x.shape[-1],
    theta=theta,
    scaling=scaling,
    mrope_sections=mrope_sections,
    seq_len=seq_len,
  )
  return rotate(x, *cs)
