"""V-NIAH needles: an image, a question about it, and its exact answer; JSON + image files.

LongVA's five needles (vlm_methods.md section 1.2) mix multiple-choice questions, answered by one
option letter, and short open answers ("Yellow", "200"). Every question starts with "\\n" (it
follows the frames directly) and ends with LLaVA's answer-format instruction. Our built-in set
follows the same recipe with rendered images (digits, a word, a shape, a colour, a count), each
with a look-alike distractor whose answer differs (for V-NIAH-D, VideoRoPE).

On disk a needle set is a JSON list next to its images:

    [{"name": "digits", "image": "images/digits.png", "question": "\\nFind the frame ...",
      "answer": "27", "distractor": "images/digits_distractor.png"}, ...]

Image paths are relative to the JSON file; "distractor" is optional.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
OPEN_SUFFIX = "\nAnswer the question using a single word or phrase."


@dataclasses.dataclass(frozen=True)
class Needle:
  """One needle. image / distractor: uint8[H, W, 3]; answer: the exact expected text."""

  name: str
  image: np.ndarray
  question: str
  answer: str
  distractor: np.ndarray | None = None


def question(text: str, options: tuple[str, ...] = ()) -> str:
  """LongVA's question format: "\\n" + text (+ lettered options) + the answer instruction."""
  if not options:
    return "\n" + text + OPEN_SUFFIX
  letters = "ABCDEFGH"
  lines = [f"{letters[i]}. {o}" for i, o in enumerate(options)]
  return "\n" + text + "\n" + "\n".join(lines) + MC_SUFFIX


def load_needles(path: str) -> list[Needle]:
  """Read a needle JSON file (format in the module docstring)."""
  root = os.path.dirname(os.path.abspath(path))
  with open(path) as f:
    records = json.load(f)
  if not isinstance(records, list) or not records:
    raise ValueError(f"needles={path!r} must hold a non-empty JSON list of needle records")

  def image(rel):
    return np.asarray(Image.open(os.path.join(root, rel)).convert("RGB"))

  needles = []
  for i, r in enumerate(records):
    missing = {"image", "question", "answer"} - set(r)
    if missing:
      raise ValueError(f"needles={path!r} record {i} lacks {sorted(missing)}")
    needles.append(
      Needle(
        name=r.get("name", str(i)),
        image=image(r["image"]),
        question=r["question"],
        answer=r["answer"],
        distractor=image(r["distractor"]) if r.get("distractor") else None,
      )
    )
  return needles


def save_needles(needles, path: str) -> None:
  """Write needles as `path` (JSON) plus PNG images in an `images/` folder beside it."""
  root = os.path.dirname(os.path.abspath(path))
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  records = []
  for n in needles:
    rec = {"name": n.name, "image": f"images/{n.name}.png", "question": n.question}
    rec["answer"] = n.answer
    Image.fromarray(n.image).save(os.path.join(root, rec["image"]))
    if n.distractor is not None:
      rec["distractor"] = f"images/{n.name}_distractor.png"
      Image.fromarray(n.distractor).save(os.path.join(root, rec["distractor"]))
    records.append(rec)
  with open(path, "w") as f:
    json.dump(records, f, indent=2)


def get_needles(source: str, size: int = 256) -> list[Needle]:
  """ "builtin" -> `builtin_needles(size)`; otherwise a needle JSON file."""
  return builtin_needles(size) if source == "builtin" else load_needles(source)


def _canvas(size: int, colour=(245, 245, 240)):
  image = Image.new("RGB", (size, size), colour)
  return image, ImageDraw.Draw(image)


def _centred_text(draw, size, text, font_size, fill, box=None):
  font = ImageFont.load_default(size=font_size)
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  x0, y0, x1, y1 = box or (0, 0, size, size)
  x = x0 + (x1 - x0 - (right - left)) / 2 - left
  y = y0 + (y1 - y0 - (bottom - top)) / 2 - top
  draw.text((x, y), text, font=font, fill=fill)


