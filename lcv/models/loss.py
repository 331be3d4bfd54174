"""Next-token cross-entropy that never materialises [S, V] logits, and per-token loss weights.

At S = 256K and V = 152K the full logits are 39G floats per row. `chunked_cross_entropy` scans over
sequence chunks, applies the LM head to one chunk at a time, takes the log-sum-exp in float32 and
rematerialises the chunk's logits in the backward pass, so peak memory is one [B, C, V] block
(LongVA's `low_mem_cross_ent` idea, in jnp).

Targets and weights are built on the host in natural token order (`next_token_targets`), before
any zig-zag reordering, so the loss itself is order-free: it only sums over tokens.

Axis letters: B batch, S sequence, C chunk, D model dim, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcv.layout import VISUAL
from lcv.models import layers


def next_token_targets(tokens, segment_ids, modality, *, text_weight=1.0, vision_weight=0.0):
  """Targets and weights of next-token prediction for packed rows (host numpy).

  Token i predicts token i + 1 when both are in the same sample. LWM (arXiv 2402.08268) weighs
  the loss on text and on vision targets separately; here by the modality of the *target* token.
  With continuous visual embeddings the ids at visual slots are placeholders, so the default
  vision weight is 0.

  Args:
    tokens, segment_ids, modality: int[B, S] in natural order.
    text_weight, vision_weight: loss weight of text / visual targets.

  Returns:
    (targets int32[B, S], weights float32[B, S]); the last token of every sample has weight 0.
  """
  tokens, seg, mod = (np.asarray(a) for a in (tokens, segment_ids, modality))
  targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
  next_seg = np.concatenate([seg[:, 1:], np.zeros_like(seg[:, :1])], axis=1)
  next_mod = np.concatenate([mod[:, 1:], np.zeros_like(mod[:, :1])], axis=1)
  same = (seg == next_seg) & (seg != 0)
  weights = np.where(next_mod == VISUAL, vision_weight, text_weight) * same
  return targets.astype(np.int32), weights.astype(np.float32)


def cross_entropy(logits, targets, weights, *, z_loss: float = 0.0):
  """Plain weighted cross-entropy from full logits [B, S, V] (short sequences and tests).

  Returns (sum_loss, sum_weight, aux) exactly like `chunked_cross_entropy`.
  """
  logits = logits.astype(jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  ce = jnp.sum((lse - target) * weights)
  z = jnp.sum(jnp.square(lse) * weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
  return ce + z_loss * z, jnp.sum(weights), {"ce": ce, "z_loss": z, "correct": correct}


def chunked_cross_entropy(
  hidden: jax.Array,
  head: Callable[[jax.Array], jax.Array] | jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  *,
  chunk: int = 2048,
  z_loss: float = 0.0,
):
  """Weighted next-token cross-entropy without [S, V] logits.

  Args:
    hidden: float[B, S, D] final hidden states (after the final norm).
    head: the LM head, either a function h[B, C, D] -> logits[B, C, V] (e.g. `Decoder.logits`)
      or its weight float[D, V].
    targets: int[B, S] target ids. weights: float[B, S], 0 where there is no target.
    chunk: C, tokens per step; S is padded up to a multiple with weight 0.
    z_loss: coefficient of the PaLM z-loss, z_loss * sum(w * lse^2), which keeps the softmax
      normaliser near 1 (Chowdhery et al. 2022, section 5).

  Returns:
    sum_loss: float32[] sum of w * CE plus the z-loss term; divide by sum_weight for the mean.
    sum_weight: float32[] sum of weights.
    aux: {"ce": sum w * CE, "z_loss": sum w * lse^2, "correct": sum w * [argmax == target]}.
  """
  b, s, d = hidden.shape
  if targets.shape != (b, s) or weights.shape != (b, s):
    raise ValueError(f"{targets.shape=} and {weights.shape=} must both be [B, S] = {(b, s)}")
  if chunk < 1:
    raise ValueError(f"{chunk=} must be >= 1")
  if not callable(head):
    w = head
    if w.shape[0] != d:
      raise ValueError(f"LM head weight {w.shape} must be [D, V] with D = {d}")
    head = lambda h: layers.logits_dot("BCD,DV->BCV", h, w.astype(h.dtype))
  chunk = min(chunk, s)
  pad = -s % chunk
  weights = jnp.asarray(weights, jnp.float32)
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  n = (s + pad) // chunk
  blocks = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  # Recompute each chunk's logits in the backward pass instead of saving n * [B, C, V].
  @jax.checkpoint
  def step(h, t, w):
    _, _, aux = cross_entropy(head(h), t, w)
    return aux

  def body(total, xs):
    aux = step(*xs)
    return jax.tree.map(jnp.add, total, aux), None

  zero = {k: jnp.zeros((), jnp.float32) for k in ("ce", "z_loss", "correct")}
  total, _ = jax.lax.scan(body, zero, (blocks(hidden), blocks(targets), blocks(weights)))
  return total["ce"] + z_loss * total["z_loss"], jnp.sum(weights), total
