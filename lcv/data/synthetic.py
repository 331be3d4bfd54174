"""Procedural videos with captions and questions: deterministic from (seed, index), no downloads.

Every frame shows one object: a coloured shape (square, circle, triangle, cross) or a coloured
digit, at a random place on a dark, lightly noisy background. Each example is a short video plus
text about it, in one of three forms:

  caption   "frame 0: red circle. frame 1: blue digit 7. ..."
  colour    "Q: what colour is frame 2? A: green"
  object    "Q: what is in frame 1? A: digit 4"

The answers depend on reading one given frame, so a small model can only lower its loss by learning
to look at frames; this is the skill that V-NIAH (a needle frame in a long haystack) tests later.
Examples are random-access (`example(seed, index)`), which is what makes the pipeline resumable.
"""

from __future__ import annotations

import numpy as np

COLOURS = {
  "red": (230, 40, 40),
  "green": (40, 200, 60),
  "blue": (50, 90, 240),
  "yellow": (240, 220, 40),
  "magenta": (220, 50, 220),
  "cyan": (40, 220, 230),
  "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle", "cross")
KINDS = ("caption", "colour", "object")

# 3x5 bitmap font for digits, one string of 15 bits per digit (rows top to bottom).
_FONT = (
  "111101101101111",
  "010110010010111",
  "111001111100111",
  "111001111001111",
  "101101111001001",
  "111100111001111",
  "111100111101111",
  "111001010010010",
  "111101111101111",
  "111101111001111",
)


def _shape_mask(shape: str, size: int) -> np.ndarray:
  """bool[size, size] stencil of a shape."""
  yy, xx = np.mgrid[:size, :size] + 0.5
  c = size / 2
  if shape == "square":
    return np.ones((size, size), bool)
  if shape == "circle":
    return (yy - c) ** 2 + (xx - c) ** 2 <= c * c
  if shape == "triangle":
    return np.abs(xx - c) <= yy / 2
  if shape == "cross":
    w = max(size // 6, 1)
    return (np.abs(yy - c) <= w) | (np.abs(xx - c) <= w)
  raise ValueError(f"{shape=} is not one of {SHAPES}")


def _digit_mask(digit: int, size: int) -> np.ndarray:
  """bool[size, size] stencil of a digit, the 3x5 font scaled to fit."""
  glyph = np.array([c == "1" for c in _FONT[digit]]).reshape(5, 3)
  cell = max(size // 5, 1)
  big = np.kron(glyph, np.ones((cell, cell), bool))
  out = np.zeros((size, size), bool)
  x0 = (size - big.shape[1]) // 2
  out[: big.shape[0], x0 : x0 + big.shape[1]] = big[:size, : size - x0]
  return out


def render_frame(rng: np.random.Generator, size: int, colour: str, obj: str) -> np.ndarray:
  """uint8[size, size, 3]: one object (`SHAPES` name or "digit d") on a noisy dark background."""
  frame = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
  side = int(rng.integers(max(size // 2, 5), max(size * 3 // 4, 6) + 1))
  side = min(side, size)
  if obj.startswith("digit "):
    stencil = _digit_mask(int(obj[6:]), side)
  else:
    stencil = _shape_mask(obj, side)
  y0, x0 = rng.integers(0, size - side + 1, 2)
  frame[y0 : y0 + side, x0 : x0 + side][stencil] = COLOURS[colour]
  return frame


def example(
  seed: int,
  index: int,
  *,
  image_size: int = 32,
  frames: tuple[int, int] = (2, 4),
  kinds: tuple[str, ...] = KINDS,
):
  """The `index`-th synthetic example of stream `seed` (its kind drawn from `kinds`).

  Returns:
    dict with "frames": uint8[F, image_size, image_size, 3] (F drawn from `frames`, inclusive),
    "prompt": str (not trained on by default), "answer": str (trained on), "kind": str,
    "objects": list of (colour, object) per frame.
  """
  if image_size < 8:
    raise ValueError(f"{image_size=} must be >= 8 to draw legible objects")
  if not kinds or any(k not in KINDS for k in kinds):
    raise ValueError(f"synthetic kinds {kinds} must be a non-empty subset of {KINDS}")
  rng = np.random.default_rng([seed, index])
  n = int(rng.integers(frames[0], frames[1] + 1))
  colours = list(COLOURS)
  objects = []
  for _ in range(n):
    colour = colours[rng.integers(len(colours))]
    k = int(rng.integers(len(SHAPES) + 10))
    objects.append((colour, SHAPES[k] if k < len(SHAPES) else f"digit {k - len(SHAPES)}"))
  video = np.stack([render_frame(rng, image_size, c, o) for c, o in objects])
  kind = kinds[rng.integers(len(kinds))]
  if kind == "caption":
    prompt = "Describe each frame."
    answer = " ".join(f"frame {i}: {c} {o}." for i, (c, o) in enumerate(objects))
  else:
    k = int(rng.integers(n))
    if kind == "colour":
      prompt, answer = f"Q: what colour is frame {k}? A:", objects[k][0]
    else:
      prompt, answer = f"Q: what is in frame {k}? A:", objects[k][1]
  return {"frames": video, "prompt": prompt, "answer": answer, "kind": kind, "objects": objects}


class SyntheticSource:
  """Random-access source of `example`s (a grain data source: `len` and `__getitem__`)."""

  def __init__(
    self,
    seed: int,
    size: int,
    *,
    image_size: int,
    frames: tuple[int, int],
    kinds: tuple[str, ...] = KINDS,
  ):
    if not 1 <= frames[0] <= frames[1]:
      raise ValueError(f"synthetic frames={frames} must satisfy 1 <= min <= max")
    self.seed, self.size, self.image_size, self.frames = seed, size, image_size, frames
    self.kinds = tuple(kinds)

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int):
    return example(
      self.seed, int(index), image_size=self.image_size, frames=self.frames, kinds=self.kinds
    )
