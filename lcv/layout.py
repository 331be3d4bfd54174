"""Token layout: samples of text, images and videos packed into rows (DESIGN.md section 2).

A sample is a list of chunks: `Text(n)`, `Image(n)`, `Video(frames, tokens_per_frame, separator)`.
`pack` places whole samples into rows of `seq_len` tokens, greedily first-fit in input order, and
describes every token by small int arrays [B, S] from which masks (`lcv.masks`), positions
(`lcv.positions`) and sharding are derived. Host-side numpy, for the data pipeline.

    layout = pack([[Text(3), Image(4), Text(2)], [Video(2, 3, separator=1)]], seq_len=16)
    layout.segment_ids[0]  # [1 1 1 1 1 1 1 1 1 2 2 2 2 2 2 2]
    layout.frame_ids[0]    # [-1 -1 -1 0 0 0 0 -1 -1 0 0 0 -1 1 1 1]

Axis letters: B batch (rows), S sequence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TEXT, VISUAL = 0, 1


@dataclasses.dataclass(frozen=True)
class Text:
  """n text tokens."""

  n: int


@dataclasses.dataclass(frozen=True)
class Image:
  """One image (or tile) of n visual tokens; `grid` = (rows, cols) of its tokens, for M-RoPE."""

  n: int
  grid: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Video:
  """`frames` frames of `tokens_per_frame` visual tokens, `separator` text tokens between frames."""

  frames: int
  tokens_per_frame: int
  separator: int = 0
  grid: tuple[int, int] | None = None


Chunk = Text | Image | Video


@dataclasses.dataclass(frozen=True)
class Layout:
  """Per-token description of packed rows; every array is int32[B, S] unless noted.

  segment_ids: 0 padding, 1..n the packed samples of a row, in order.
  modality: 0 text (and padding), 1 visual.
  frame_ids: -1 text; per sample, the frame/image index across all its visual items (0, 1, ...).
  item_ids: -1 text; per sample, the index of the visual item (image or video).
  sample_ids: index of the token's sample in the input list; -1 padding.
  chunk_ids: index of the token's chunk within its sample; -1 padding.
  offsets: where the token's content comes from within its chunk: the token index of a Text chunk;
    for visual tokens the index among the item's visual tokens (frame-major); for a video's
    separator tokens the index among its separator tokens; -1 padding.
  grid_hw: int32[2, B, S] (rows, cols) of each visual token's item grid (Qwen2-VL M-RoPE); 0 text.
  """

  segment_ids: np.ndarray
  modality: np.ndarray
  frame_ids: np.ndarray
  item_ids: np.ndarray
  sample_ids: np.ndarray
  chunk_ids: np.ndarray
  offsets: np.ndarray
  grid_hw: np.ndarray

  @property
  def shape(self) -> tuple[int, int]:
    return self.segment_ids.shape

  @property
  def num_items(self) -> int:
    """Visual items per sample, at most: the width of per-item arrays (V2PE deltas)."""
    return int(self.item_ids.max(initial=-1)) + 1

  @property
  def num_tokens(self) -> np.ndarray:
    """int32[B]: non-padding tokens per row."""
    return (self.segment_ids != 0).sum(axis=1).astype(np.int32)


def chunk_length(chunk: Chunk) -> int:
  """Number of tokens of a chunk (validated)."""
  if isinstance(chunk, Text | Image):
    if chunk.n <= 0:
      raise ValueError(f"{chunk} is empty: n={chunk.n} must be >= 1; drop empty chunks.")
    if isinstance(chunk, Image) and chunk.grid is not None:
      _check_grid(chunk, chunk.n)
    return chunk.n
  if isinstance(chunk, Video):
    if chunk.frames <= 0 or chunk.tokens_per_frame <= 0:
      raise ValueError(
        f"{chunk} needs frames >= 1 and tokens_per_frame >= 1, got {chunk.frames=}, "
        f"{chunk.tokens_per_frame=}."
      )
    if chunk.separator < 0:
      raise ValueError(f"{chunk}: {chunk.separator=} must be >= 0.")
    if chunk.grid is not None:
      _check_grid(chunk, chunk.tokens_per_frame)
    return chunk.frames * chunk.tokens_per_frame + (chunk.frames - 1) * chunk.separator
  raise TypeError(f"Unknown chunk {chunk!r}; use Text(n), Image(n) or Video(frames, tokens).")


def _check_grid(chunk, n: int) -> None:
  rows, cols = chunk.grid
  if rows <= 0 or cols <= 0 or rows * cols != n:
    raise ValueError(f"{chunk}: grid {chunk.grid} must hold exactly {n} tokens per frame.")


def sample_length(sample) -> int:
  """Tokens of a sample (a non-empty list of chunks)."""
  if not sample:
    raise ValueError("A sample needs at least one chunk; got an empty sample.")
  return sum(chunk_length(c) for c in sample)


def first_fit(lengths, seq_len: int, num_rows: int | None = None) -> list[list[int]]:
  """Greedy first-fit: sample i goes to the first row with room (a new row if none has).

  Returns the sample indices of each row, in input order.
  """
  rows, free = [], []
  for i, n in enumerate(lengths):
    if n > seq_len:
      raise ValueError(f"Sample {i} has {n} tokens > {seq_len=}; shorten it or raise seq_len.")
    row = next((r for r, f in enumerate(free) if f >= n), None)
    if row is None:
      if num_rows is not None and len(rows) == num_rows:
        raise ValueError(
          f"Sample {i} ({n} tokens) does not fit in {num_rows=} rows of {seq_len=}; "
          "pass fewer samples or more rows."
        )
      rows.append([])
      free.append(seq_len)
      row = len(rows) - 1
    rows[row].append(i)
    free[row] -= n
  return rows


def _chunk_tokens(chunk: Chunk, first_frame: int, item: int):
  """(modality, frame, item, offset, grid_h, grid_w) int arrays of one chunk's tokens."""
  if isinstance(chunk, Text):
    n = chunk.n
    minus = np.full(n, -1)
    return np.zeros(n), minus, minus, np.arange(n), np.zeros(n), np.zeros(n)
  if isinstance(chunk, Image):
    chunk = Video(1, chunk.n, 0, chunk.grid)
  per, sep = chunk.tokens_per_frame, chunk.separator
  pos = np.arange(chunk_length(chunk))
  frame, r = pos // (per + sep), pos % (per + sep)
  visual = r < per
  offset = np.where(visual, frame * per + r, frame * sep + r - per)
  rows, cols = chunk.grid or (1, per)
  return (
    visual.astype(int),
    np.where(visual, first_frame + frame, -1),
    np.where(visual, item, -1),
    offset,
    np.where(visual, rows, 0),
    np.where(visual, cols, 0),
  )


