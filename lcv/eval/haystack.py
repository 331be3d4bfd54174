"""Haystack frames for V-NIAH: a video at 1 fps, a directory of frames, or procedural frames.

LongVA samples its haystack movie at one frame per second from the start (frame index step
round(avg_fps), no offset; vlm_methods.md section 1.1). Its movie cannot be shared, so besides
user videos we offer a deterministic synthetic haystack: smooth drifting colour fields with moving
blobs, scene cuts every few seconds, and no text, digits or crisp shapes, so that no haystack frame
answers a needle question by accident.

All sources return uint8[F, Hpx, Wpx, 3] frames; `to_pixels` applies LLaVA's "pad" preprocessing
(pad to a square with the mean colour, resize, normalise) and returns float32[F, P, P, 3].
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def video_frames(path: str, max_frames: int, fps: float = 1.0) -> np.ndarray:
  """Decode a video at `fps` frames per second from its start (LongVA's sampling at fps = 1).

  Frame k of the video is kept when k is a multiple of round(average_fps / fps); decoding stops
  after `max_frames` kept frames. Needs PyAV (`pip install 'lcv[data]'`).

  Returns:
    uint8[F, Hpx, Wpx, 3], F = min(max_frames, kept frames in the video).
  """
  try:
    import av
  except ImportError as e:
    raise ImportError(
      f"haystack={path!r} is a video and needs PyAV: pip install 'lcv[data]' (or pass a "
      "directory of frames, or haystack='synthetic')"
    ) from e
  frames = []
  with av.open(path) as container:
    stream = container.streams.video[0]
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    if rate <= 0:
      raise ValueError(f"video {path!r} reports no frame rate; extract frames to a directory")
    step = max(1, round(rate / fps))
    for k, frame in enumerate(container.decode(stream)):
      if k % step == 0:
        frames.append(frame.to_ndarray(format="rgb24"))
        if len(frames) == max_frames:
          break
  if not frames:
    raise ValueError(f"video {path!r} decoded to no frames")
  return np.stack(frames)


def directory_frames(path: str, max_frames: int) -> np.ndarray:
  """The first `max_frames` images of a directory, sorted by file name, as uint8[F, H, W, 3].

  Frames of different sizes are resized to the size of the first one (they are padded and resized
  again by `to_pixels`, so only the aspect ratio of later frames changes).
  """
  names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))[:max_frames]
  if not names:
    raise ValueError(f"haystack directory {path!r} holds no {IMAGE_SUFFIXES} images")
  first = Image.open(os.path.join(path, names[0])).convert("RGB")
  frames = [np.asarray(first)]
  for name in names[1:]:
    image = Image.open(os.path.join(path, name)).convert("RGB")
    if image.size != first.size:
      image = image.resize(first.size, Image.BILINEAR)
    frames.append(np.asarray(image))
  return np.stack(frames)


def synthetic_frames(num_frames: int, size: int = 96, seed: int = 0, scene_len: int = 7):
  """Deterministic procedural "movie": uint8[num_frames, size, size, 3].

  Each scene (`scene_len` frames, i.e. seconds at 1 fps) has its own palette and blob layout;
  within a scene the colour field and three soft blobs drift slowly, like consecutive seconds of a
  real video. Frame f depends only on (seed, f), so any prefix is the same for every length.
  """
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  for f in range(num_frames):
    scene, t = divmod(f, scene_len)
    rng = np.random.default_rng([seed, scene])
    base = rng.uniform(0.15, 0.85, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy + 0.03 * t
    ramp = 0.5 + 0.5 * np.sin(2 * np.pi * ramp)
    image = base[0] * ramp[..., None] + base[1] * (1 - ramp[..., None])
    for _ in range(3):
      centre = rng.uniform(0.1, 0.9, 2) + rng.uniform(-0.02, 0.02, 2) * t
      radius = rng.uniform(0.08, 0.25)
      colour = rng.uniform(0, 1, 3)
      blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * radius**2))
      image = image * (1 - 0.7 * blob[..., None]) + colour * 0.7 * blob[..., None]
    frames[f] = np.clip(image * 255, 0, 255).astype(np.uint8)
  return frames


def load_haystack(source: str, num_frames: int, *, fps: float = 1.0, seed: int = 0):
  """Frames of a haystack source: "synthetic", a video file, or a frame directory.

  Returns:
    uint8[F, Hpx, Wpx, 3] with F == num_frames; raises if the source is shorter.
  """
  if source == "synthetic":
    frames = synthetic_frames(num_frames, seed=seed)
  elif os.path.isdir(source):
    frames = directory_frames(source, num_frames)
  elif os.path.isfile(source):
    frames = video_frames(source, num_frames, fps)
  else:
    raise FileNotFoundError(
      f"haystack={source!r} is neither 'synthetic', a video file nor a frame directory"
    )
  if len(frames) < num_frames:
    raise ValueError(
      f"haystack={source!r} gives {len(frames)} frames at {fps=}, fewer than max_frames="
      f"{num_frames}: use a longer video (LongVA's 3000 frames need >= 50 minutes at 1 fps) or "
      "lower max_frames"
    )
  return frames


def expand_to_square(image: np.ndarray, fill) -> np.ndarray:
  """Pad uint8[H, W, 3] to a centred square with colour `fill` (LLaVA's expand2square)."""
  h, w = image.shape[:2]
  if h == w:
    return image
  side = max(h, w)
  out = np.empty((side, side, 3), np.uint8)
  out[...] = np.asarray(fill, np.uint8)
  top, left = (side - h) // 2, (side - w) // 2
  out[top : top + h, left : left + w] = image
  return out


def to_pixels(frames, size: int, mean, std) -> np.ndarray:
  """uint8[F, H, W, 3] -> float32[F, size, size, 3]: pad to square, bicubic resize, normalise."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  fill = tuple(int(round(m * 255)) for m in mean)
  out = np.empty((len(frames), size, size, 3), np.float32)
  for i, frame in enumerate(frames):
    square = Image.fromarray(expand_to_square(np.asarray(frame, np.uint8), fill))
    resized = np.asarray(square.resize((size, size), Image.BICUBIC), np.float32) / 255.0
    out[i] = (resized - mean) / std
  return out
