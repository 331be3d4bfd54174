"""RoPE: float64 precision at 2^22, relative-position invariance, parity with transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcv import positions as P
from lcv.config import RopeScaling
from lcv.rope import apply_rope, inv_freq

B, S, N, H = 2, 16, 2, 64
THETA = 10_000.0


def rope64(x, pos, freqs, attention=1.0):
  """Float64 numpy reference: rotate-half RoPE at float64 positions [B, S]."""
  angle = pos[:, :, None, None] * freqs  # [B, S, 1, H/2]
  cos, sin = np.cos(angle) * attention, np.sin(angle) * attention
  x1, x2 = np.split(x.astype(np.float64), 2, axis=-1)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def unit_x(seed, shape=(B, S, N, H)):
  x = np.random.default_rng(seed).normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def far_ticks(seed, shape=(B, S)):
  """V2PE-like positions near +-2^22 with 1/256 fractions, as ticks."""
  rng = np.random.default_rng(seed)
  ticks = rng.integers(2**30 - 2**20, 2**30, size=shape) * rng.choice([-1, 1], size=shape)
  return ticks.astype(np.int32)


@pytest.mark.parametrize(
  "theta,scaling",
  [
    (10_000.0, None),
    (1_000_000.0, None),
    (500_000.0, RopeScaling("yarn", 8.0, 4096)),
    (500_000.0, RopeScaling("llama3", 8.0, 8192)),
  ],
)
def test_float64_precision_at_2_pow_22(theta, scaling):
  x = unit_x(0, (B, 64, N, 128))
  ticks = far_ticks(1, (B, 64))
  got = apply_rope(x, P.Positions(jnp.asarray(ticks)), theta=theta, scaling=scaling)
  freqs, attention = inv_freq(128, theta, scaling)
  want = rope64(x, ticks / P.TICKS, freqs, attention)
  assert np.abs(np.asarray(got, np.float64) - want).max() < 1e-4
  # The naive float32 angle is far off there: the test tells the methods apart.
  exact = ticks[:, :, None] / P.TICKS * freqs
  naive = (ticks / P.TICKS).astype(np.float32)[:, :, None] * freqs.astype(np.float32)
  assert np.abs(np.cos(naive.astype(np.float64)) - np.cos(exact)).max() > 1e-2


def test_relative_position_invariance():
  # <R(p) q, R(p + d) k> depends only on d, for fractional and far positions alike.
  q, k = unit_x(2, (1, 1, 1, H)), unit_x(3, (1, 1, 1, H))
  d = 37.25
  starts = np.array([0.0, 3.5, 1000.125, 2.0**21 + 0.00390625, 4_000_000.5, -123.75])
  qs = np.broadcast_to(q, (1, len(starts), 1, H))
  ks = np.broadcast_to(k, (1, len(starts), 1, H))
  rq = apply_rope(qs, starts[None], theta=THETA)
  rk = apply_rope(ks, starts[None] + d, theta=THETA)
  dots = np.asarray(jnp.sum(rq * rk, axis=-1))[0, :, 0]
  np.testing.assert_allclose(dots, dots[0], atol=1e-4)
  # And it does depend on d.
  other = np.asarray(jnp.sum(rq * apply_rope(ks, starts[None] + d + 1, theta=THETA), -1))
  assert np.abs(other[0, 0, 0] - dots[0]) > 1e-3


def test_plain_positions_and_dtypes():
  x = unit_x(4)
  pos = np.random.default_rng(5).integers(0, 5000, size=(B, S))
  freqs, _ = inv_freq(H, THETA)
  want = rope64(x, pos.astype(np.float64), freqs)
  for p in (pos, pos.astype(np.int32), pos.astype(np.float32), P.as_positions(pos)):
    np.testing.assert_allclose(apply_rope(x, p, theta=THETA), want, atol=2e-6)
  y = jax.jit(lambda x, p: apply_rope(x, p, theta=THETA))(
    x.astype(jnp.bfloat16), P.as_positions(pos)
  )
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=2e-2)


def test_errors():
  x = unit_x(6)
  with pytest.raises(ValueError, match="even"):
    apply_rope(x[..., :-1], np.zeros((B, S), np.int32), theta=THETA)
  three = P.Positions(jnp.zeros((3, B, S), jnp.int32))
  with pytest.raises(ValueError, match="mrope_sections"):
    apply_rope(x, three, theta=THETA)
  with pytest.raises(ValueError, match="sum to head_dim"):
    apply_rope(x, three, theta=THETA, mrope_sections=(8, 8, 8))
  with pytest.raises(ValueError, match="do not match"):
    apply_rope(x, np.zeros((B, S + 1), np.int32), theta=THETA)
  with pytest.raises(ValueError, match="original_max_position_embeddings"):
    RopeScaling("yarn", 4.0)


# --- parity with transformers ----------------------------------------------------------------

SCALINGS = {
  "default": (None, {"rope_type": "default"}),
  "linear": (RopeScaling("linear", 4.0), {"rope_type": "linear", "factor": 4.0}),
  "dynamic": (
    RopeScaling("dynamic", 4.0, 256),
    {"rope_type": "dynamic", "factor": 4.0},
  ),
  "yarn": (
    RopeScaling("yarn", 8.0, 256),
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256},
  ),
  "yarn_mscale": (
    RopeScaling(
      "yarn", 16.0, 256, beta_fast=24, beta_slow=2, mscale=1.0, mscale_all_dim=0.5, truncate=False
    ),
    {
      "rope_type": "yarn",
      "factor": 16.0,
      "original_max_position_embeddings": 256,
      "beta_fast": 24,
      "beta_slow": 2,
      "mscale": 1.0,
      "mscale_all_dim": 0.5,
      "truncate": False,
    },
  ),
  "llama3": (
    RopeScaling("llama3", 8.0, 256, low_freq_factor=1.0, high_freq_factor=4.0),
    {
      "rope_type": "llama3",
      "factor": 8.0,
      "original_max_position_embeddings": 256,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
    },
  ),
}


def hf_config(params):
  transformers = pytest.importorskip("transformers")
  return transformers.LlamaConfig(
    hidden_size=N * H,
    num_attention_heads=N,
    head_dim=H,
    max_position_embeddings=256,
    rope_parameters={"rope_theta": THETA, **params},
  )


@pytest.mark.parametrize("name", [n for n in SCALINGS if n != "default"])
def test_inv_freq_matches_transformers(name):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  scaling, params = SCALINGS[name]
  hf_freq, hf_attention = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config(params), seq_len=1000)
  freqs, attention = inv_freq(H, THETA, scaling, seq_len=1000)
  np.testing.assert_allclose(freqs, hf_freq.double().numpy(), rtol=2e-6)
  assert attention == pytest.approx(hf_attention, rel=1e-6)


def test_ntk_matches_transformers_dynamic_rule():
  # Static NTK-aware with alpha is HF's dynamic rule where factor * L / L0 - (factor - 1) = alpha.
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  config = hf_config({"rope_type": "dynamic", "factor": 2.0})
  hf_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=512)  # 2 * 512 / 256 - 1 = 3
  freqs, _ = inv_freq(H, THETA, RopeScaling("ntk", 3.0))
  np.testing.assert_allclose(freqs, hf_freq.double().numpy(), rtol=2e-6)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_apply_rope_matches_transformers(name):
  torch = pytest.importorskip("torch")
  from transformers.models.llama import modeling_llama

  scaling, params = SCALINGS[name]
  x = unit_x(7)
  pos = np.sort(np.random.default_rng(8).integers(0, 1000, size=(B, S)), axis=1)
  rotary = modeling_llama.LlamaRotaryEmbedding(hf_config(params))
  tx = torch.from_numpy(x)
  cos, sin = rotary(tx, torch.from_numpy(pos))  # dynamic: seq_len = max(pos) + 1
  want, _ = modeling_llama.apply_rotary_pos_emb(tx, tx, cos, sin, unsqueeze_dim=2)
  got = apply_rope(x, pos, theta=THETA, scaling=scaling, seq_len=int(pos.max()) + 1)
  # transformers forms pos * inv_freq in float32: ~1e-4 rad at position 1000.
  np.testing.assert_allclose(got, want.numpy(), atol=5e-4)


def test_mrope_matches_transformers():
  torch = pytest.importorskip("torch")
  from transformers import Qwen2VLConfig
  from transformers.models.qwen2_vl import modeling_qwen2_vl

  sections = (8, 12, 12)
  config = Qwen2VLConfig(
    text_config={
      "hidden_size": N * H,
      "num_attention_heads": N,
      "head_dim": H,
      "rope_parameters": {
        "rope_type": "default",
        "rope_theta": THETA,
        "mrope_section": list(sections),
      },
    },
  ).text_config
  ids = np.random.default_rng(9).integers(0, 500, size=(3, B, S))
  x = unit_x(10)
  rotary = modeling_qwen2_vl.Qwen2VLRotaryEmbedding(config)
  tx = torch.from_numpy(x)
  cos, sin = rotary(tx, torch.from_numpy(ids))
  want, _ = modeling_qwen2_vl.apply_rotary_pos_emb(tx, tx, cos, sin, unsqueeze_dim=2)
  got = apply_rope(
    x, P.Positions(jnp.asarray(ids * P.TICKS, jnp.int32)), theta=THETA, mrope_sections=sections
  )
  np.testing.assert_allclose(got, want.numpy(), atol=2e-4)
  # With t = h = w it is plain RoPE.
  same = P.Positions(jnp.asarray(np.broadcast_to(ids[:1], ids.shape) * P.TICKS, jnp.int32))
  np.testing.assert_allclose(
    apply_rope(x, same, theta=THETA, mrope_sections=sections),
    apply_rope(x, ids[0], theta=THETA),
    atol=1e-6,
  )