def _digits(size, number):
  image, draw = _canvas(size, (70, 90, 120))
  m = size // 8
  draw.rounded_rectangle((m, 2 * m, size - m, size - 2 * m), radius=m // 2, fill=(255, 255, 255))
  _centred_text(draw, size, number, size // 3, (0, 0, 0))
  return np.asarray(image)


def _sign(size, word):
  image, draw = _canvas(size, (150, 190, 230))
  m = size // 10
  draw.rectangle((size // 2 - m // 3, size // 2, size // 2 + m // 3, size), fill=(90, 90, 90))
  box = (m, 3 * m, size - m, 6 * m)
  draw.rectangle(box, fill=(0, 110, 60), outline=(255, 255, 255), width=max(2, m // 5))
  _centred_text(draw, size, word, size // 8, (255, 255, 255), box)
  return np.asarray(image)


def _shape(size, kind):
  image, draw = _canvas(size, (128, 128, 128))
  c, r = size / 2, size * 0.32
  fill = (230, 60, 40)
  if kind == "triangle":
    draw.polygon([(c, c - r), (c - r * 0.87, c + r / 2), (c + r * 0.87, c + r / 2)], fill=fill)
  elif kind == "circle":
    draw.ellipse((c - r, c - r, c + r, c + r), fill=fill)
  elif kind == "square":
    draw.rectangle((c - r * 0.8, c - r * 0.8, c + r * 0.8, c + r * 0.8), fill=fill)
  else:
    raise ValueError(f"{kind=} must be 'triangle', 'circle' or 'square'")
  return np.asarray(image)


def _ring(size, colour):
  image, draw = _canvas(size, (235, 235, 235))
  c, r = size / 2, size * 0.35
  draw.ellipse((c - r, c - r, c + r, c + r), outline=colour, width=max(4, size // 10))
  return np.asarray(image)


def _dots(size, count, seed):
  image, draw = _canvas(size, (255, 255, 255))
  rng = np.random.default_rng(seed)
  r = size // 14
  centres = []
  while len(centres) < count:
    p = rng.uniform(2 * r, size - 2 * r, 2)
    if all(np.hypot(*(p - q)) > 3 * r for q in centres):
      centres.append(p)
  for x, y in centres:
    draw.ellipse((x - r, y - r, x + r, y + r), fill=(20, 20, 20))
  return np.asarray(image)


def builtin_needles(size: int = 256) -> list[Needle]:
  """Five rendered needles, LongVA-style: 2 short-answer OCR, 1 open colour, 2 multiple-choice.

  Deterministic (no randomness beyond fixed seeds), no download. Each has a look-alike distractor
  with a different answer.
  """
  return [
    Needle(
      "digits",
      _digits(size, "27"),
      question("Find the frame with a white card showing a number. What is the number?"),
      "27",
      _digits(size, "58"),
    ),
    Needle(
      "word",
      _sign(size, "HARBOR"),
      question("Find the frame of a green road sign. What word is written on the sign?"),
      "HARBOR",
      _sign(size, "MEADOW"),
    ),
    Needle(
      "shape",
      _shape(size, "triangle"),
      question(
        "Find the frame with a red shape on a grey background. What is the shape?",
        ("Circle", "Square", "Triangle", "Star"),
      ),
      "C",
      _shape(size, "circle"),
    ),
    Needle(
      "colour",
      _ring(size, (240, 130, 0)),
      question("Find the frame with a large ring. What is the colour of the ring?"),
      "Orange",
      _ring(size, (30, 80, 220)),
    ),
    Needle(
      "count",
      _dots(size, 5, seed=5),
      question(
        "Find the frame with black dots on a white background. How many dots are there?",
        ("3", "5", "7", "9"),
      ),
      "B",
      _dots(size, 7, seed=7),
    ),
  ]
