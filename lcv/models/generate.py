"""Autoregressive generation with a KV cache: chunked prefill, then one token per jitted step.

    out = generate(model, prepare_inputs(layout, tokens, cfg) | {"pixels": px},
                   max_new_tokens=32, sampling=Sampling(temperature=0.7, top_p=0.9), key=key)

Prompts are left-padded to a common length S0 (padding is segment 0, so the interval mask hides
it and positions restart at the prompt's first real token); every row then writes its cache at the
same slot. The prompt is prefilled `prefill_chunk` tokens at a time, so a 1M-token prompt needs
activations for one chunk only (the cache holds S0 + max_new_tokens keys); a chunk is extended
to the end of a bidirectional frame it would otherwise cut. A generated token is
text: it attends to its whole sample (lo = the prompt's segment start, hi = itself) and its
position continues the prompt's: ceil(max prompt position) + 1 + n for the n-th new token, the
V2PE rule (text resumes at +1 after the last visual position), TAD's (text adds 1; the frame term
stays) and M-RoPE's (text continues from the row's max over t, h, w).

Under a mesh whose "length" rule splits the sequence (`lcv.parallel.rules`), the cache is sharded
along it and each step attends per shard, merged by log-sum-exp
(`lcv.parallel.ring_attention.sharded_decode_attention`).

Axis letters: B batch, S sequence, D model dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcv.masks import TokenMask
from lcv.models.decoder import init_cache
from lcv.positions import TICKS, Positions


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn: temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"{self.temperature=} must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ValueError(f"{self.top_k=} must be >= 0 (0 = no top-k)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"{self.top_p=} must be in (0, 1] (1 = no nucleus cut)")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens int32[B] from logits float[B, V]."""
  logits = logits.astype(jnp.float32)
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    # Nucleus (Holtzman et al. 2020): keep the smallest prefix of the sorted distribution whose
    # mass reaches top_p; a token stays if the mass before it is still below top_p.
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cut = jnp.where(before < sampling.top_p, sorted_logits, -jnp.inf)
    logits = (
      jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(cut)
    )
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, tokens, visual_slot, pixels, visual_embeds):
  model = nnx.merge(graphdef, state)
  if visual_embeds is None and pixels is not None:
    visual_embeds = model.encode_media(pixels)
  return model.embed(tokens, visual_slot, visual_embeds)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, state, x, positions, mask, cache):
  """One prompt chunk into the cache; logits float32[B, V] of its last token."""
  model = nnx.merge(graphdef, state)
  last = jnp.full((x.shape[0], 1), x.shape[1] - 1, jnp.int32)
  logits, cache = model.decode(x, positions, mask, logits_at=last, cache=cache)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _step(graphdef, state, token, ticks, lo, cache, key, sampling):
  """Append one text token per row and draw the next: (next int32[B], logits [B, V], cache)."""
  model = nnx.merge(graphdef, state)
  b = token.shape[0]
  index = jnp.broadcast_to(cache.length, (b, 1)).astype(jnp.int32)
  mask = TokenMask(lo=lo[:, None], hi=index, index=index)
  x = model.decoder.embed(token[:, None])
  logits, cache = model.decode(
    x, Positions(ticks), mask, logits_at=jnp.zeros((b, 1), jnp.int32), cache=cache
  )
  return sample(logits[:, 0], key, sampling), logits[:, 0], cache


