"""The vision-language model: vision tower + projector + decoder, and its host-side inputs.

    inputs = prepare_inputs(layout, tokens, cfg)          # host, natural token order
    inputs["pixels"] = pixels                             # or inputs["visual_embeds"] = cached
    hidden = VLM(cfg, rngs=nnx.Rngs(0))(inputs)           # [B, S, D]

`prepare_inputs` derives everything order-dependent (visual slots, positions, the interval mask)
from the `lcv.layout.Layout` once, in natural order; the whole dict may then be zig-zag reordered
as one pytree (`lcv.parallel.context`) and the model never recomputes any of it. Media are
encoded frame by frame (frames folded into the batch, `VisionConfig.frame_chunk` at a time) and
spliced into the text stream by `visual_slot`: the index of a token's embedding among its row's
visual tokens, frame-major, as LongVA / LLaVA concatenate frames without separators (UniRes).

Parameter tree: `vision.*` (`lcv.models.vision`), `projector.*` (`lcv.models.projector`),
`decoder.*` (`lcv.models.decoder`).

Axis letters: B batch, S sequence, F frames per row, P visual tokens per frame, D model dim,
L logits positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcv import masks, positions
from lcv.config import VLMConfig
from lcv.layout import VISUAL, Layout
from lcv.models.decoder import Decoder, KVCache
from lcv.models.projector import Projector
from lcv.models.vision import VisionEncoder


def _host(x) -> np.ndarray | None:
  """x as numpy when concrete (eager call), None under tracing (checks then run before jit)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _frame_run_lengths(segment_ids, frame_ids, modality) -> np.ndarray:
  """Token counts of every contiguous visual frame run in the rows (host)."""
  seg, frame, vis = (np.asarray(a) for a in (segment_ids, frame_ids, modality))
  key = np.where(vis == VISUAL, seg * (frame.max(initial=0) + 2) + frame + 1, -1)
  lengths = []
  for row in key:
    change = np.flatnonzero(np.diff(row) != 0) + 1
    for run in np.split(row, change):
      if run[0] >= 0:
        lengths.append(run.size)
  return np.asarray(lengths, np.int64)


def prepare_inputs(layout: Layout, tokens, cfg: VLMConfig, v2pe_delta=None) -> dict:
  """Model inputs of a packed batch, in natural token order.

  Args:
    layout: `lcv.layout.Layout` of the rows (segments, modality, frames, items, M-RoPE grids).
    tokens: int[B, S] text ids (any id at visual slots).
    cfg: the VLM config; `cfg.decoder.rope.positions` picks 1-D / V2PE / TAD / M-RoPE and
      `cfg.frame_bidirectional` the mask.
    v2pe_delta: V2PE stride: a float, or float[B, n_items] one per visual item (the training
      sampler, `lcv.positions.sample_v2pe_deltas`); default `cfg.decoder.rope.v2pe_delta`.

  Returns:
    dict of "tokens", "visual_slot" (-1 text, else the token's index among its row's visual
    tokens), "modality", "segment_ids" (int32[B, S]), "positions" (`Positions`) and "mask"
    (`TokenMask`). Add "pixels" float[B, F, H, W, C] or "visual_embeds" float[B, F * P, D].
  """
  seg = np.asarray(layout.segment_ids, np.int32)
  modality = np.asarray(layout.modality, np.int32)
  tokens = np.asarray(tokens)
  if tokens.shape != seg.shape:
    raise ValueError(f"tokens shape {tokens.shape} must equal the layout's [B, S] {seg.shape}")
  n_tok = cfg.frame_tokens
  runs = _frame_run_lengths(seg, layout.frame_ids, modality)
  if runs.size and np.any(runs != n_tok):
    raise ValueError(
      f"every frame / image must have {n_tok} visual slots (tokens_per_frame, from the vision "
      f"tower and projector), but the layout has frames of {sorted(set(runs.tolist()))} tokens; "
      "build the layout with Image(n) / Video(frames, n) of that size"
    )
  visual = modality == VISUAL
  slot = np.where(visual, np.cumsum(visual, axis=1) - 1, -1).astype(np.int32)

  rope = cfg.decoder.rope
  kind = rope.positions
  if kind == "1d":
    pos = positions.one_d(seg)
  elif kind == "v2pe":
    delta = rope.v2pe_delta if v2pe_delta is None else v2pe_delta
    pos = positions.v2pe(modality, seg, layout.item_ids, delta)
  elif kind == "tad":
    pos = positions.tad(modality, seg, layout.frame_ids, gamma=rope.tad_gamma)
  elif kind == "mrope":
    pos = positions.mrope(modality, seg, layout.frame_ids, layout.item_ids, layout.grid_hw)
  else:
    raise ValueError(f"positions={kind!r}; choose 1d, v2pe, tad or mrope")
  if v2pe_delta is not None and kind != "v2pe":
    raise ValueError(f"v2pe_delta was given but the config uses {kind!r} positions")

  return {
    "tokens": jnp.asarray(tokens, jnp.int32),
    "visual_slot": jnp.asarray(slot),
    "modality": jnp.asarray(modality),
    "segment_ids": jnp.asarray(seg),
    "positions": pos,
    "mask": masks.token_mask(seg, layout.frame_ids, cfg.frame_bidirectional),
  }


