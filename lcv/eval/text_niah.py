"""Text needle-in-a-haystack in the LWM / LongVA style (ring_attention_anchors.md section 2.13).

The needle is "The special magic {city} number is: {7 digits}." inserted at a sentence boundary at
`depth` of a haystack of `length` tokens; the question is "What is the special magic {city}
number?". LongVA's text check adds 0 / 3 / 5 distractor cities with their own numbers. Scoring
is the V-NIAH one: teacher-forced exact match of the number's tokens (LM head at the answer
positions only), or greedy generation counted correct when the number appears in the output
(LWM's substring rule).

The haystack is a local UTF-8 text file (e.g. PG19 books or Paul Graham essays, which LWM and
LongVA use) or our deterministic sentence generator. Sentences are tokenised one by one, so every
cut and every insertion falls on a sentence boundary, and `length` counts every token of the case
(template, context, needle, question, answer) as LWM does.
"""

from __future__ import annotations

import contextlib
import os
import re

import jax
import numpy as np

from lcv.config import TextNIAHConfig
from lcv.eval import cases, prompts, scoring
from lcv.eval.prompts import PromptPieces
from lcv.eval.results import Results

CITIES = (
  "Singapore", "Lisbon", "Nairobi", "Montreal", "Kyoto", "Valparaiso", "Reykjavik", "Tbilisi",
  "Hanoi", "Marrakesh", "Oslo", "Cusco", "Adelaide", "Krakow", "Dakar", "Busan", "Tallinn",
  "Quito", "Porto", "Almaty", "Havana", "Zanzibar", "Bergen", "Medellin", "Chengdu", "Tunis",
  "Ljubljana", "Auckland", "Seville", "Ulaanbaatar",
)  # fmt: skip
INSTRUCTION = (
  " Don't give information outside the document or repeat your findings. Keep your response short "
  "and direct."
)

_SUBJECTS = ("The river", "An old farmer", "The committee", "A quiet student", "The small boat",
             "Every winter", "The northern road", "A travelling merchant", "The library",
             "Our neighbour")  # fmt: skip
_VERBS = ("carried", "remembered", "described", "painted", "followed", "measured", "repaired",
          "ignored", "welcomed", "questioned")  # fmt: skip
_OBJECTS = ("the long valley", "a box of letters", "the evening market", "three wooden chairs",
            "the broken clock", "a map of the coast", "the summer harvest", "an unfinished song",
            "the stone bridge", "a basket of pears")  # fmt: skip
_ENDINGS = ("before the rain began", "without saying a word", "for the second time",
            "as the lamps were lit", "near the old mill", "with great patience", "after supper",
            "in the spring", "under a grey sky", "while the town slept")  # fmt: skip


def synthetic_sentences(num: int, seed: int = 0) -> list[str]:
  """Deterministic filler prose: `num` sentences, no digits (nothing looks like a magic number)."""
  rng = np.random.default_rng(seed)
  parts = (_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)
  picks = [rng.integers(0, len(p), num) for p in parts]
  return [" ".join(p[i[k]] for p, i in zip(parts, picks)) + "." for k in range(num)]


def file_sentences(path: str) -> list[str]:
  """Sentences of a text file (split after . ! ? followed by whitespace)."""
  with open(path, encoding="utf-8") as f:
    text = " ".join(f.read().split())
  sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
  if not sentences:
    raise ValueError(f"haystack={path!r} holds no text")
  return sentences


class Haystack:
  """Tokenised sentences; `take(n)` returns whole sentences filling at most n tokens."""

  def __init__(self, tokenizer, source: str, max_tokens: int, seed: int = 0):
    if source == "synthetic":
      pool = synthetic_sentences(4096, seed)
    elif os.path.isfile(source):
      pool = file_sentences(source)
    else:
      raise FileNotFoundError(f"haystack={source!r} is neither 'synthetic' nor a text file")
    self.sentences: list[np.ndarray] = []
    total, k = 0, 0
    while total < max_tokens:  # cycle through the pool until long enough (LWM repeats PG19)
      ids = prompts.text_ids(tokenizer, " " + pool[k % len(pool)])
      self.sentences.append(ids)
      total += len(ids)
      k += 1
      if k > len(pool) and total == 0:
        raise ValueError(f"haystack={source!r} tokenises to no ids")

  def take(self, num_tokens: int) -> list[np.ndarray]:
    out, total = [], 0
    for s in self.sentences:
      if total + len(s) > num_tokens:
        break
      out.append(s)
      total += len(s)
    return out


def needle_text(city: str, number: str) -> str:
  return f" The special magic {city} number is: {number}."


def insert_at_depth(sentences: list[np.ndarray], needles: list[tuple[float, np.ndarray]]):
  """Context ids with each (depth, ids) needle inserted at the sentence boundary at or before
  int(depth * context_tokens); int32[n]."""
  lengths = np.cumsum([0] + [len(s) for s in sentences])  # token offset of each boundary
  total = int(lengths[-1])
  slots: dict[int, list[np.ndarray]] = {}
  for depth, ids in needles:
    boundary = int(np.searchsorted(lengths, int(depth * total), side="right") - 1)
    slots.setdefault(boundary, []).append(ids)
  out = []
  for k in range(len(sentences) + 1):
    out.extend(slots.get(k, []))
    if k < len(sentences):
      out.append(sentences[k])
  return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)


