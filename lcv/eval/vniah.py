"""V-NIAH, LongVA's visual needle-in-a-haystack, end to end (docs/eval.md).

    haystack frames (1 fps video | frame directory | synthetic) --encode_media once--> cache
    needles (image, question, answer)                           --encode_media once--> cache
    for num_frames in frame_counts, depth in depths:            (resumable, one JSON record/cell)
      for needle: rows = haystack[:q] + needle + haystack[q:num_frames]   q = int(depth * n)
                  tokens = pre | rows x n_tok | question | post | answer
                  correct = teacher-forced exact match at the answer positions only
      cell score = mean over needles
    heatmap.png, all_accuracies.json, avg_accuracy.txt

With a mesh whose `context` axis has c > 1 devices, every per-token input is put in zig-zag order
(`lcv.parallel.context`) and sharded over `context`; the model's attention (ring attention for
impl="ring") and the LM head see only their shard, and only argmax ids come back.
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lcv.config import VNIAHConfig
from lcv.eval import cases, plots, prompts, scoring
from lcv.eval import haystack as haystack_lib
from lcv.eval import needles as needles_lib
from lcv.eval.embedding_cache import EmbeddingCache
from lcv.eval.prefix_cache import PrefixScorer
from lcv.eval.results import Results


def context_sharding(mesh, axis: str = "context"):
  """`Scorer.shard` for `mesh`: zig-zag order over the context axis, sequence-sharded inputs.

  Returns a callable inputs -> (placed inputs, perm) where reordered[i] = natural[perm[i]].
  """
  from lcv.parallel import context as context_lib

  n = mesh.shape[axis]
  spec = NamedSharding(mesh, P(None, axis))

  def shard(inputs):
    seq_len = inputs["tokens"].shape[-1]
    perm = context_lib.order_indices(seq_len, n, "zigzag")
    ordered = context_lib.reorder(inputs, perm)
    placed = jax.tree.map(
      lambda x: jax.device_put(
        x, spec if x.ndim == 2 else NamedSharding(mesh, P(None, None, axis))
      ),
      ordered,
    )
    return placed, perm

  return shard


def check_config(cfg: VNIAHConfig, context: int = 1) -> None:
  """Fail fast, before any encoding, on settings that cannot run."""
  cases.frame_counts(cfg.min_frames, cfg.max_frames, cfg.frame_step)
  cases.depths(cfg.depth_step)
  prompts.get_template(cfg.prompt_template)
  if cfg.pad_multiple % (2 * context):
    raise ValueError(
      f"pad_multiple={cfg.pad_multiple} must be a multiple of 2 x context = {2 * context} for "
      f"zig-zag sharding; e.g. pad_multiple={2 * context * max(1, cfg.pad_multiple // context)}"
    )
  if cfg.prefix_chunk < 0 or (cfg.prefix_chunk and cfg.pad_multiple % cfg.prefix_chunk):
    raise ValueError(
      f"prefix_chunk={cfg.prefix_chunk} must be 0 (off) or a divisor of "
      f"pad_multiple={cfg.pad_multiple}"
    )
  if cfg.distractor and cfg.distractor_gap < 1:
    raise ValueError(f"distractor_gap={cfg.distractor_gap} must be >= 1 frame")


def _encode_all(cfg: VNIAHConfig, cache: EmbeddingCache, needles):
  """Embedding table [rows, n_tok, D]: haystack frames, then needles, then distractors."""
  frames = haystack_lib.load_haystack(
    cfg.haystack, cfg.max_frames, fps=cfg.haystack_fps, seed=cfg.seed
  )
  parts = [cache.encode(frames)]
  parts += [cache.encode(n.image) for n in needles]
  if cfg.distractor:
    for n in needles:
      if n.distractor is None:
        raise ValueError(f"distractor=True but needle {n.name!r} has no distractor image")
      parts.append(cache.encode(n.distractor))
  return np.concatenate(parts)


def run(
  cfg: VNIAHConfig,
  model,
  tokenizer,
  *,
  model_key: str,
  mesh=None,
  frame_bidirectional: bool = False,
  output_dir: str | None = None,
  progress: bool = True,
) -> Results:
  """Run (or resume) the V-NIAH grid; write JSON, heatmap PNG and average into `output_dir`.

  Args:
    cfg: the evaluation config.
    model: an `lcv.eval.scoring.EvalModel` (`lcv.models.vlm.VLM` or a fixture).
    tokenizer: `encode(str) -> list[int]`, `decode(ids) -> str`, `eos_id`, `bos_id`.
    model_key: names the weights for the embedding cache (e.g. checkpoint path and step).
    mesh: optional; inputs are zig-zag sequence-sharded over its `context` axis.
    frame_bidirectional: the mask of a non-`VLM` model (TC-LLaVA frame-block-causal); an
      `lcv.models.vlm.VLM` takes positions and mask from its own config.
    output_dir: defaults to cfg.output_dir.

  Returns:
    The `Results` (also on disk as all_accuracies.json).
  """
  context = mesh.shape.get("context", 1) if mesh is not None else 1
  check_config(cfg, context)
  out = output_dir or cfg.output_dir
  needles = needles_lib.get_needles(cfg.needles)
  template = prompts.get_template(cfg.prompt_template)
  encode = scoring.jitted(model, "encode_media")
  cache = EmbeddingCache(
    cfg.cache_dir,
    model_key,
    encode,
    image_size=cfg.image_size,
    mean=cfg.image_mean,
    std=cfg.image_std,
    chunk=cfg.encode_batch,
  )
  table_host = _encode_all(cfg, cache, needles)
  n_tok = table_host.shape[1]
  if mesh is not None:
    table = jax.device_put(table_host, NamedSharding(mesh, P()))
  else:
    table = jnp.asarray(table_host)
  del table_host
  pieces = [
    prompts.prompt_pieces(
      tokenizer,
      template,
      n.question,
      n.answer,
      replace_double_newline=cfg.replace_double_newline,
    )
    for n in needles
  ]
  stop = prompts.stop_ids(tokenizer, template)
  shard = context_sharding(mesh) if context > 1 else None
  inputs = scoring.inputs_for(
    model, v2pe_delta=cfg.v2pe_delta, frame_bidirectional=frame_bidirectional
  )
  width = max(8, max(len(p.answer) for p in pieces))
  scorer = scoring.Scorer(model, table, inputs=inputs, shard=shard, answer_width=width)
  if cfg.prefix_chunk and cfg.scoring == "teacher_forced":
    scorer = PrefixScorer(model, table, inputs, cfg.prefix_chunk, answer_width=width)
  results = Results(os.path.join(out, "all_accuracies.json"))
  grid = [
    (n, i, d)
    for n in cases.frame_counts(cfg.min_frames, cfg.max_frames, cfg.frame_step)
    for i, d in enumerate(cases.depths(cfg.depth_step))
  ]
  todo = [g for g in grid if not results.done(g[0], cases.depth_label(g[2]))]
  bar = progress_bar(len(grid), len(grid) - len(todo), progress)
  needle_row0 = cfg.max_frames
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for cell in todo:
      results.add(_cell(cfg, cell, needles, pieces, scorer, tokenizer, stop, n_tok, needle_row0))
      bar.update(1)
  bar.close()
  write_summary(results, out, title=f"V-NIAH {model_key}")
  return results


def _cell(cfg, cell, needles, pieces, scorer, tokenizer, stop, n_tok, needle_row0) -> dict:
  """Score every needle at one (num_frames, depth) cell; the JSON record."""
  num_frames, depth_index, depth = cell
  seqs, rows_list = [], []
  for k, piece in enumerate(pieces):
    at = cases.insertion_index(depth, num_frames)
    distractor_at = None
    if cfg.distractor:
      rng = np.random.default_rng([cfg.seed, num_frames, depth_index, k])
      distractor_at = cases.distractor_index(at, num_frames, cfg.distractor_gap, rng)
    rows = cases.frame_order(
      num_frames, at, needle_row0 + k, distractor_at, needle_row0 + len(needles) + k
    )
    extra = cfg.max_new_tokens if cfg.scoring == "generate" else 0
    seqs.append(
      cases.build_sequence(piece, len(rows), n_tok, pad_multiple=cfg.pad_multiple, extra=extra)
    )
    rows_list.append(rows)
  if isinstance(scorer, PrefixScorer):
    outcomes = scorer.cell(seqs, rows_list)
  elif cfg.scoring == "teacher_forced":
    outcomes = [scorer.teacher_forced(s, r) for s, r in zip(seqs, rows_list)]
  else:
    outcomes = []
    for needle, seq, rows in zip(needles, seqs, rows_list):
      pred = scorer.generate(seq, rows, cfg.max_new_tokens, stop)
      text = prompts.decode(tokenizer, pred)
      outcomes.append((scoring.generated_correct(text, needle.answer), pred))
  scores = [int(ok) for ok, _ in outcomes]
  return {
    "Num. Frame": num_frames,
    "Frame Depth": cases.depth_label(depth),
    "Score": sum(scores) / len(scores),
    "depth": depth,
    "tokens": max(s.length for s in seqs),
    "scores": scores,
    "predictions": [prompts.decode(tokenizer, pred) for _, pred in outcomes],
  }


def write_summary(results: Results, out: str, title: str = "", x_label="Num. of Frames") -> None:
  """heatmap.png and avg_accuracy.txt next to the JSON."""
  plots.heatmap(
    results.records,
    os.path.join(out, "heatmap.png"),
    x_key=results.x_key,
    y_key=results.y_key,
    x_label=x_label,
    title=title,
  )
  with open(os.path.join(out, "avg_accuracy.txt"), "w") as f:
    f.write(f"Average Accuracy: {results.average()}\n")


def progress_bar(total: int, done: int, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=done, desc="cells", disable=not enabled)
