"""Prefix-cached chunked scoring (`lcv.eval.prefix_cache`) equals whole-sequence scoring on the
real `lcv.models.vlm.VLM` (tiny, random weights), also through `vniah.run` and under a mesh."""

import dataclasses

import jax
import numpy as np
import pytest

from lcv.config import MeshConfig
from lcv.data.tokenizer import ByteTokenizer
from lcv.eval import cases, prompts, scoring, vniah
from tests.eval.toy_models import tiny_vlm

TOK = ByteTokenizer()


def test_prefix_cache_scoring_equals_whole_sequence():
  from lcv.eval.prefix_cache import PrefixScorer, shared_prefix

  model = tiny_vlm(seed=7)
  n_tok, dim, frames = model.cfg.frame_tokens, model.cfg.decoder.embed_dim, 8
  rng = np.random.default_rng(1)
  table = rng.normal(size=(frames + 6, n_tok, dim)).astype(np.float32)  # haystack, 3 needles, 3 d.
  answers = ("2718", "B", "Orange")
  plain = scoring.Scorer(model, table)
  chunked = PrefixScorer(model, table, scoring.inputs_for(model), chunk=16)
  for depth in (0.0, 0.75):
    at = cases.insertion_index(depth, frames)
    seqs, rows_list = [], []
    for k, answer in enumerate(answers):
      q = f"\nQuestion {k}?" * (k + 1)  # different question lengths
      p = prompts.prompt_pieces(TOK, prompts.get_template("qwen2"), q, answer)
      distractor = None if k == 0 else min(at + 2, frames)
      rows = cases.frame_order(frames, at, frames + k, distractor, frames + 3 + k)
      rows_list.append(rows)
      seqs.append(cases.build_sequence(p, len(rows), n_tok, pad_multiple=64))
    shared = shared_prefix(seqs, rows_list)
    pre = len(prompts.text_ids(TOK, prompts.get_template("qwen2").preprompt))
    assert shared == pre + at * n_tok  # the needle frame is the first difference
    want = [plain.teacher_forced(s, r) for s, r in zip(seqs, rows_list)]
    assert chunked.cell(seqs, rows_list) == want


def test_vniah_run_with_prefix_cache_matches(tmp_path):
  from lcv.config import VNIAHConfig

  model = tiny_vlm(seed=2)
  cfg = VNIAHConfig(
    min_frames=5, max_frames=5, frame_step=1, depth_step=1.0, image_size=28, distractor=True,
    distractor_gap=2, prompt_template="qwen2", pad_multiple=64, encode_batch=8,
    cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "whole"),
  )  # fmt: skip
  whole = vniah.run(cfg, model, TOK, model_key="tiny", progress=False)
  chunked = vniah.run(
    dataclasses.replace(cfg, prefix_chunk=32), model, TOK, model_key="tiny",
    output_dir=str(tmp_path / "chunked"), progress=False,
  )  # fmt: skip
  assert [r["predictions"] for r in chunked.records] == [r["predictions"] for r in whole.records]
  with pytest.raises(ValueError, match="prefix_chunk"):
    vniah.check_config(dataclasses.replace(cfg, prefix_chunk=48))


@pytest.mark.slow
def test_prefix_cache_under_context_mesh_equals_unsharded():
  from lcv.eval.prefix_cache import PrefixScorer
  from lcv.parallel.mesh import make_mesh

  mesh = make_mesh(MeshConfig(fsdp=1, context=8))
  model = tiny_vlm(seed=7)
  n_tok, dim, frames = model.cfg.frame_tokens, model.cfg.decoder.embed_dim, 8
  table = np.random.default_rng(1).normal(size=(frames + 2, n_tok, dim)).astype(np.float32)
  seqs, rows_list = [], []
  for k in range(2):
    p = prompts.prompt_pieces(TOK, prompts.get_template("qwen2"), "\nQ?" * (k + 1), "Orange")
    rows_list.append(cases.frame_order(frames, 4, frames + k))
    seqs.append(cases.build_sequence(p, len(rows_list[-1]), n_tok, pad_multiple=64))
  want = [scoring.Scorer(model, table).teacher_forced(s, r) for s, r in zip(seqs, rows_list)]
  with jax.set_mesh(mesh):
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    scorer = PrefixScorer(model, jax.device_put(table, replicated), scoring.inputs_for(model), 32)
    assert scorer.cell(seqs, rows_list) == want
