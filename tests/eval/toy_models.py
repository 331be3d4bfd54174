"""Models for the evaluation tests: a tiny random fixture VLM, oracles whose answers are known, and
the real `lcv.models.vlm.VLM` at a tiny size with random weights (`tiny_vlm`).

All implement the harness protocol (`lcv.eval.scoring.EvalModel`): encode_media, embed, decode
with logits_at.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcv import masks
from lcv.config import DecoderConfig, ProjectorConfig, VisionConfig, VLMConfig
from lcv.models import vlm
from lcv.rope import apply_rope

NEEDLE_COLOUR = (255, 0, 255)  # the oracle sees a needle in any frame of this uniform colour


class TinyVLM(nnx.Module):
  """A 2-layer decoder with a patch-mean vision path: 4 tokens per frame, dense masked attention.

  The mask is evaluated from `TokenMask` intervals and global key indices, so it is exact in any
  token order (zig-zag included) and under GSPMD sequence sharding.
  """

  def __init__(self, vocab: int = 259, dim: int = 32, heads: int = 2, layers: int = 2, *, rngs):
    self.vocab, self.dim, self.heads = vocab, dim, heads
    self.patch = nnx.Linear(3, dim, rngs=rngs)
    self.tok = nnx.Embed(vocab, dim, rngs=rngs)
    self.qkv = nnx.List([nnx.Linear(dim, 3 * dim, rngs=rngs) for _ in range(layers)])
    self.out = nnx.List([nnx.Linear(dim, dim, rngs=rngs) for _ in range(layers)])
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def encode_media(self, pixels):
    """float[B, F, P, P, 3] -> [B, F * 4, D]: mean colour of the 4 quadrants, projected."""
    b, f, p, _, c = pixels.shape
    quads = pixels.reshape(b, f, 2, p // 2, 2, p // 2, c).mean(axis=(3, 5))
    return self.patch(quads.reshape(b, f * 4, c))

  def embed(self, tokens, visual_slot, visual_embeds):
    text = self.tok(tokens)
    if visual_embeds is None:  # text-only input
      return text
    slot = jnp.maximum(visual_slot, 0)
    visual = jnp.take_along_axis(visual_embeds, slot[..., None], axis=1)
    return jnp.where((visual_slot >= 0)[..., None], visual, text)

  def decode(self, x, positions, mask, *, logits_at=None):
    b, s, _ = x.shape
    h = self.dim // self.heads
    allow = masks.allowed(mask.lo, mask.hi, mask.index)  # [B, T, S]
    for qkv, out in zip(self.qkv, self.out):
      q, k, v = jnp.split(qkv(x).reshape(b, s, 3 * self.heads, h), 3, axis=2)
      q = apply_rope(q, positions, theta=10_000.0)
      k = apply_rope(k, positions, theta=10_000.0)
      logits = jnp.einsum("btnh,bsnh->bnts", q, k) * h**-0.5
      logits = jnp.where(allow[:, None], logits, -1e30)
      probs = jax.nn.softmax(logits, axis=-1) * jnp.any(allow, -1)[:, None, :, None]
      x = x + out(jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(b, s, -1))
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    return self.head(x)


class Oracle:
  """Answers correctly iff a needle frame lies within `window` tokens before the prediction.

  embed packs (token id, needle mark) into x; decode "predicts" the token that follows each
  requested position (it reads the teacher-forced answer, so a correct `logits_at` gives exact
  matches and an off-by-one gives none) when a needle token is close enough, else a wrong token.
  Needle images are uniform NEEDLE_COLOUR frames (`needle_image`).
  """

  def __init__(
    self,
    vocab: int = 259,
    window: int = 10_000,
    tokens_per_frame: int = 3,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
  ):
    self.vocab, self.window, self.n_tok = vocab, window, tokens_per_frame
    self.mark = (np.asarray(NEEDLE_COLOUR) / 255 - np.asarray(mean)) / np.asarray(std)

  def encode_media(self, pixels):
    b, f = pixels.shape[:2]
    needle = jnp.all(jnp.abs(pixels - self.mark) < 1e-2, axis=(2, 3, 4))  # [B, F]
    feat = jnp.stack([jnp.zeros((b, f)), needle.astype(jnp.float32)], -1)
    return jnp.repeat(feat, self.n_tok, axis=1)  # [B, F * n_tok, 2]

  def embed(self, tokens, visual_slot, visual_embeds):
    slot = jnp.maximum(visual_slot, 0)
    visual = jnp.take_along_axis(visual_embeds, slot[..., None], axis=1)[..., 1]
    needle = jnp.where(visual_slot >= 0, visual, 0.0)
    return jnp.stack([tokens.astype(jnp.float32), needle], -1)

  def decode(self, x, positions, mask, *, logits_at=None):
    index = mask.index  # global (natural) index of every token, in any order
    order = jnp.argsort(index, axis=1)
    natural = jnp.take_along_axis(x, order[..., None], axis=1)  # back to natural order
    at = jnp.take_along_axis(index, logits_at, axis=1)  # [B, L] natural positions
    nxt = jnp.take_along_axis(natural[..., 0], jnp.minimum(at + 1, x.shape[1] - 1), axis=1)
    s = natural.shape[1]
    near = (jnp.arange(s)[None, None] <= at[..., None]) & (
      jnp.arange(s)[None, None] > at[..., None] - self.window
    )
    seen = jnp.any(near & (natural[:, None, :, 1] > 0), axis=-1)
    pred = jnp.where(seen, nxt, (nxt + 1) % self.vocab).astype(jnp.int32)
    return jax.nn.one_hot(pred, self.vocab)


def needle_image(size: int = 16) -> np.ndarray:
  """uint8[size, size, 3] of NEEDLE_COLOUR."""
  return np.broadcast_to(np.asarray(NEEDLE_COLOUR, np.uint8), (size, size, 3)).copy()


class TextOracle:
  """Text-only oracle: predicts the true next token iff that token occurs among the tokens
  (window, 8] positions back, i.e. it "retrieves" the 7-digit number only when the needle (the one
  place digits occur) is within `window` tokens; the 8-token gap skips the answer's own digits.
  """

  def __init__(self, vocab: int = 259, window: int = 10_000):
    self.vocab, self.window = vocab, window

  def embed(self, tokens, visual_slot, visual_embeds):
    return tokens.astype(jnp.float32)[..., None]

  def decode(self, x, positions, mask, *, logits_at=None):
    order = jnp.argsort(mask.index, axis=1)
    natural = jnp.take_along_axis(x[..., 0], order, axis=1)  # [B, S] token ids, natural order
    at = jnp.take_along_axis(mask.index, logits_at, axis=1)  # [B, L]
    s = natural.shape[1]
    nxt = jnp.take_along_axis(natural, jnp.minimum(at + 1, s - 1), axis=1)
    j = jnp.arange(s)[None, None]
    near = (j <= at[..., None] - 8) & (j > at[..., None] - self.window)
    seen = jnp.any(near & (natural[:, None, :] == nxt[..., None]), axis=-1)
    pred = jnp.where(seen, nxt, (nxt + 1) % self.vocab).astype(jnp.int32)
    return jax.nn.one_hot(pred, self.vocab)


def tiny_vlm(impl="xla", seed=0):
  """A tiny VLM with random weights, built abstractly and filled from numpy (eager init of the
  real modules takes ~10 s per tower on a loaded CPU; this takes milliseconds)."""
  cfg = VLMConfig(
    decoder=DecoderConfig.variant("tiny", attention_impl=impl),
    vision=VisionConfig.variant("tiny"),
    projector=ProjectorConfig(in_dim=32, out_dim=64),
  )
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: vlm.VLM(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
      return np.zeros(x.shape, x.dtype)
    if "scale" in jax.tree_util.keystr(path):  # norm scales near 1 keep activations alive
      return (1 + 0.1 * rng.normal(size=x.shape)).astype(x.dtype)
    fan_in = x.shape[-2] if x.ndim >= 2 else 1
    return (rng.normal(size=x.shape) / np.sqrt(fan_in)).astype(x.dtype)

  state = jax.tree_util.tree_map_with_path(fill, abstract)
  return nnx.merge(graphdef, state)
