"""V-NIAH end to end on CPU: tiny grid, fixture models, JSON + PNG, resume, cache, sharding."""

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx

from lcv.config import MeshConfig, VNIAHConfig
from lcv.data.tokenizer import ByteTokenizer
from lcv.eval import needles as needles_lib
from lcv.eval import prompts, vniah
from lcv.eval.embedding_cache import EmbeddingCache
from tests.eval import toy_models

TOK = ByteTokenizer()
N_TOK = 3  # oracle tokens per frame


def small_config(tmp_path, **kw):
  base = dict(
    min_frames=4,
    max_frames=12,
    frame_step=4,
    depth_step=0.5,
    image_size=16,
    prompt_template="plain",
    pad_multiple=64,
    encode_batch=8,
    cache_dir=str(tmp_path / "cache"),
    output_dir=str(tmp_path / "out"),
    image_mean=(0.0, 0.0, 0.0),
    image_std=(1.0, 1.0, 1.0),
  )
  base.update(kw)
  return VNIAHConfig(**base)


@pytest.fixture
def oracle_needles(tmp_path):
  q = needles_lib.question
  needle = toy_models.needle_image()
  ns = [
    needles_lib.Needle("mc", needle, q("Which?", ("x", "y")), "B"),
    needles_lib.Needle("open", needle, q("What colour?"), "Magenta"),
  ]
  path = str(tmp_path / "needles" / "needles.json")
  needles_lib.save_needles(ns, path)
  return path


def expected_correct(num_frames, depth, needle, window):
  """The oracle is right iff every answer position has the needle's last token in its window."""
  frames_after = num_frames - int(depth * num_frames)
  text_after = len(TOK.encode(needle.question)) + len(TOK.encode("\n"))  # question + post
  last_answer_pos_distance = frames_after * N_TOK + text_after + len(needle.answer) - 1
  return last_answer_pos_distance < window


def test_oracle_scores_known_cells(tmp_path, oracle_needles):
  # The oracle answers iff the needle is within `window` tokens of the answer positions, so each
  # cell's score is known exactly (1.0, 0.5 or 0.0): this checks the insertion index, the gather
  # of cached embeddings and the logits_at alignment (an off-by-one would score 0 everywhere).
  cfg = small_config(tmp_path, needles=oracle_needles)
  window = 100
  oracle = toy_models.Oracle(window=window, tokens_per_frame=N_TOK)
  results = vniah.run(cfg, oracle, TOK, model_key="oracle", progress=False)
  needles = needles_lib.load_needles(oracle_needles)
  assert len(results.records) == 9
  for r in results.records:
    want = [expected_correct(r["Num. Frame"], r["depth"], n, window) for n in needles]
    assert r["scores"] == [int(w) for w in want], r
    assert r["Score"] == np.mean(want)
    for ok, pred, n in zip(want, r["predictions"], needles):
      assert (pred == n.answer) == ok
  scores = {(r["Num. Frame"], r["Frame Depth"]): r["Score"] for r in results.records}
  assert scores[(12, 100.0)] == 1.0 and scores[(12, 0.0)] == 0.0  # both kinds of cell occur
  out = tmp_path / "out"
  assert (out / "heatmap.png").stat().st_size > 10_000
  avg = (out / "avg_accuracy.txt").read_text()
  assert avg.startswith("Average Accuracy: ")
  assert float(avg.split(":")[1]) == pytest.approx(np.mean(list(scores.values())))


def test_resume_skips_done_cells_and_cache_never_reencodes(tmp_path, oracle_needles):
  cfg = small_config(tmp_path, needles=oracle_needles, max_frames=8)
  oracle = toy_models.Oracle(window=75, tokens_per_frame=N_TOK)
  vniah.run(cfg, oracle, TOK, model_key="oracle", progress=False)
  path = tmp_path / "out" / "all_accuracies.json"
  records = json.loads(path.read_text())
  assert len(records) == 6
  # Drop two cells, mark one kept cell so that recomputation would be visible, and rerun.
  records = records[:4]
  records[0]["predictions"] = ["kept"]
  path.write_text(json.dumps(records))
  calls = []
  real = vniah._cell
  try:
    vniah._cell = lambda cfg, cell, *a: calls.append(cell[:2]) or real(cfg, cell, *a)
    again = vniah.run(cfg, oracle, TOK, model_key="oracle", progress=False)
  finally:
    vniah._cell = real
  assert len(calls) == 2
  assert len(again.records) == 6 and again.records[0]["predictions"] == ["kept"]
  # The embedding cache holds one file per 8-frame chunk and one per distinct needle image.
  files = os.listdir(tmp_path / "cache" / "oracle")
  assert len(files) == 2