def make_case(
  tokenizer,
  cfg: TextNIAHConfig,
  haystack: Haystack,
  length: int,
  depth: float,
  rng: np.random.Generator,
):
  """One case: (PromptPieces, number). The context fills `length` tokens minus the rest."""
  template = prompts.get_template(cfg.prompt_template)
  cities = rng.choice(len(CITIES), 1 + cfg.distractors, replace=False)
  numbers = [str(n) for n in rng.integers(1_000_000, 10_000_000, 1 + cfg.distractors)]
  city, number = CITIES[cities[0]], numbers[0]
  question = "\n" + f"What is the special magic {city} number?" + INSTRUCTION
  pieces = prompts.prompt_pieces(tokenizer, template, question, number)
  needle_ids = [prompts.text_ids(tokenizer, needle_text(CITIES[c], n)) for c, n in
                zip(cities, numbers)]  # fmt: skip
  fixed = len(pieces.pre) + len(pieces.question) + len(pieces.post) + len(pieces.answer)
  budget = length - fixed - sum(len(n) for n in needle_ids)
  if budget <= 0:
    raise ValueError(f"context length {length} leaves no room for the haystack; raise min_tokens")
  placed = [(depth, needle_ids[0])] + [(float(rng.uniform()), n) for n in needle_ids[1:]]
  context = insert_at_depth(haystack.take(budget), placed)
  pre = np.concatenate([pieces.pre, context]).astype(np.int32)
  return PromptPieces(pre, pieces.question, pieces.post, pieces.answer), number


def check_config(cfg: TextNIAHConfig, context: int = 1) -> None:
  cases.frame_counts(cfg.min_tokens, cfg.max_tokens, cfg.length_step)
  cases.depths(cfg.depth_step)
  prompts.get_template(cfg.prompt_template)
  if cfg.num_samples < 1 or not 0 <= cfg.distractors < len(CITIES):
    raise ValueError(
      f"num_samples={cfg.num_samples} must be >= 1 and distractors={cfg.distractors} in "
      f"[0, {len(CITIES) - 1}]"
    )
  if cfg.pad_multiple % (2 * context):
    raise ValueError(f"pad_multiple={cfg.pad_multiple} must be a multiple of {2 * context}")


def run(
  cfg: TextNIAHConfig,
  model,
  tokenizer,
  *,
  mesh=None,
  output_dir: str | None = None,
  progress: bool = True,
  title: str = "",
) -> Results:
  """Run (or resume) the text NIAH grid; JSON, heatmap and average as for V-NIAH.

  `model` needs `embed(tokens, visual_slot, None)` and `decode(..., logits_at=...)`.
  """
  from lcv.eval import vniah

  context = mesh.shape.get("context", 1) if mesh is not None else 1
  check_config(cfg, context)
  out = output_dir or cfg.output_dir
  haystack = Haystack(tokenizer, cfg.haystack, cfg.max_tokens, cfg.seed)
  shard = vniah.context_sharding(mesh) if context > 1 else None
  scorer = scoring.Scorer(model, None, shard=shard, answer_width=16)
  stop = prompts.stop_ids(tokenizer, prompts.get_template(cfg.prompt_template))
  results = Results(os.path.join(out, "all_accuracies.json"), "Context Length", "Depth")
  grid = [
    (n, i, d)
    for n in cases.frame_counts(cfg.min_tokens, cfg.max_tokens, cfg.length_step)
    for i, d in enumerate(cases.depths(cfg.depth_step))
  ]
  todo = [g for g in grid if not results.done(g[0], cases.depth_label(g[2]))]
  bar = vniah.progress_bar(len(grid), len(grid) - len(todo), progress)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for length, depth_index, depth in todo:
      scores, predictions = [], []
      for k in range(cfg.num_samples):
        rng = np.random.default_rng([cfg.seed, length, depth_index, k])
        pieces, number = make_case(tokenizer, cfg, haystack, length, depth, rng)
        extra = cfg.max_new_tokens if cfg.scoring == "generate" else 0
        seq = cases.build_sequence(pieces, 0, 0, pad_multiple=cfg.pad_multiple, extra=extra)
        if cfg.scoring == "teacher_forced":
          ok, pred = scorer.teacher_forced(seq, None)
        else:
          pred = scorer.generate(seq, None, cfg.max_new_tokens, stop)
          ok = number in prompts.decode(tokenizer, pred)
        scores.append(int(ok))
        predictions.append(prompts.decode(tokenizer, pred))
      results.add({
        "Context Length": length,
        "Depth": cases.depth_label(depth),
        "Score": sum(scores) / len(scores),
        "depth": depth,
        "scores": scores,
        "predictions": predictions,
      })  # fmt: skip
      bar.update(1)
  bar.close()
  vniah.write_summary(results, out, title=title or "Text NIAH", x_label="Context Length")
  return results
