"""Host-side media preprocessing: frame sampling, resize-and-pad, patchify (numpy, uint8 in).

Axis letters: F frames, P patches per frame, C channels.
"""

from __future__ import annotations

import numpy as np


def check_frames(frames, *, name: str = "frames") -> np.ndarray:
  """uint8[F, H, W, C] with C in (1, 3); a single image [H, W, C] becomes F = 1."""
  frames = np.asarray(frames)
  if frames.ndim == 3:
    frames = frames[None]
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or min(frames.shape[:3]) < 1:
    raise ValueError(
      f"{name} of shape {frames.shape} must be [F, H, W, C] or [H, W, C] with C in (1, 3); "
      "decode videos to uint8 RGB frames before feeding them"
    )
  if frames.dtype != np.uint8:
    raise ValueError(f"{name} have dtype {frames.dtype}; expected uint8 RGB in [0, 255]")
  return frames if frames.shape[-1] == 3 else np.repeat(frames, 3, axis=-1)


def sample_frames(
  num_frames: int,
  max_frames: int,
  *,
  mode: str = "uniform",
  fps: float = 1.0,
  source_fps: float | None = None,
) -> np.ndarray:
  """Indices of the frames to keep, int64[<= max_frames], increasing.

  uniform: max_frames indices evenly spread over the clip (the centre of each of max_frames equal
    spans), or every frame when the clip is shorter.
  fps: one frame every 1 / fps seconds of a clip recorded at source_fps, capped at max_frames by
    uniform subsampling of those.
  """
  if num_frames < 1 or max_frames < 1:
    raise ValueError(f"{num_frames=} and {max_frames=} must both be >= 1")
  if mode == "uniform":
    if num_frames <= max_frames:
      return np.arange(num_frames)
    return np.floor((np.arange(max_frames) + 0.5) * num_frames / max_frames).astype(np.int64)
  if mode == "fps":
    if not source_fps or source_fps <= 0 or fps <= 0:
      raise ValueError(
        f"fps sampling needs {source_fps=} > 0 and {fps=} > 0 (the video's frame rate)"
      )
    step = source_fps / fps
    idx = np.unique(np.floor(np.arange(0, num_frames, step)).astype(np.int64))
    if len(idx) > max_frames:
      idx = idx[sample_frames(len(idx), max_frames)]
    return idx
  raise ValueError(f"frame sampling {mode=} must be 'uniform' or 'fps'")


def resize_pad(frames: np.ndarray, size: int) -> np.ndarray:
  """Resize [F, H, W, C] so the longer side is `size` (aspect kept), then zero-pad to square.

  Area-averaging when shrinking by integer factors would be nicer; nearest neighbour keeps this
  dependency-free and exact for the synthetic sets (already at `size`).
  """
  f, h, w, c = frames.shape
  if (h, w) == (size, size):
    return frames
  scale = size / max(h, w)
  nh, nw = max(round(h * scale), 1), max(round(w * scale), 1)
  ys = np.minimum((np.arange(nh) + 0.5) / scale, h - 1).astype(np.int64)
  xs = np.minimum((np.arange(nw) + 0.5) / scale, w - 1).astype(np.int64)
  out = np.zeros((f, size, size, c), frames.dtype)
  out[:, :nh, :nw] = frames[:, ys][:, :, xs]
  return out


def patchify(frames: np.ndarray, patch: int) -> np.ndarray:
  """[F, H, W, C] -> [F, P, patch * patch * C], patches in row-major order."""
  f, h, w, c = frames.shape
  if h % patch or w % patch:
    raise ValueError(f"frame size {(h, w)} must be a multiple of {patch=}; resize_pad first")
  x = frames.reshape(f, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(f, (h // patch) * (w // patch), patch * patch * c)
