"""Generation: cached decode equals the full forward, chunked prefill equals one-shot, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh

from lcv import layout as lay
from lcv.config import DecoderConfig, RopeConfig, VLMConfig
from lcv.models import generate as gen
from lcv.models import vlm

N_NEW = 4


def _left_pad(layout: lay.Layout, width: int) -> lay.Layout:
  """Move each row's padding to the left (generation prompts), widening rows to `width`."""

  def shift(a, fill):
    a = np.asarray(a)
    out = np.full(a.shape[:-1] + (width,), fill, a.dtype)
    for r in range(a.shape[-2]):
      n = int((np.asarray(layout.segment_ids[r]) != 0).sum())
      out[..., r, width - n :] = a[..., r, :n]
    return out

  fills = dict(segment_ids=0, modality=0, frame_ids=-1, item_ids=-1, sample_ids=-1)
  fills.update(chunk_ids=-1, offsets=-1, grid_hw=0)
  return lay.Layout(**{k: shift(getattr(layout, k), v) for k, v in fills.items()})


def _append_text(layout: lay.Layout, n: int) -> lay.Layout:
  """The layout with n more text tokens of segment 1 at the end of every row."""
  ext = lambda a, v: np.concatenate([a, np.full(a.shape[:-1] + (n,), v, a.dtype)], axis=-1)
  return lay.Layout(
    segment_ids=ext(layout.segment_ids, 1),
    modality=ext(layout.modality, 0),
    frame_ids=ext(layout.frame_ids, -1),
    item_ids=ext(layout.item_ids, -1),
    sample_ids=ext(layout.sample_ids, 0),
    chunk_ids=ext(layout.chunk_ids, 0),
    offsets=ext(layout.offsets, 0),
    grid_hw=ext(layout.grid_hw, 0),
  )


def _setup(positions="v2pe"):
  sections = (2, 3, 3) if positions == "mrope" else None
  rope = RopeConfig(theta=1e4, positions=positions, v2pe_delta=0.25, mrope_sections=sections)
  dec = DecoderConfig.variant("tiny", rope=rope)
  cfg = VLMConfig(decoder=dec, tokens_per_frame=4, frame_bidirectional=True)
  model = vlm.VLM(cfg, rngs=nnx.Rngs(0))
  grid = (2, 2)  # M-RoPE needs each item's token grid
  samples = [
    [lay.Text(3), lay.Image(4, grid=grid), lay.Text(2)],
    [lay.Text(2), lay.Video(2, 4, grid=grid)],
  ]
  layout = _left_pad(lay.pack(samples, seq_len=12, num_rows=2), 12)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, dec.vocab_size, layout.shape).astype(np.int32)
  embeds = jnp.asarray(rng.normal(size=(2, 8, dec.embed_dim)), jnp.float32)
  return cfg, model, layout, tokens, embeds


@pytest.mark.parametrize("positions", ["v2pe", "mrope"])
def test_cached_decode_equals_full_forward(positions):
  """Greedy tokens and logits of the cached decode equal a teacher-forced full forward; the
  prompts end in text (row 0) and in a bidirectional video frame (row 1)."""
  cfg, model, layout, tokens, embeds = _setup(positions)
  batch = vlm.prepare_inputs(layout, tokens, cfg) | {"visual_embeds": embeds}
  new, logits = gen.generate(model, batch, max_new_tokens=N_NEW, return_logits=True)
  assert new.shape == (2, N_NEW) and logits.shape == (2, N_NEW, cfg.decoder.vocab_size)

  # Teacher-forced forward over prompt + generated tokens, positions and mask rebuilt from the
  # extended layout: the cache must reproduce it exactly.
  full_layout = _append_text(layout, N_NEW - 1)
  full_tokens = np.concatenate([tokens, np.asarray(new[:, :-1])], axis=1)
  full = vlm.prepare_inputs(full_layout, full_tokens, cfg) | {"visual_embeds": embeds}
  at = jnp.broadcast_to(jnp.arange(N_NEW) + tokens.shape[1] - 1, (2, N_NEW))
  want = model(full, logits_at=at)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(new), np.asarray(jnp.argmax(want, -1)))


def test_chunked_prefill_equals_one_shot():
  cfg, model, layout, tokens, embeds = _setup("tad")
  batch = vlm.prepare_inputs(layout, tokens, cfg) | {"visual_embeds": embeds}
  one = gen.generate(model, batch, max_new_tokens=2, return_logits=True)
  chunked = gen.generate(model, batch, max_new_tokens=2, prefill_chunk=5, return_logits=True)
  np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(chunked[0]))
  np.testing.assert_allclose(np.asarray(one[1]), np.asarray(chunked[1]), atol=1e-5, rtol=1e-5)


def test_sampling_rules():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.1, 0.25, 0.6]]))
  greedy = gen.sample(logits, jax.random.key(0), gen.Sampling())
  np.testing.assert_array_equal(greedy, [0, 3])
  keys = jax.random.split(jax.random.key(1), 200)
  draw = lambda s: np.asarray(jax.vmap(lambda k: gen.sample(logits, k, s))(keys))
  np.testing.assert_array_equal(
    draw(gen.Sampling(temperature=1.0, top_k=1)), np.tile([0, 3], (200, 1))
  )
  top2 = draw(gen.Sampling(temperature=1.0, top_k=2))
  assert set(top2[:, 0]) == {0, 1} and set(top2[:, 1]) == {2, 3}
  # top_p = 0.7: row 0 keeps {0, 1} (0.5 < 0.7, then 0.8); row 1 keeps {3, 2} (0.6, then 0.85).
  nucleus = draw(gen.Sampling(temperature=1.0, top_p=0.7))
  assert set(nucleus[:, 0]) == {0, 1} and set(nucleus[:, 1]) == {2, 3}
  hot = draw(gen.Sampling(temperature=100.0))
  assert set(hot[:, 0]) == {0, 1, 2, 3}


def test_bad_generation_inputs_raise():
  cfg, model, layout, tokens, embeds = _setup("1d")
  batch = vlm.prepare_inputs(layout, tokens, cfg) | {"visual_embeds": embeds}
  with pytest.raises(ValueError, match="PRNG key"):
    gen.generate(model, batch, max_new_tokens=2, sampling=gen.Sampling(temperature=1.0))
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.generate(model, batch, max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    gen.Sampling(top_p=0.0)
  packed = lay.pack([[lay.Text(3)], [lay.Text(4)]], seq_len=12)
  two = vlm.prepare_inputs(packed, np.zeros(packed.shape, np.int32), cfg)
  with pytest.raises(ValueError, match="one sample per row"):
    gen.generate(model, two, max_new_tokens=1)


def test_sequence_sharded_cache_equals_unsharded():
  """With the "length" rule splitting the cache over 4 devices, decoding gives the same logits."""
  from lcv.parallel import rules

  cfg, model, layout, tokens, embeds = _setup()
  batch = vlm.prepare_inputs(layout, tokens, cfg) | {"visual_embeds": embeds}
  want = gen.generate(model, batch, max_new_tokens=3, return_logits=True)
  devices = np.array(jax.devices()[:8]).reshape(1, 1, 4, 2)
  mesh = Mesh(devices, ("data", "fsdp", "context", "tensor"), axis_types=(AxisType.Auto,) * 4)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules.RULES):
    got = gen.generate(model, batch, max_new_tokens=3, prefill_chunk=6, return_logits=True)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-5, rtol=1e-5)