class VLM(nnx.Module):
  """Vision tower + projector (absent for text-only or precomputed embeddings) + decoder."""

  def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    if cfg.vision is not None:
      self.vision = VisionEncoder(cfg.vision, rngs=rngs)
      self.projector = Projector(cfg.projector, rngs=rngs)
    self.decoder = Decoder(cfg.decoder, rngs=rngs)

  def encode_media(self, pixels: jax.Array) -> jax.Array:
    """Visual tokens of every frame of every row.

    Args:
      pixels: float[B, F, Hpx, Wpx, C] (F = max frames per row, zero-padded) or [B, H, W, C].

    Returns:
      float[B, F * P, D] in the decoder's compute dtype, frame-major.
    """
    if self.cfg.vision is None:
      raise ValueError("this VLM has no vision tower; pass precomputed 'visual_embeds' instead")
    if pixels.ndim == 4:
      pixels = pixels[:, None]
    if pixels.ndim != 5:
      raise ValueError(f"pixels must be [B, F, H, W, C] or [B, H, W, C]; got {pixels.shape}")
    self.vision.grid_of(*pixels.shape[2:4])  # a clear error for sizes the patch does not divide
    graph, state = nnx.split(self.projector)
    project = lambda feats: nnx.merge(graph, state)(feats)
    out = self.vision.encode_frames(pixels, fn=project)  # [B, F, P, D]
    b, f, p, d = out.shape
    return out.reshape(b, f * p, d).astype(jnp.dtype(self.cfg.decoder.dtype))

  def embed(self, tokens, visual_slot, visual_embeds=None) -> jax.Array:
    """Token embeddings with the visual tokens spliced in.

    Args:
      tokens: int[B, S]; ids at visual slots are ignored.
      visual_slot: int[B, S]; -1 for text, else the index into the row's visual_embeds.
      visual_embeds: float[B, F * P, D], or None for text-only rows.

    Returns:
      float[B, S, D] in the decoder's compute dtype.
    """
    is_visual = visual_slot >= 0
    x = self.decoder.embed(jnp.where(is_visual, 0, tokens))
    host = _host(visual_slot)
    needed = None if host is None else int(host.max(initial=-1)) + 1
    if visual_embeds is None:
      if needed:
        raise ValueError(f"the rows have {needed} visual slots but no pixels / visual_embeds")
      return x
    if visual_embeds.shape[0] != x.shape[0] or visual_embeds.shape[2] != x.shape[2]:
      raise ValueError(
        f"visual_embeds {visual_embeds.shape} must be [B, F * P, D] with B, D = "
        f"{x.shape[0]}, {x.shape[2]}"
      )
    if needed is not None and needed > visual_embeds.shape[1]:
      raise ValueError(
        f"the rows have up to {needed} visual slots but the media give only "
        f"{visual_embeds.shape[1]} visual tokens (F * tokens_per_frame); the number of visual "
        "slots must match the frames supplied"
      )
    picked = jnp.take_along_axis(
      visual_embeds.astype(x.dtype), jnp.maximum(visual_slot, 0)[..., None], axis=1
    )
    return jnp.where(is_visual[..., None], picked, x)

  def decode(self, x, positions, mask, *, logits_at=None, cache: KVCache | None = None):
    """The decoder on spliced embeddings; see `lcv.models.decoder.Decoder.__call__`."""
    return self.decoder(x, positions, mask, logits_at=logits_at, cache=cache)

  def __call__(self, batch: dict, *, logits_at=None) -> jax.Array:
    """Hidden states float[B, S, D] of a `prepare_inputs` batch (+ "pixels" or "visual_embeds");
    logits float32[B, L, V] at `logits_at` int32[B, L] when given."""
    visual = batch.get("visual_embeds")
    if visual is None and batch.get("pixels") is not None:
      visual = self.encode_media(batch["pixels"])
    x = self.embed(batch["tokens"], batch["visual_slot"], visual)
    return self.decode(x, batch["positions"], batch["mask"], logits_at=logits_at)
