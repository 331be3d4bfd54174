"""The harness on the real `lcv.models.vlm.VLM` (tiny config, random weights): the LM head at the
answer positions equals the full forward; ring attention over 8 CPU devices and KV-cache
generation equal their plain counterparts."""

import jax
import numpy as np
import pytest
from flax import nnx

from lcv.config import MeshConfig
from lcv.data.tokenizer import ByteTokenizer
from lcv.eval import cases, needles, prompts, scoring, vniah
from tests.eval import toy_models

TOK = ByteTokenizer()


tiny_vlm = toy_models.tiny_vlm


def a_case(model, num_frames=3, depth=0.5):
  """(sequence, rows, table) of one needle case with random frame embeddings."""
  n_tok, dim = model.cfg.frame_tokens, model.cfg.decoder.embed_dim
  table = np.random.default_rng(0).normal(size=(num_frames + 1, n_tok, dim)).astype(np.float32)
  needle = needles.builtin_needles(28)[0]
  pieces = prompts.prompt_pieces(TOK, prompts.get_template("qwen2"), needle.question, "2718")
  rows = cases.frame_order(num_frames, cases.insertion_index(depth, num_frames), num_frames)
  seq = cases.build_sequence(pieces, len(rows), n_tok, pad_multiple=64)
  return seq, rows, table


def test_logits_at_answer_positions_equal_full_forward():
  model = tiny_vlm()
  seq, rows, table = a_case(model)
  ok, pred = scoring.Scorer(model, table).teacher_forced(seq, rows)
  inputs = scoring.inputs_for(model)(seq)
  visual = table[rows].reshape(1, -1, table.shape[-1])
  forward = nnx.jit(lambda m, batch: m.decoder.logits(m(batch)))  # LM head everywhere
  full = np.asarray(forward(model, {**inputs, "visual_embeds": visual})).argmax(-1)[0]
  np.testing.assert_array_equal(pred, full[seq.logits_at()])
  assert ok == (pred == seq.answer.tolist())


def test_text_only_inputs_for_vlm():
  model = tiny_vlm()
  pieces = prompts.prompt_pieces(TOK, prompts.get_template("plain"), "\nWhat?", "42")
  seq = cases.build_sequence(pieces, 0, 0, pad_multiple=32)
  _, pred = scoring.Scorer(model, None).teacher_forced(seq, None)
  assert len(pred) == 2


@pytest.mark.slow
def test_ring_attention_sharded_equals_unsharded(tmp_path):
  from lcv.parallel.mesh import make_mesh

  mesh = make_mesh(MeshConfig(fsdp=1, context=8))
  plain = tiny_vlm("xla", seed=3)
  ring = tiny_vlm("ring", seed=3)
  seq, rows, table = a_case(plain, num_frames=6, depth=0.2)
  want = scoring.Scorer(plain, table, answer_width=4).predict(seq, rows, seq.logits_at(4))
  with jax.set_mesh(mesh):
    table_sharded = jax.device_put(
      table, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )
    scorer = scoring.Scorer(ring, table_sharded, shard=vniah.context_sharding(mesh), answer_width=4)
    got = scorer.predict(seq, rows, seq.logits_at(4))
  np.testing.assert_array_equal(got, want)


class Forward:
  """The VLM's three methods without its config: the harness then decodes without a KV cache."""

  def __init__(self, model):
    self.encode_media, self.embed, self.decode = model.encode_media, model.embed, model.decode


def test_cached_generation_equals_full_recompute():
  model = tiny_vlm(seed=5)
  _, rows, table = a_case(model)
  n_tok = model.cfg.frame_tokens
  needle = needles.builtin_needles(28)[0]
  p = prompts.prompt_pieces(TOK, prompts.get_template("qwen2"), needle.question, "2718")
  seq = cases.build_sequence(p, len(rows), n_tok, pad_multiple=64, extra=5)
  cached = scoring.Scorer(model, table).generate(seq, rows, 5)
  recomputed = scoring.Scorer(Forward(model), table).generate(seq, rows, 5)
  assert len(cached) == 5
  assert cached == recomputed