def test_embedding_cache_reuses_chunks(tmp_path):
  calls = []

  def encode(pixels):
    calls.append(pixels.shape)
    return np.asarray(pixels).mean(axis=(2, 3)).repeat(2, axis=1)  # [1, F * 2, 3]

  cache = EmbeddingCache(
    str(tmp_path), "m", encode, image_size=8, mean=(0, 0, 0), std=(1, 1, 1), chunk=4
  )
  frames = np.random.default_rng(0).integers(0, 255, (10, 8, 8, 3), dtype=np.uint8)
  a = cache.encode(frames[:6])
  assert a.shape == (6, 2, 3) and cache.encoded == 6 and calls == [(1, 4, 8, 8, 3)] * 2
  b = cache.encode(frames[:8])  # chunk [0:4] is reused; [4:8] is new content
  assert cache.encoded == 10
  np.testing.assert_allclose(b[:4], a[:4])
  cache2 = EmbeddingCache(
    str(tmp_path), "m", encode, image_size=8, mean=(0, 0, 0), std=(1, 1, 1), chunk=4
  )
  np.testing.assert_allclose(cache2.encode(frames[:8]), b)
  assert cache2.encoded == 0


def test_tiny_vlm_end_to_end_with_distractor(tmp_path):
  model = toy_models.TinyVLM(rngs=nnx.Rngs(0))
  cfg = small_config(
    tmp_path, min_frames=6, max_frames=6, distractor=True, distractor_gap=2, pad_multiple=256
  )
  results = vniah.run(cfg, model, TOK, model_key="tiny", progress=False)
  assert [r["Frame Depth"] for r in results.records] == [0.0, 50.0, 100.0]
  # Needle and distractor are two extra frames of 4 tokens each (the distractor fits at every
  # depth here: 2 frames after the needle at depth 0, before it at depths 0.5 and 1).
  template = prompts.get_template("plain")
  longest = max(
    len(TOK.encode(n.question)) + len(TOK.encode(n.answer)) for n in needles_lib.builtin_needles()
  )
  text = len(TOK.encode(template.preprompt)) + len(TOK.encode(template.postprompt)) + longest
  for r in results.records:
    assert len(r["scores"]) == 5 and 0 <= r["Score"] <= 1
    assert r["tokens"] == text + (6 + 2) * 4
  assert (tmp_path / "out" / "heatmap.png").exists()


def test_generation_mode_matches_teacher_forcing_on_oracle(tmp_path, oracle_needles):
  oracle = toy_models.Oracle(window=10_000, tokens_per_frame=N_TOK)
  cfg = small_config(
    tmp_path,
    needles=oracle_needles,
    max_frames=4,
    depth_step=1.0,
    scoring="generate",
    max_new_tokens=3,
  )
  results = vniah.run(cfg, oracle, TOK, model_key="oracle", progress=False)
  # The oracle copies the next token, which in generation mode is the (zeroed) free slot: it
  # generates pad ids that decode to "" and so never matches; teacher forcing scores 1.0.
  assert all(r["Score"] == 0.0 for r in results.records)
  tf = vniah.run(
    dataclasses.replace(cfg, scoring="teacher_forced"),
    oracle,
    TOK,
    model_key="oracle",
    output_dir=str(tmp_path / "tf"),
    progress=False,
  )
  assert all(r["Score"] == 1.0 for r in tf.records)


def test_context_sharded_run_equals_unsharded(tmp_path, oracle_needles):
  from lcv.parallel.mesh import make_mesh

  mesh = make_mesh(MeshConfig(fsdp=1, context=8))
  model = toy_models.TinyVLM(rngs=nnx.Rngs(1))
  cfg = small_config(tmp_path, needles=oracle_needles, min_frames=5, max_frames=5, depth_step=1.0)
  plain = vniah.run(cfg, model, TOK, model_key="tiny", progress=False)
  sharded = vniah.run(
    cfg,
    model,
    TOK,
    model_key="tiny",
    mesh=mesh,
    output_dir=str(tmp_path / "sharded"),
    progress=False,
  )
  assert [r["predictions"] for r in sharded.records] == [r["predictions"] for r in plain.records]
  with pytest.raises(ValueError, match="pad_multiple"):
    vniah.check_config(dataclasses.replace(cfg, pad_multiple=24), context=8)
