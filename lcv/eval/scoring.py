"""Scoring a needle: teacher-forced exact match (LongVA's benchmark) or greedy generation.

The harness talks to a model through three methods (the `lcv.models.vlm.VLM` surface):

    encode_media(pixels float[B, F, P, P, 3]) -> float[B, F * n_tok, D]
    embed(tokens int32[B, S], visual_slot int32[B, S], visual_embeds float[B, F * n_tok, D])
        -> float[B, S, D]
    decode(x float[B, S, D], positions, mask, *, logits_at int32[B, L]) -> float[B, L, V]

Teacher forcing (vlm_methods.md section 1.5): the answer is appended to the prompt, one forward
pass runs, and the needle is correct iff argmax(logits) at positions prompt_len - 1 ...
prompt_len + A - 2 equals all A answer ids. Unlike LongVA we apply the LM head only at those A
positions (`logits_at`) and bring back only the argmax ids, never [S, V] logits.

Generation is greedy: an `lcv.models.vlm.VLM` decodes with its KV cache (`lcv.models.generate`),
other models rerun the sequence per new token. A needle is correct iff the decoded text, stripped,
starts with the answer (case-insensitive): LongVA's sampling demo has no scorer, and a prefix
match accepts "C" and "C. Panda" alike.

Case inputs are gathered on device from one embedding table [rows, n_tok, D] (haystack frames,
needle, distractor) by a row order, so the host never assembles 432K x D arrays per case.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcv import masks
from lcv import positions as positions_lib
from lcv.config import VLMConfig
from lcv.eval import cases
from lcv.eval.cases import Sequence


class EvalModel(Protocol):
  """What the harness needs of a model (shapes in the module docstring)."""

  def encode_media(self, pixels: jax.Array) -> jax.Array: ...

  def embed(self, tokens, visual_slot, visual_embeds) -> jax.Array: ...

  def decode(self, x, positions, mask, *, logits_at=None) -> jax.Array: ...


def model_inputs(seq: Sequence, *, frame_bidirectional: bool = False, v2pe_delta=None) -> dict:
  """Per-token model inputs of one case, batch 1, natural order (numpy / jax arrays).

  Positions are LongVA's plain 1-D arange, or V2PE with a fixed `v2pe_delta` at inference; the
  mask is the layout's interval mask (causal, or frame-block-causal for TC-LLaVA-style models).
  The whole video (haystack, needle and distractor frames) is one visual item.
  """
  seg = seq.segment_ids[None]
  frame_ids = seq.frame_ids[None]
  modality = (seq.visual_slot >= 0).astype(np.int32)[None]
  item_ids = np.where(modality == 1, 0, -1).astype(np.int32)
  if v2pe_delta is None:
    pos = positions_lib.one_d(seg)
  else:
    pos = positions_lib.v2pe(modality, seg, item_ids, v2pe_delta)
  return {
    "tokens": seq.tokens[None],
    "visual_slot": seq.visual_slot[None],
    "positions": pos,
    "mask": masks.token_mask(seg, frame_ids, frame_bidirectional),
  }


def layout_inputs(vlm_config, v2pe_delta=None, prompt_multiple: int = 128):
  """Inputs function for `lcv.models.vlm.VLM`: the case as one packed sample
  [Text(pre), Video(frames, n_tok), Text(rest)] through `lcv.models.vlm.prepare_inputs`, so the
  positions (1-D / V2PE / TAD / M-RoPE) and the mask follow the model's own config.

  inputs(seq) covers the whole (right-padded) sequence; inputs(seq, prompt_only=True) only the
  prompt before the answer, left-padded to a multiple of `prompt_multiple`, with "segment_ids",
  as `lcv.models.generate.generate` takes it.
  """
  from lcv import layout as layout_lib
  from lcv.models import vlm

  def inputs(seq: Sequence, prompt_only: bool = False) -> dict:
    real = seq.answer_start if prompt_only else seq.length
    total = cases.pad_length(real, prompt_multiple) if prompt_only else len(seq.tokens)
    visual = np.flatnonzero(seq.visual_slot[:real] >= 0)
    if visual.size:
      n_tok = int(np.sum(seq.frame_ids == 0))
      side = int(round(np.sqrt(n_tok)))
      grid = (side, side) if side * side == n_tok else None
      pre, end = int(visual[0]), int(visual[-1]) + 1
      chunks = [layout_lib.Text(pre)] if pre else []
      chunks += [layout_lib.Video((end - pre) // n_tok, n_tok, grid=grid)]
      chunks += [layout_lib.Text(real - end)]
    else:
      chunks = [layout_lib.Text(real)]
    layout = layout_lib.pack([chunks], total, num_rows=1)
    tokens = np.zeros(total, np.int32)
    tokens[:real] = seq.tokens[:real]
    if prompt_only:  # left padding: every row of a generate batch writes its cache in step
      shift = total - real
      layout = layout_lib.Layout(
        **{f.name: np.roll(getattr(layout, f.name), shift, axis=-1)
           for f in dataclasses.fields(layout)}
      )  # fmt: skip
      tokens = np.roll(tokens, shift)
    out = vlm.prepare_inputs(layout, tokens[None], vlm_config, v2pe_delta)
    keys = ("tokens", "visual_slot", "positions", "mask") + (("segment_ids",) * prompt_only)
    return {k: out[k] for k in keys}

  return inputs


def inputs_for(model, *, v2pe_delta=None, frame_bidirectional: bool = False):
  """The inputs function of a model: `layout_inputs` for an `lcv.models.vlm.VLM` (its config
  decides positions and mask), else `model_inputs` (1-D or V2PE positions)."""
  cfg = getattr(model, "cfg", None)
  if isinstance(cfg, VLMConfig):
    return layout_inputs(cfg, v2pe_delta)
  return functools.partial(
    model_inputs, frame_bidirectional=frame_bidirectional, v2pe_delta=v2pe_delta
  )


def jitted(model, name: str):
  """A jitted `model.<name>`: nnx.jit for NNX modules, jax.jit for plain objects."""
  if isinstance(model, nnx.Module):
    fn = nnx.jit(lambda m, *a, **k: getattr(m, name)(*a, **k))
    return functools.partial(fn, model)
  return jax.jit(getattr(model, name))


def _argmax_at(model, table, rows, tokens, visual_slot, positions, mask, logits_at):
  """Gather the case's visual tokens, run embed + decode, return argmax ids int32[1, L].

  table None: a text-only case (text NIAH); embed gets visual_embeds=None.
  """
  visual = None
  if table is not None:
    visual = jnp.take(table, rows, axis=0).reshape(1, -1, table.shape[-1])
  x = model.embed(tokens, visual_slot, visual)
  logits = model.decode(x, positions, mask, logits_at=logits_at)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


class Scorer:
  """Scores cases of one model. `table`: float[rows, n_tok, D] cached embeddings (on device), or
  None for text-only cases (then `rows` is None too).

  Args:
    model: an `EvalModel` (NNX module or plain object).
    inputs: Sequence -> dict of tokens, visual_slot, positions, mask (default
      `inputs_for(model)`).
    shard: optional callable placing the per-token inputs on devices and returning them, plus the
      natural -> device order permutation of the sequence (None: natural order); see
      `lcv.eval.vniah.context_sharding`.
    answer_width: logits_at is edge-padded to this width (one compilation for all answers).
  """

  def __init__(
    self,
    model,
    table,
    *,
    inputs=None,
    shard=None,
    answer_width: int = 8,
  ):
    self.model = model
    self.table = table
    self.inputs = inputs or inputs_for(model)
    self.shard = shard
    self.answer_width = answer_width
    # NNX modules go through nnx.jit as an argument; plain objects are closed over.
    if isinstance(model, nnx.Module):
      self._fn = functools.partial(nnx.jit(_argmax_at), model)
    else:
      self._fn = jax.jit(functools.partial(_argmax_at, model))

  def predict(self, seq: Sequence, rows, logits_at: np.ndarray) -> np.ndarray:
    """Argmax ids int32[L] at natural positions `logits_at` int[L] of the case."""
    inputs: dict[str, Any] = self.inputs(seq)
    at = logits_at[None].astype(np.int32)
    if self.shard is not None:
      inputs, perm = self.shard(inputs)
      if perm is not None:  # where each natural position sits in device order
        at = np.asarray(np.argsort(perm)[at], np.int32)
    ids = self._fn(
      self.table,
      None if rows is None else jnp.asarray(rows),
      inputs["tokens"],
      inputs["visual_slot"],
      inputs["positions"],
      inputs["mask"],
      jnp.asarray(at),
    )
    return np.asarray(jax.device_get(ids))[0]

  def teacher_forced(self, seq: Sequence, rows) -> tuple[bool, list[int]]:
    """(all answer tokens predicted exactly, predicted ids)."""
    a = len(seq.answer)
    width = max(self.answer_width, a)
    pred = self.predict(seq, rows, seq.logits_at(width))[:a]
    return bool(np.array_equal(pred, seq.answer)), pred.tolist()

  def generate(self, seq: Sequence, rows, max_new_tokens: int, eos_ids=()) -> list[int]:
    """Greedy ids after the prompt, up to the first of `eos_ids`.

    An `lcv.models.vlm.VLM` decodes with its KV cache (`lcv.models.generate`: one prefill, then
    one token per step). Other models rerun the whole sequence per token (the answer slots of
    `seq` are overwritten; `seq` must hold max_new_tokens slots after answer_start,
    `cases.build_sequence(extra=...)`).
    """
    if isinstance(getattr(self.model, "cfg", None), VLMConfig):
      return self._generate_cached(seq, rows, max_new_tokens, eos_ids)
    start = seq.answer_start
    if start + max_new_tokens > len(seq.tokens):
      raise ValueError(
        f"{max_new_tokens=} needs {start + max_new_tokens} slots but the sequence has "
        f"{len(seq.tokens)}; build it with extra >= {max_new_tokens}"
      )
    tokens = seq.tokens.copy()
    tokens[start:] = 0
    segment_ids = np.zeros_like(seq.segment_ids)
    out: list[int] = []
    for t in range(max_new_tokens):
      segment_ids[: start + t] = 1  # the prompt and the t tokens generated so far
      step = Sequence(tokens, seq.visual_slot, seq.frame_ids, segment_ids, start, seq.answer)
      at = np.full(self.answer_width, start + t - 1, np.int32)
      next_id = int(self.predict(step, rows, at)[0])
      if next_id in eos_ids:
        break
      out.append(next_id)
      tokens[start + t] = next_id
    return out

  def _generate_cached(self, seq, rows, max_new_tokens, eos_ids):
    from lcv.models import generate as generate_lib

    batch = self.inputs(seq, prompt_only=True)
    if self.table is not None:
      d = self.table.shape[-1]
      batch["visual_embeds"] = jnp.take(self.table, jnp.asarray(rows), axis=0).reshape(1, -1, d)
    ids = generate_lib.generate(
      self.model, batch, max_new_tokens=max_new_tokens, eos_id=eos_ids[0] if eos_ids else None
    )
    out = []
    for i in np.asarray(jax.device_get(ids))[0].tolist():
      if i in eos_ids:
        break
      out.append(int(i))
    return out


def generated_correct(text: str, answer: str) -> bool:
  """Prefix match, stripped and case-insensitive (generation-mode scoring)."""
  return text.strip().lower().startswith(answer.strip().lower())
