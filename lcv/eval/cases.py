"""One V-NIAH case: which frames go where, and the token sequence around them.

The rules are LongVA's (vlm_methods.md sections 1.3-1.4) and VideoRoPE's V-NIAH-D (section 1.11):
- frame counts range(min, max + 1, step); depths np.arange(0, 1 + step, step), float values kept
  exactly as numpy makes them, so int(depth * num_frames) matches LongVA case by case;
- the needle is an extra frame inserted before haystack frame int(depth * num_frames), so a case
  has num_frames + 1 frames (depth 0: first; depth 1: right before the question);
- V-NIAH-D adds a look-alike distractor `gap` haystack frames before or after the needle: after
  if the needle is within `gap` of the start, before if within `gap` of the end, a seeded coin
  flip otherwise, none if neither side fits;
- tokens: pre | frames | question | post | answer, with the LM head read at the positions that
  predict the answer tokens: prompt_len - 1 ... prompt_len + answer_len - 2.

Frames are referred to by their row in an embedding table [haystack frames..., needle, distractor]
so that a case is a gather of cached embeddings, never a re-encoding.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lcv.eval.prompts import PromptPieces


def frame_counts(min_frames: int, max_frames: int, step: int) -> list[int]:
  """LongVA's frame-count axis: range(min_frames, max_frames + 1, step)."""
  if not 0 < min_frames <= max_frames or step < 1:
    raise ValueError(f"need 0 < {min_frames=} <= {max_frames=} and {step=} >= 1")
  return list(range(min_frames, max_frames + 1, step))


def depths(step: float) -> list[float]:
  """LongVA's depth axis: np.arange(0, 1 + step, step) (values kept bit-exact)."""
  if not 0 < step <= 1:
    raise ValueError(f"depth step={step} must be in (0, 1]")
  return [float(d) for d in np.arange(0, 1 + step, step) if d <= 1 + 1e-9]


def depth_label(depth: float) -> float:
  """Depth in percent as stored in the results (LongVA rounds to tens; we keep 2 decimals)."""
  return round(depth * 100, 2)


def insertion_index(depth: float, num_frames: int) -> int:
  """Index of the haystack frame the needle is inserted before: int(depth * num_frames)."""
  return int(depth * num_frames)


def distractor_index(needle_at: int, num_frames: int, gap: int, rng: np.random.Generator):
  """Haystack index the distractor is inserted before, or None (VideoRoPE's V-NIAH-D rule)."""
  before, after = needle_at - gap, needle_at + gap
  if before <= 0 and after >= num_frames:
    return None
  if needle_at < gap:
    return after
  if after >= num_frames:
    return before
  return before if rng.random() < 0.5 else after


def frame_order(
  num_frames: int, needle_at: int, needle_row: int, distractor_at=None, distractor_row: int = -1
) -> np.ndarray:
  """Rows of the embedding table, in sequence order: int32[num_frames + 1 (+1)].

  Haystack frame i is row i; the needle (row `needle_row`) goes before haystack frame
  `needle_at`, the distractor (row `distractor_row`) before haystack frame `distractor_at`.
  """
  if not 0 <= needle_at <= num_frames:
    raise ValueError(f"{needle_at=} must be in [0, {num_frames=}]")
  inserts = [(needle_at, needle_row)]
  if distractor_at is not None:
    inserts.append((distractor_at, distractor_row))
  order = list(range(num_frames))
  for at, row in sorted(inserts, reverse=True):  # later insertions first keep indices valid
    order.insert(at, row)
  return np.asarray(order, np.int32)


@dataclasses.dataclass(frozen=True)
class Sequence:
  """Token layout of one case in natural order, int32[S] each (S padded to a multiple).

  tokens: text ids (pad_id at visual slots and padding); visual_slot: row into the case's flat
  visual tokens [frames * n_tok] or -1; frame_ids: frame index or -1; segment_ids: 1 real, 0 pad.
  answer_start: index of the first answer token; answer: int32[A] ids.
  """

  tokens: np.ndarray
  visual_slot: np.ndarray
  frame_ids: np.ndarray
  segment_ids: np.ndarray
  answer_start: int
  answer: np.ndarray

  @property
  def length(self) -> int:
    return int(self.segment_ids.sum())

  def logits_at(self, width: int | None = None) -> np.ndarray:
    """Positions whose next-token logits predict the answer: int32[width] (edge-padded)."""
    a = len(self.answer)
    width = a if width is None else width
    if width < a:
      raise ValueError(f"logits width={width} is smaller than the answer length {a}")
    at = self.answer_start - 1 + np.arange(a, dtype=np.int32)
    return np.pad(at, (0, width - a), mode="edge")


def pad_length(length: int, multiple: int) -> int:
  return -(-length // multiple) * multiple


def build_sequence(
  pieces: PromptPieces,
  num_frames: int,
  tokens_per_frame: int,
  *,
  pad_multiple: int = 1,
  pad_id: int = 0,
  extra: int = 0,
) -> Sequence:
  """pre | num_frames x tokens_per_frame visual slots | question | post | answer (| extra pad).

  `extra` reserves slots after the answer (generation writes its tokens there).
  """
  visual = num_frames * tokens_per_frame
  text_before = len(pieces.pre)
  after = np.concatenate([pieces.question, pieces.post])
  answer_start = text_before + visual + len(after)
  real = answer_start + len(pieces.answer)
  s = pad_length(real + extra, pad_multiple)
  tokens = np.full(s, pad_id, np.int32)
  tokens[:text_before] = pieces.pre
  tokens[text_before + visual : answer_start] = after
  tokens[answer_start:real] = pieces.answer
  visual_slot = np.full(s, -1, np.int32)
  visual_slot[text_before : text_before + visual] = np.arange(visual, dtype=np.int32)
  frame_ids = np.full(s, -1, np.int32)
  frame_ids[text_before : text_before + visual] = np.repeat(
    np.arange(num_frames, dtype=np.int32), tokens_per_frame
  )
  segment_ids = np.zeros(s, np.int32)
  segment_ids[:real] = 1
  return Sequence(tokens, visual_slot, frame_ids, segment_ids, answer_start, pieces.answer)
