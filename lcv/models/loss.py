"""Next-token cross-entropy that never materialises [S, V] logits, and per-token loss weights.

At S = 256K and V = 152K the full logits are 39G floats per row. `chunked_cross_entropy` scans over
sequence chunks, applies the LM head to one chunk at a time and takes the log-sum-exp in float32,
so peak memory is one [B, C, V] block (LongVA's `low_mem_cross_ent` idea, in jnp). Given the head's
weight it also forms the chunk's gradients in the same pass (the "fused linear cross-entropy" of
Liger-Kernel, arXiv 2410.10989): the loss is the last op of the step, so its cotangent is a
scalar, and each chunk's dlogits can be built before that scalar is known.

Targets and weights are built on the host in natural token order (`next_token_targets`), before
any zig-zag reordering, so the loss itself is order-free: it only sums over tokens.

Axis letters: B batch, S sequence, C chunk, D model dim, V vocab.
"""

from __future__ import annotations

import functools
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
  weights = jnp.asarray(weights, jnp.float32)
  _, _, aux = _stats(logits.astype(jnp.float32), targets, weights)
  return aux["ce"] + z_loss * aux["z_loss"], jnp.sum(weights), aux


def _stats(logits, targets, weights):
  """lse [B, C], the target's logit [B, C] and the summed metrics of float32 logits [B, C, V]."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  aux = {
    "ce": jnp.sum((lse - target) * weights),
    "z_loss": jnp.sum(jnp.square(lse) * weights),
    "correct": jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights),
  }
  return lse, target, aux


def chunked_cross_entropy(
  hidden: jax.Array,
  head: Callable[[jax.Array], jax.Array] | jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  *,
  chunk: int = 2048,
  z_loss: float = 0.0,
  head_layout: str = "DV",
):
  """Weighted next-token cross-entropy without [S, V] logits.

  Two schedules, one result:
  - `head` a weight array (`Decoder.head()` gives it): the fused schedule. The forward pass forms
    each chunk's gradients too (dlogits = w * ((1 + 2 z lse) softmax - onehot), then dh and dW),
    keeps dh and the float32 dW sum, and the backward only scales them by the loss's cotangent.
    The logits are formed once per step instead of twice, the weight is cast to the compute dtype
    once instead of per chunk, and dW accumulates in float32 straight from the matmul. Without
    differentiation (eval) only the forward statistics run.
  - `head` a function h[B, C, D] -> logits[B, C, V] (e.g. `Decoder.logits`): each chunk is
    rematerialised in the backward pass (`jax.checkpoint`), for heads that are not one matmul.

  Args:
    hidden: float[B, S, D] final hidden states (after the final norm), in the compute dtype.
    head: the LM head: its weight (any float dtype; the matmul runs in hidden's dtype with float32
      logits) laid out per `head_layout`, or a function as above.
    targets: int[B, S] target ids. weights: float[B, S], 0 where there is no target.
    chunk: C, tokens per step; S is padded up to a multiple with weight 0.
    z_loss: coefficient of the PaLM z-loss, z_loss * sum(w * lse^2), which keeps the softmax
      normaliser near 1 (Chowdhery et al. 2022, section 5).
    head_layout: "DV" (an untied head, [D, V]) or "VD" (a tied embedding table, [V, D]).

  Returns:
    sum_loss: float32[] sum of w * CE plus the z-loss term; divide by sum_weight for the mean.
      Differentiable in hidden, the head weight and the loss weights.
    sum_weight: float32[] sum of weights.
    aux: {"ce": sum w * CE, "z_loss": sum w * lse^2, "correct": sum w * [argmax == target]};
      metrics, not differentiated (no gradient flows through them).
  """
  b, s, d = hidden.shape
  if targets.shape != (b, s) or weights.shape != (b, s):
    raise ValueError(f"{targets.shape=} and {weights.shape=} must both be [B, S] = {(b, s)}")
  if chunk < 1:
    raise ValueError(f"{chunk=} must be >= 1")
  if head_layout not in _HEAD_EQS:
    raise ValueError(f"{head_layout=}; use 'DV' ([D, V], untied) or 'VD' ([V, D], tied)")
  weights = jnp.asarray(weights, jnp.float32)
  if not callable(head):
    if head.ndim != 2 or head.shape[0 if head_layout == "DV" else 1] != d:
      raise ValueError(f"LM head weight {head.shape} must be {head_layout} with D = {d}")
    sum_loss, aux = _fused(hidden, head, targets, weights, chunk, float(z_loss), head_layout)
    return sum_loss, jnp.sum(weights), jax.lax.stop_gradient(aux)

  chunk = min(chunk, s)
  n, blocks, (hidden, targets, weights) = _chunked(chunk, hidden, targets, weights)

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


# einsums of the fused schedule per head layout: logits, dh, dW.
_HEAD_EQS = {
  "DV": ("BCD,DV->BCV", "BCV,DV->BCD", "BCD,BCV->DV"),
  "VD": ("BCD,VD->BCV", "BCV,VD->BCD", "BCV,BCD->VD"),
}


def _chunked(chunk, hidden, targets, weights):
  """Pads S to a multiple of `chunk` (weight 0); returns (n, to_blocks, padded arrays)."""
  b, s, _ = hidden.shape
  pad = -s % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  n = (s + pad) // chunk
  blocks = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
  return n, blocks, (hidden, targets, weights)


def _fused_scan(hidden, w, targets, weights, chunk, z_loss, layout, *, grads):
  """The fused schedule's loop; with `grads`, also dh [B, S, D], dW float32 and d/dweights."""
  b, s, _ = hidden.shape
  chunk = min(chunk, s)
  n, blocks, (h_all, t_all, wt_all) = _chunked(chunk, hidden, targets, weights)
  wc = w.astype(hidden.dtype)  # once per step, not once per chunk
  eq_logits, eq_dh, eq_dw = _HEAD_EQS[layout]

  def body(carry, xs):
    total, dw = carry
    h, t, wt = xs
    logits = jnp.einsum(eq_logits, h, wc, preferred_element_type=jnp.float32)
    logits = layers.constrain(logits, ("batch", None, "act_vocab"))
    lse, target, aux = _stats(logits, t, wt)
    total = jax.tree.map(jnp.add, total, aux)
    if not grads:
      return (total, dw), None
    # d(sum w (lse - target) + z w lse^2) / dlogits = w ((1 + 2 z lse) softmax - onehot).
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    coef = (wt * (1.0 + 2.0 * z_loss * lse))[..., None]
    g = coef * jnp.exp(logits - lse[..., None]) - jnp.where(vocab == t[..., None], wt[..., None], 0)
    g = g.astype(h.dtype)
    dh = jnp.einsum(eq_dh, g, wc)
    dw = dw + jnp.einsum(
      eq_dw, *((h, g) if layout == "DV" else (g, h)), preferred_element_type=jnp.float32
    )
    return (total, dw), (dh, lse - target + z_loss * jnp.square(lse))

  zero = {k: jnp.zeros((), jnp.float32) for k in ("ce", "z_loss", "correct")}
  dw0 = jnp.zeros(w.shape, jnp.float32) if grads else None
  (total, dw), per_chunk = jax.lax.scan(
    body, (zero, dw0), (blocks(h_all), blocks(t_all), blocks(wt_all))
  )
  sum_loss = total["ce"] + z_loss * total["z_loss"]
  if not grads:
    return sum_loss, total
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * chunk, *x.shape[3:])[:, :s]
  dh, per_token = per_chunk
  return sum_loss, total, (unblock(dh), dw, unblock(per_token))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hidden, w, targets, weights, chunk, z_loss, layout):
  return _fused_scan(hidden, w, targets, weights, chunk, z_loss, layout, grads=False)


def _fused_fwd(hidden, w, targets, weights, chunk, z_loss, layout):
  sum_loss, total, res = _fused_scan(hidden, w, targets, weights, chunk, z_loss, layout, grads=True)
  return (sum_loss, total), (*res, w)  # w only for its dtype: a reference, not a copy


def _fused_bwd(chunk, z_loss, layout, saved, cts):
  dh, dw, per_token, w = saved
  g = cts[0]  # the aux metrics leave through stop_gradient: their cotangents are zero
  return (g * dh).astype(dh.dtype), (g * dw).astype(w.dtype), None, g * per_token


_fused.defvjp(_fused_fwd, _fused_bwd)
