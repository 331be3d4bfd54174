"""Text NIAH: needle placement at sentence boundaries, lengths, scoring with fixture models."""

import numpy as np
from flax import nnx

from lcv.config import TextNIAHConfig
from lcv.data.tokenizer import ByteTokenizer
from lcv.eval import cases, text_niah
from tests.eval import toy_models

TOK = ByteTokenizer()


def small_config(tmp_path, **kw):
  base = dict(
    min_tokens=256,
    max_tokens=512,
    length_step=256,
    depth_step=0.5,
    num_samples=2,
    prompt_template="plain",
    pad_multiple=128,
    output_dir=str(tmp_path / "out"),
  )
  base.update(kw)
  return TextNIAHConfig(**base)


def test_insert_at_depth_uses_sentence_boundaries():
  sentences = [np.full(4, i, np.int32) for i in range(5)]  # 20 tokens, boundaries every 4
  needle = np.asarray([99], np.int32)
  for depth, boundary in [(0.0, 0), (0.5, 2), (0.55, 2), (0.6, 3), (1.0, 5)]:
    out = text_niah.insert_at_depth(sentences, [(depth, needle)])
    assert len(out) == 21
    assert int(np.flatnonzero(out == 99)[0]) == 4 * boundary, depth


def test_case_fills_length_and_holds_the_needle(tmp_path):
  cfg = small_config(tmp_path, distractors=3)
  hay = text_niah.Haystack(TOK, "synthetic", 1024)
  for depth in (0.0, 0.5, 1.0):
    pieces, number = text_niah.make_case(TOK, cfg, hay, 512, depth, np.random.default_rng(1))
    seq = cases.build_sequence(pieces, 0, 0, pad_multiple=128)
    assert 512 - 60 < seq.length <= 512  # whole sentences up to the budget
    text = TOK.decode(seq.tokens[: seq.length])
    assert len(number) == 7 and text.endswith(number)
    assert f"number is: {number}." in text
    assert text.count("The special magic") == 4  # needle + 3 distractors
    context_end = text.index("\nWhat is the special magic")
    where = text.index(f"number is: {number}") / context_end
    assert abs(where - depth) < 0.15, (where, depth)


def test_file_haystack(tmp_path):
  path = tmp_path / "essay.txt"
  path.write_text("First sentence here. Second one!\nThird?  Fourth.")
  assert text_niah.file_sentences(str(path)) == [
    "First sentence here.",
    "Second one!",
    "Third?",
    "Fourth.",
  ]
  hay = text_niah.Haystack(TOK, str(path), 100)
  assert sum(len(s) for s in hay.sentences) >= 100  # cycles through the file


def test_oracle_cells_and_outputs(tmp_path):
  cfg = small_config(tmp_path, min_tokens=512, max_tokens=512, depth_step=1.0)
  results = text_niah.run(cfg, toy_models.TextOracle(window=250), TOK, progress=False)
  scores = {r["Depth"]: r["Score"] for r in results.records}
  assert scores == {0.0: 0.0, 100.0: 1.0}  # far needle missed, near needle found
  assert (tmp_path / "out" / "heatmap.png").exists()
  assert (tmp_path / "out" / "all_accuracies.json").exists()


def test_tiny_model_generation_mode(tmp_path):
  cfg = small_config(
    tmp_path,
    scoring="generate",
    max_new_tokens=4,
    depth_step=1.0,
    max_tokens=256,
    pad_multiple=512,
  )
  results = text_niah.run(cfg, toy_models.TinyVLM(rngs=nnx.Rngs(0)), TOK, progress=False)
  assert len(results.records) == 2
  for r in results.records:
    assert len(r["predictions"]) == 2 and r["Score"] in (0.0, 0.5, 1.0)
    assert all(len(p) <= 4 for p in r["predictions"])  # at most max_new_tokens bytes
