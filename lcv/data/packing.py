"""Masked sequence packing: many samples per fixed-length row, each sample kept to itself.

LWM (arXiv 2402.08268, section 3.2) trains on packed sequences with attention masked per sample and
loss re-weighted per sample kind; its public trainer packs without segment ids. A packed row is
described once, by `lcv.layout.Layout` (segment ids, modality, frame and item ids: the one mask
predicate and every kind of position derive from it, restarting in each sample), plus

  tokens   int32[S] text ids; the pad id at visual slots (the model embeds media there)
  targets  int32[S] the next token *of the same sample*; 0 at each sample's last token and padding
  weights  float32[S] loss weight of predicting `targets`: per-role weights (answer / prompt) from
           the data config; 0 across sample ends, at padding, and where the target is a visual
           slot (continuous media embeddings have no ids to predict)
  frames   uint8[R, H, W, 3] the row's frames in order, zero-padded to R = S // tokens_per_frame

Packing is greedy and in stream order, so a row is a pure function of the index of its first sample:
the packer's whole state is one integer cursor per row slot (`RowPacker`), which is what makes
resumption exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lcv import layout


@dataclasses.dataclass(frozen=True)
class Sample:
  """One tokenized sample in natural order.

  tokens: int32[L], the pad id at visual slots; weight: float32[L], the loss weight of each token
  *as a target*; frames: uint8[F, H, W, 3] (F may be 0); chunks: its `lcv.layout` description.
  """

  tokens: np.ndarray
  weight: np.ndarray
  frames: np.ndarray
  chunks: tuple

  def __len__(self) -> int:
    return len(self.tokens)


def tokenize(
  example: dict,
  tokenizer,
  tokens_per_frame: int,
  *,
  answer_weight: float = 1.0,
  prompt_weight: float = 0.0,
) -> Sample:
  """[bos] [frame 0 tokens] ... [frame F-1 tokens] "\\n" prompt " " answer [eos].

  `example` has "frames" uint8[F, H, W, 3] (F may be 0), "prompt" and "answer" strings. The frames
  form one `layout.Video` item (F frames of `tokens_per_frame` tokens).
  """
  frames = np.asarray(example["frames"], np.uint8)
  n_vis = frames.shape[0] * tokens_per_frame
  prompt = [tokenizer.bos_id] + tokenizer.encode("\n" + example["prompt"])
  answer = tokenizer.encode(" " + example["answer"]) + [tokenizer.eos_id]
  tokens = np.concatenate([prompt[:1], np.full(n_vis, tokenizer.pad_id), prompt[1:], answer])
  weight = np.concatenate(
    [np.full(len(prompt), prompt_weight), np.full(len(answer), answer_weight)]
  )
  weight = np.insert(weight, 1, np.zeros(n_vis))  # media have no ids to predict
  chunks = [layout.Text(1)]
  if n_vis:
    chunks.append(layout.Video(frames.shape[0], tokens_per_frame))
  chunks.append(layout.Text(len(prompt) - 1 + len(answer)))
  return Sample(tokens.astype(np.int32), weight.astype(np.float32), frames, tuple(chunks))


def row_frames(seq_len: int, tokens_per_frame: int, frames_per_row: int = 0) -> int:
  """R, the frame capacity of a row: `frames_per_row`, or all-visual (S // tokens_per_frame)."""
  return frames_per_row or max(seq_len // tokens_per_frame, 1)


def pack(
  samples: list[Sample],
  seq_len: int,
  tokens_per_frame: int,
  image_size: int,
  frames_per_row: int = 0,
) -> dict:
  """Pack samples (in order) into one row of `seq_len` tokens; see the module docstring.

  The per-token layout comes from `lcv.layout.pack` (one row, samples in order); token ids, targets
  and weights are laid over it here. frames_per_row: R (0: S // tokens_per_frame).
  """
  total = sum(len(s) for s in samples)
  capacity = row_frames(seq_len, tokens_per_frame, frames_per_row)
  n_frames = sum(s.frames.shape[0] for s in samples)
  if total > seq_len or n_frames > capacity:
    raise ValueError(
      f"samples of {total} tokens, {n_frames} frames do not fit {seq_len=}, {capacity=}"
    )
  row = layout.pack([list(s.chunks) for s in samples], seq_len, num_rows=1)
  out = {
    "tokens": np.zeros(seq_len, np.int32),
    "targets": np.zeros(seq_len, np.int32),
    "weights": np.zeros(seq_len, np.float32),
    "frames": np.zeros((capacity, image_size, image_size, 3), np.uint8),
  }
  start, frame0 = 0, 0
  for s in samples:
    end = start + len(s)
    out["tokens"][start:end] = s.tokens
    # Labels stay inside the sample: its last token predicts nothing (weight 0).
    out["targets"][start : end - 1] = s.tokens[1:]
    out["weights"][start : end - 1] = s.weight[1:]
    n_f = s.frames.shape[0]
    if n_f:
      if s.frames.shape[1:] != (image_size, image_size, 3):
        raise ValueError(
          f"frames of shape {s.frames.shape[1:]} must be {(image_size, image_size, 3)}; "
          "run lcv.data.media.resize_pad(frames, image_size) first"
        )
      out["frames"][frame0 : frame0 + n_f] = s.frames
    frame0 += n_f
    start = end
  out["layout"] = row
  return out


def stack(rows: list[dict]) -> dict:
  """Rows of `pack` -> a batch: arrays gain a leading B axis, the layouts become one [B, S]."""
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "layout"}
  layouts = [r["layout"] for r in rows]
  fields = {
    f.name: np.concatenate([getattr(x, f.name) for x in layouts], axis=-2)
    for f in dataclasses.fields(layout.Layout)
  }
  batch["layout"] = layout.Layout(**fields)
  return batch


class RowPacker:
  """Greedy in-order packer over a random-access sample stream; state = the next stream index.

  A row closes when the next sample would overflow its tokens (S) or its frames (R).

  Args:
    fetch: stream index -> `Sample` (deterministic).
    seq_len, tokens_per_frame, image_size, frames_per_row: as in `pack`.
  """

  def __init__(
    self,
    fetch: Callable[[int], Sample],
    seq_len: int,
    tokens_per_frame: int,
    image_size: int,
    frames_per_row: int = 0,
  ):
    self.fetch, self.seq_len = fetch, seq_len
    self.tokens_per_frame, self.image_size = tokens_per_frame, image_size
    self.frames_per_row = row_frames(seq_len, tokens_per_frame, frames_per_row)
    self._cache: tuple[int, Sample] | None = None

  def _get(self, j: int) -> Sample:
    if self._cache is None or self._cache[0] != j:
      self._cache = (j, self.fetch(j))
    return self._cache[1]

  def row(self, cursor: int) -> tuple[dict, int]:
    """(row packed from stream[cursor:next], next)."""
    samples, used, frames, j = [], 0, 0, cursor
    while True:
      s = self._get(j)
      n_f = s.frames.shape[0]
      if len(s) > self.seq_len or n_f > self.frames_per_row:
        raise ValueError(
          f"sample {j} has {len(s)} tokens and {n_f} frames > seq_len={self.seq_len} / "
          f"frames_per_row={self.frames_per_row}; raise data.seq_len (or data.frames_per_row) or "
          "lower data.max_frames"
        )
      if used + len(s) > self.seq_len or frames + n_f > self.frames_per_row:
        break
      samples.append(s)
      used += len(s)
      frames += n_f
      j += 1
    return (
      pack(samples, self.seq_len, self.tokens_per_frame, self.image_size, self.frames_per_row),
      j,
    )
