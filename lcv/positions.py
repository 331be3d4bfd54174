"""Exact position ids: 1-D, V2PE, TAD (dual) RoPE and M-RoPE (DESIGN.md section 2).

Positions are fixed point: `Positions.ticks` is int32 in units of 1/256 (`TICKS`), V2PE's smallest
stride. Float32 cannot carry them: at 2^20 its ulp is 1/16, sixteen times the stride, so positions
are built and kept as integers and only `lcv.rope` turns them into angles. int32 ticks cover
|position| < 2^23 (8M).

All builders are pure jnp functions of the per-token layout arrays (`lcv.layout`), vectorised with
scans (cumsum / cummax) rather than loops over tokens, jit-able, and restart at 0 in every packed
segment; padding (segment 0) gets position 0.

Axis letters: B batch, S sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcv.config import RopeConfig

TICKS = 256  # fixed-point units per position step
MAX_TICKS = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class Positions:
  """Exact positions, a pytree with one leaf.

  ticks: int32[B, S] (1-D, V2PE, TAD) or int32[3, B, S] (M-RoPE t, h, w), in units of 1/TICKS.
  """

  ticks: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.ticks.shape)


jax.tree_util.register_dataclass(Positions, data_fields=["ticks"], meta_fields=[])


def to_float64(positions: Positions) -> np.ndarray:
  """Host float64 values of `positions` (exact: every tick count is a float64 integer)."""
  return np.asarray(positions.ticks, np.int64).astype(np.float64) / TICKS


def as_positions(positions) -> Positions:
  """`Positions` from a Positions or a plain array: integer dtype = whole positions, float dtype =
  positions rounded to the nearest 1/TICKS (in float64 for host arrays, float32 for jax arrays)."""
  if isinstance(positions, Positions):
    return positions
  if not isinstance(positions, jax.Array):  # host values: exact conversion, range checked
    p = np.asarray(positions)
    ticks = np.round(p.astype(np.float64) * TICKS)
    if ticks.size and np.abs(ticks).max() > MAX_TICKS:
      raise ValueError(
        f"Position {np.abs(p).max()} is outside the int32 fixed-point range (|position| < 2^23)."
      )
    return Positions(jnp.asarray(ticks.astype(np.int32)))
  if jnp.issubdtype(positions.dtype, jnp.integer):
    return Positions(positions.astype(jnp.int32) * TICKS)
  return Positions(jnp.round(positions.astype(jnp.float32) * TICKS).astype(jnp.int32))


def _check_range(seq_len: int, per_token: float, what: str) -> None:
  """Positions grow by at most `per_token` per token, so the static length bounds them."""
  bound = (seq_len - 1) * per_token * TICKS
  if bound > MAX_TICKS:
    longest = int(MAX_TICKS / (per_token * TICKS)) + 1
    raise ValueError(
      f"{what} positions of a {seq_len=} sequence can reach {bound / TICKS:.0f}, beyond the int32 "
      f"fixed-point range (|position| < 2^23 at 1/{TICKS} resolution); use seq_len <= {longest}."
    )


def _host(x) -> np.ndarray | None:
  """The numpy value of x, or None while tracing (checks on values run only eagerly)."""
  try:
    return np.asarray(x)
  except jax.errors.TracerArrayConversionError:
    return None


def _runs(segment_ids):
  """Segment ids, token indices and each token's segment-start index, int32[B, S] each."""
  seg = jnp.asarray(segment_ids, jnp.int32)
  b, s = seg.shape
  idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  first = jnp.ones((b, 1), bool)
  seg_start = jnp.concatenate([first, seg[:, 1:] != seg[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(seg_start, idx, 0), axis=1)
  return seg, idx, start


def _segment_cumsum(inc, start):
  """Inclusive cumsum of int32[B, S] `inc` that restarts at every segment start."""
  total = jnp.cumsum(inc, axis=1, dtype=jnp.int32)
  before = total - inc  # exclusive cumsum
  return total - jnp.take_along_axis(before, start, axis=1)


def _item_runs(seg, modality, item_ids, idx):
  """Visual flags, each token's item-run start index and item-run end flags, [B, S] each.

  An item run is a stretch of visual tokens of one item (a video's frames split by separator text
  are several runs).
  """
  visual = jnp.asarray(modality) == 1
  item = jnp.asarray(item_ids, jnp.int32)
  b = seg.shape[0]
  prev_differs = (
    (seg[:, 1:] != seg[:, :-1]) | (item[:, 1:] != item[:, :-1]) | ~visual[:, :-1] | ~visual[:, 1:]
  )
  run_start = jnp.concatenate([jnp.ones((b, 1), bool), prev_differs], axis=1)
  start = jax.lax.cummax(jnp.where(run_start, idx, 0), axis=1)
  next_differs = jnp.concatenate([prev_differs, jnp.ones((b, 1), bool)], axis=1)
  run_end = visual & next_differs
  return visual, start, run_end


def one_d(segment_ids) -> Positions:
  """1-D positions: each token's index within its segment; padding 0.

  Args:
    segment_ids: int[B, S].

  Returns:
    Positions with int32[B, S] ticks.
  """
  _check_range(np.shape(segment_ids)[-1], 1.0, "1-D")
  seg, idx, start = _runs(segment_ids)
  return Positions(jnp.where(seg == 0, 0, (idx - start) * TICKS))


def _delta_ticks(delta, item_ids):
  """Per-token V2PE stride in ticks, int32[B, S], from a float or a [B, n_items] array."""
  d = jnp.asarray(delta)
  values = _host(d)
  if values is not None:
    values = values.astype(np.float64).reshape(-1)
    ok = np.isin(values * TICKS, 2.0 ** np.arange(9))
    if not ok.all():
      bad = values[~ok][:4].tolist()
      raise ValueError(
        f"V2PE delta values {bad} are not of the form 1/2^k with 0 <= k <= 8 "
        f"(1, 1/2, ..., 1/{TICKS}); only those strides are exact in 1/{TICKS} fixed point."
      )
  d_ticks = jnp.round(d.astype(jnp.float32) * TICKS).astype(jnp.int32)
  if d_ticks.ndim == 0:
    return jnp.broadcast_to(d_ticks, item_ids.shape)
  if d_ticks.ndim != 2 or d_ticks.shape[0] != item_ids.shape[0]:
    raise ValueError(
      f"V2PE delta of shape {d.shape} must be a scalar or [B, n_items], B = {item_ids.shape[0]}."
    )
  items = _host(item_ids)
  if items is not None and d_ticks.shape[1] <= items.max(initial=-1):
    raise ValueError(
      f"V2PE delta has {d_ticks.shape[1]} items per row but item_ids go up to "
      f"{int(items.max())}; pass one delta per item (Layout.num_items)."
    )
  return jnp.take_along_axis(d_ticks, jnp.maximum(item_ids, 0), axis=1)


def v2pe(modality, segment_ids, item_ids, delta) -> Positions:
  """V2PE positions (OpenGVLab V2PE, `get_rope_pos_id`): fractional strides for visual tokens.

  Per segment, last = -1; a text token sits at ceil(last) + 1; the k-th visual token of an item
  (k = 1..N) at last + k * delta; after the item last = ceil(last visual position), also when the
  next token belongs to another item. delta = 1 gives the 1-D positions exactly.

  Vectorised: text adds TICKS, a visual token adds delta ticks, and the ceil after an item run
  (which starts on an integer) adds (-run_ticks) mod TICKS; a per-segment cumsum of these is the
  position.

  Args:
    modality: int[B, S]; 0 text, 1 visual.
    segment_ids: int[B, S]; 0 padding.
    item_ids: int[B, S]; visual item index per sample, -1 for text.
    delta: a float, or float[B, n_items] (one stride per item, indexed by item_ids); values must be
      1/2^k, 0 <= k <= 8 (checked when concrete).

  Returns:
    Positions with int32[B, S] ticks.
  """
  _check_range(np.shape(segment_ids)[-1], 1.0, "V2PE")
  seg, idx, seg_start = _runs(segment_ids)
  item = jnp.asarray(item_ids, jnp.int32)
  visual, item_start, item_end = _item_runs(seg, modality, item, idx)
  d = _delta_ticks(delta, item)
  inc = jnp.where(visual, d, TICKS)
  # An item run of n tokens adds n * d ticks; the ceil that follows rounds up to a whole step. It is
  # applied to the token after the run, so it is the run-end's correction shifted right by one.
  run_ticks = (idx - item_start + 1) * d
  ceil = jnp.where(item_end, (-run_ticks) % TICKS, 0)
  inc = inc + jnp.pad(ceil[:, :-1], ((0, 0), (1, 0)))
  # The first token of a segment does not inherit the previous segment's correction.
  inc = jnp.where(idx == seg_start, jnp.where(visual, d, TICKS), inc)
  ticks = _segment_cumsum(inc, seg_start) - TICKS
  return Positions(jnp.where(seg == 0, 0, ticks))


def sample_v2pe_deltas(key, num_items_shape) -> jax.Array:
  """V2PE training strides: float32 of `num_items_shape`, uniform over {1, 1/2, ..., 1/256}.

  V2PE draws the stride independently per image (`v2pe_rnd`); pass [B, n_items] for one per item.
  """
  k = jax.random.randint(key, tuple(num_items_shape), 0, 9)
  # A table, not exp2: exact powers of two on every backend.
  return jnp.asarray(2.0 ** -np.arange(9), jnp.float32)[k]


def tad(modality, segment_ids, frame_ids, gamma: float = 1.0, base: Positions | None = None):
  """TAD (temporal-aware dual) RoPE positions of TC-LLaVA (arXiv 2409.03206): p + gamma * tau.

  p is the 1-D position (or `base`, e.g. V2PE); tau is the token's frame index for visual tokens
  and, for text, the number of frames already seen in the segment. Rotating by p and then by tau
  equals rotating by their sum, so one position per token carries both (as in VideoRoPE's TAD
  comparison code).

  Args:
    modality: int[B, S]; 0 text, 1 visual.
    segment_ids: int[B, S].
    frame_ids: int[B, S]; -1 text, per-sample frame index for visual tokens.
    gamma: weight of the temporal term; gamma * 256 must be an integer (exact fixed point).
    base: Positions int32[B, S] to add the temporal term to; default `one_d(segment_ids)`.

  Returns:
    Positions with int32[B, S] ticks.
  """
  g = gamma * TICKS
  if g != round(g):
    raise ValueError(f"TAD {gamma=} must be a multiple of 1/{TICKS} to stay exact.")
  _check_range(np.shape(segment_ids)[-1], 1.0 + abs(gamma), "TAD")
  seg, idx, seg_start = _runs(segment_ids)
  if base is None:
    base = one_d(segment_ids)
  visual = jnp.asarray(modality) == 1
  frame = jnp.asarray(frame_ids, jnp.int32)
  # Frames seen by a text token = the frame id of the last visual token before it, + 1, if that
  # token is in the same segment.
  last_visual = jax.lax.cummax(jnp.where(visual, idx, -1), axis=1)
  seen = jnp.take_along_axis(frame, jnp.maximum(last_visual, 0), axis=1) + 1
  seen = jnp.where(last_visual >= seg_start, seen, 0)
  tau = jnp.where(visual, frame, seen)
  ticks = base.ticks + int(round(g)) * tau
  return Positions(jnp.where(seg == 0, 0, ticks))


def mrope(modality, segment_ids, frame_ids, item_ids, grid_hw) -> Positions:
  """Qwen2-VL M-RoPE ids (t, h, w) (`get_rope_index`; DESIGN section 2).

  Text: t = h = w = running index. A visual item starts at st = (previous max) + 1 and its token
  (frame f within the item, row r, col c) of a (grid_h, grid_w) grid per frame gets
  (st + f, st + r, st + c); text after the item resumes at st + max(F, grid_h, grid_w), i.e. the
  item's max + 1. Restarts per segment.

  Args:
    modality: int[B, S]; 0 text, 1 visual.
    segment_ids: int[B, S].
    frame_ids: int[B, S]; per-sample frame index (-1 text); tokens of a frame are row-major.
    item_ids: int[B, S]; per-sample item index (-1 text).
    grid_hw: (grid_h, grid_w) for every item, or int[2, B, S]: each visual token's item grid.

  Returns:
    Positions with int32[3, B, S] ticks.
  """
  _check_range(np.shape(segment_ids)[-1], 1.0, "M-RoPE")
  seg, idx, seg_start = _runs(segment_ids)
  item = jnp.asarray(item_ids, jnp.int32)
  frame = jnp.asarray(frame_ids, jnp.int32)
  visual, item_start, item_end = _item_runs(seg, modality, item, idx)
  if isinstance(grid_hw, tuple | list) and len(grid_hw) == 2:
    grid_h = jnp.full(seg.shape, int(grid_hw[0]), jnp.int32)
    grid_w = jnp.full(seg.shape, int(grid_hw[1]), jnp.int32)
  else:
    grid_h, grid_w = jnp.asarray(grid_hw, jnp.int32)
  new_frame = jnp.pad(frame[:, 1:] != frame[:, :-1], ((0, 0), (1, 0))) | (idx == item_start)
  frame_start = jax.lax.cummax(jnp.where(new_frame, idx, 0), axis=1)
  within = idx - frame_start
  # Every frame must hold grid_h * grid_w tokens (checked when the layout is concrete).
  frame_end = visual & jnp.pad(new_frame[:, 1:], ((0, 0), (0, 1)), constant_values=True)
  bad = _host(frame_end & (within + 1 != grid_h * grid_w))
  if bad is not None and bad.any():
    r, t = np.argwhere(bad)[0]
    raise ValueError(
      f"M-RoPE frame ending at token ({r}, {t}) has {int(within[r, t]) + 1} tokens, but its grid "
      f"{int(grid_h[r, t])} x {int(grid_w[r, t])} needs their product; pass each item's grid."
    )
  first_frame = jnp.take_along_axis(frame, item_start, axis=1)
  f = frame - first_frame
  # Text advances 1; an item advances max(F, grid_h, grid_w) at its last token.
  advance = jnp.maximum(jnp.maximum(f + 1, grid_h), grid_w)
  inc = jnp.where(visual, jnp.where(item_end, advance, 0), 1)
  st = _segment_cumsum(inc, seg_start) - inc  # exclusive: start of the token (or its item)
  t = st + jnp.where(visual, f, 0)
  h = st + jnp.where(visual, within // jnp.maximum(grid_w, 1), 0)
  w = st + jnp.where(visual, within % jnp.maximum(grid_w, 1), 0)
  ids = jnp.stack([t, h, w])
  return Positions(jnp.where(seg[None] == 0, 0, ids * TICKS))


def from_config(
  config: RopeConfig, modality, segment_ids, frame_ids, item_ids, *, grid_hw=None, key=None
) -> Positions:
  """The positions `config.positions` asks for, from the layout arrays (int[B, S] each).

  V2PE draws one stride per item from `key` when `config.v2pe_random` (training), else uses
  `config.v2pe_delta`. M-RoPE needs `grid_hw` ((grid_h, grid_w) or int[2, B, S], see `mrope`).
  """
  kind = config.positions
  if kind == "1d":
    return one_d(segment_ids)
  if kind == "mrope":
    if grid_hw is None:
      raise ValueError("M-RoPE positions need grid_hw (Layout.grid_hw or (grid_h, grid_w)).")
    return mrope(modality, segment_ids, frame_ids, item_ids, grid_hw)
  if kind == "tad":
    return tad(modality, segment_ids, frame_ids, config.tad_gamma)
  delta = config.v2pe_delta
  if config.v2pe_random:
    if key is None:
      raise ValueError("RopeConfig(v2pe_random=True) needs a PRNG key to draw the strides.")
    # Item ids are < S, so S columns hold one stride per item under jit (static shapes).
    delta = sample_v2pe_deltas(key, np.shape(segment_ids))
  return v2pe(modality, segment_ids, item_ids, delta)