def _next_ticks(prompt: Positions, steps: int, mrope: bool) -> jax.Array:
  """Ticks of generated token n (n = 0..steps-1): int32[steps, B, 1] or [steps, 3, B, 1]."""
  t = prompt.ticks
  top = jnp.max(t, axis=(0, 2) if mrope else 1)  # [B]: the row's largest position
  base = -(-top // TICKS) * TICKS + TICKS  # ceil to a whole position, then +1
  n = jnp.arange(steps, dtype=jnp.int32)[:, None] * TICKS
  ticks = (base[None, :] + n)[..., None]  # [steps, B, 1]
  if mrope:
    ticks = jnp.broadcast_to(ticks[:, None], (steps, 3, *ticks.shape[1:]))
  return ticks


def _prefill_chunks(hi, chunk: int) -> list[slice]:
  """Prompt slices of about `chunk` tokens that never split a bidirectional frame.

  A frame token attends to the whole frame (hi = frame end), so a chunk is extended until every
  key its queries see is in it or already cached.
  """
  hi = np.asarray(hi).max(axis=0)  # [S0], natural order
  s0, start, out = hi.shape[0], 0, []
  while start < s0:
    end = min(start + chunk, s0)
    while end < s0 and hi[start:end].max() >= end:
      end = int(hi[start:end].max()) + 1
    out.append(slice(start, end))
    start = end
  return out


def generate(
  model,
  batch: dict,
  *,
  max_new_tokens: int,
  sampling: Sampling = Sampling(),
  key: jax.Array | None = None,
  prefill_chunk: int | None = None,
  eos_id: int | None = None,
  return_logits: bool = False,
):
  """Continue left-padded prompts.

  Args:
    model: a `lcv.models.vlm.VLM`.
    batch: `prepare_inputs` dict of the prompts (one sample per row, left-padded to S0), plus
      "pixels" or "visual_embeds" when they have media.
    max_new_tokens: tokens to generate per row.
    sampling: greedy by default.
    key: PRNG key (required unless greedy).
    prefill_chunk: prompt tokens per prefill step; default the whole prompt at once.
    eos_id: once a row emits it, the row keeps emitting it.
    return_logits: also return the logits each token was drawn from.

  Returns:
    int32[B, max_new_tokens], and with `return_logits` float32[B, max_new_tokens, V].
  """
  if max_new_tokens < 1:
    raise ValueError(f"{max_new_tokens=} must be >= 1")
  if sampling.temperature > 0 and key is None:
    raise ValueError(f"sampling with {sampling.temperature=} needs a PRNG key")
  key = jax.random.key(0) if key is None else key
  tokens, mask, pos = batch["tokens"], batch["mask"], batch["positions"]
  b, s0 = tokens.shape
  chunk = s0 if prefill_chunk is None else prefill_chunk
  if chunk < 1:
    raise ValueError(f"{prefill_chunk=} must be >= 1")
  seg = batch.get("segment_ids")
  if seg is not None and bool(jnp.any(jnp.max(seg, axis=1) > 1)):
    raise ValueError("generate takes one sample per row (segment_ids <= 1); unpack the prompts")

  graphdef, state = nnx.split(model)
  x = _embed(
    graphdef, state, tokens, batch["visual_slot"], batch.get("pixels"), batch.get("visual_embeds")
  )
  cache = init_cache(model.cfg.decoder, b, s0 + max_new_tokens)
  mrope = pos.ticks.ndim == 3
  for sl in _prefill_chunks(mask.hi, chunk):
    chunk_pos = Positions(pos.ticks[..., sl])
    chunk_mask = TokenMask(*(m[:, sl] for m in mask))
    logits, cache = _prefill(graphdef, state, x[:, sl], chunk_pos, chunk_mask, cache)

  key, sub = jax.random.split(key)
  token = sample(logits, sub, sampling)
  ticks = _next_ticks(pos, max_new_tokens, mrope)
  lo = mask.lo[:, -1]
  done = jnp.zeros((b,), bool)
  out, all_logits = [], [logits]
  for n in range(max_new_tokens):
    if eos_id is not None:
      token = jnp.where(done, eos_id, token)
      done = done | (token == eos_id)
    out.append(token)
    if n + 1 == max_new_tokens:
      break
    key, sub = jax.random.split(key)
    token, logits, cache = _step(graphdef, state, token, ticks[n], lo, cache, sub, sampling)
    all_logits.append(logits)
  out = jnp.stack(out, axis=1)
  return (out, jnp.stack(all_logits, axis=1)) if return_logits else out
