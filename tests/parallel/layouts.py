"""Random packed layouts and the dense single-device attention oracle for the parallel tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lcv import masks


def random_layout(rng: np.random.Generator, batch: int, length: int, frame_len: int = 257):
  """(segment_ids, frame_ids) int32[B, S]: packed samples of text runs and frames, then padding.

  Samples and frames start at random offsets, so they cross every shard boundary; one frame per
  row has `frame_len` tokens (LWM's 257), the others are short.
  """
  seg = np.zeros((batch, length), np.int32)
  frame = np.full((batch, length), -1, np.int32)
  for b in range(batch):
    pos, sample, big_left = 0, 1, True
    stop = length - int(rng.integers(0, 16))  # trailing padding of 0..15 tokens
    while pos < stop:
      end = min(stop, pos + int(rng.integers(length // 8, length // 2)))
      seg[b, pos:end] = sample
      p, f = pos, 0
      while p < end:
        if rng.random() < 0.5:  # text run
          p += int(rng.integers(1, 24))
        else:  # a frame
          size = frame_len if big_left else int(rng.integers(3, 40))
          big_left = False
          frame[b, p : min(p + size, end)] = f
          f += 1
          p += size
      pos, sample = end, sample + 1
  return seg, frame


def reference_attention(q, k, v, segment_ids, frame_ids, frame_bidirectional=True):
  """Dense softmax attention with the DESIGN §2 mask, float32, on one device. [B, S, N, H]."""
  b, s, n, h = q.shape
  kv_heads = k.shape[2]
  allow = masks.dense(segment_ids, frame_ids, frame_bidirectional)[:, None]  # [B, 1, T, S]
  k = jnp.repeat(k, n // kv_heads, axis=2)
  v = jnp.repeat(v, n // kv_heads, axis=2)
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, precision="highest") * h**-0.5
  logits = jnp.where(allow, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  return jnp.einsum("BNTS,BSNH->BTNH", p, v, precision="highest")


def context_mesh(n: int) -> jax.sharding.Mesh:
  """A 1-axis ("context",) mesh over the first n devices."""
  devices = np.asarray(jax.devices()[:n])
  return jax.sharding.Mesh(devices, ("context",), axis_types=(jax.sharding.AxisType.Auto,))