def pack(samples, seq_len: int, num_rows: int | None = None) -> Layout:
  """Packs samples (lists of chunks) into rows of `seq_len` tokens; a sample never splits.

  Args:
    samples: sequence of samples, each a non-empty list of `Text` / `Image` / `Video`.
    seq_len: S, tokens per row.
    num_rows: B; by default as many rows as first-fit needs. Extra rows are all padding.

  Returns:
    `Layout` with int32 arrays [B, S].
  """
  lengths = [sample_length(s) for s in samples]
  rows = first_fit(lengths, seq_len, num_rows)
  b = len(rows) if num_rows is None else num_rows
  fields = ("segment_ids", "modality", "frame_ids", "item_ids", "sample_ids", "chunk_ids")
  out = {f: np.zeros((b, seq_len), np.int32) for f in fields}
  for f in ("frame_ids", "item_ids", "sample_ids", "chunk_ids"):
    out[f][:] = -1
  offsets = np.full((b, seq_len), -1, np.int32)
  grid = np.zeros((2, b, seq_len), np.int32)
  for r, members in enumerate(rows):
    start = 0
    for seg, i in enumerate(members, start=1):
      frames = items = 0
      for c, chunk in enumerate(samples[i]):
        mod, frame, item, offset, gh, gw = _chunk_tokens(chunk, frames, items)
        sl = slice(start, start + len(mod))
        out["segment_ids"][r, sl] = seg
        out["modality"][r, sl] = mod
        out["frame_ids"][r, sl] = frame
        out["item_ids"][r, sl] = item
        out["sample_ids"][r, sl] = i
        out["chunk_ids"][r, sl] = c
        offsets[r, sl] = offset
        grid[0, r, sl], grid[1, r, sl] = gh, gw
        start = sl.stop
        if not isinstance(chunk, Text):
          frames += chunk.frames if isinstance(chunk, Video) else 1
          items += 1
  return Layout(offsets=offsets, grid_hw=grid, **out)


def _runs_are_unique(keys: np.ndarray) -> np.ndarray:
  """bool[B]: every key value (>= 0) of a row forms one contiguous run."""
  ok = np.ones(keys.shape[0], bool)
  for r, row in enumerate(keys):
    starts = np.concatenate([[True], row[1:] != row[:-1]]) & (row >= 0)
    ok[r] = starts.sum() == np.unique(row[row >= 0]).size
  return ok


def check_contiguous(layout: Layout) -> None:
  """Raises ValueError unless segments and frames are contiguous runs and the arrays agree.

  The interval mask (`lcv.masks.intervals`) is exact only under this invariant.
  """
  seg, mod = np.asarray(layout.segment_ids), np.asarray(layout.modality)
  frame, item = np.asarray(layout.frame_ids), np.asarray(layout.item_ids)
  bad_seg = ~_runs_are_unique(np.where(seg > 0, seg, -1))
  if bad_seg.any():
    raise ValueError(f"Segments are not contiguous in rows {np.flatnonzero(bad_seg).tolist()}.")
  visual = mod == VISUAL
  if not np.array_equal(visual, frame >= 0) or not np.array_equal(visual, item >= 0):
    r, t = np.argwhere((visual != (frame >= 0)) | (visual != (item >= 0)))[0]
    raise ValueError(
      f"Token ({r}, {t}): modality={mod[r, t]} disagrees with frame_ids={frame[r, t]} / "
      f"item_ids={item[r, t]} (visual tokens need both >= 0, text both -1)."
    )
  if (visual & (seg == 0)).any():
    raise ValueError("Padding tokens (segment 0) must be text with frame_ids = -1.")
  # One key per (segment, frame); -1 for text.
  key = np.where(visual, seg.astype(np.int64) * (int(frame.max(initial=0)) + 1) + frame, -1)
  bad_frame = ~_runs_are_unique(key)
  if bad_frame.any():
    raise ValueError(f"Frames are not contiguous in rows {np.flatnonzero(bad_frame).tolist()}.")
