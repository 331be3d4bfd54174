"""VLM: inputs from a layout, media encoding and splicing, causality by gradients through the
whole model (pixels in, logits out), chunked cross-entropy, and clear errors for bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcv import layout as lay
from lcv import masks, positions
from lcv.config import (
  DecoderConfig,
  ProjectorConfig,
  RopeConfig,
  VisionConfig,
  VLMConfig,
)
from lcv.models import loss, vlm

SEQ = 24


def _cfg(positions="1d", **rope):
  dec = DecoderConfig.variant("tiny", rope=RopeConfig(theta=1e4, positions=positions, **rope))
  vision = VisionConfig.variant("tiny")  # 28 px, 14 px patches: 2 x 2 = 4 tokens per frame
  proj = ProjectorConfig(in_dim=vision.width, out_dim=dec.embed_dim)
  return VLMConfig(decoder=dec, vision=vision, projector=proj, frame_bidirectional=True)


def _layout():
  """Row 0 packs two samples (text, a 2-frame video, text | text, an image, text); row 1 holds one
  sample with an image and padding."""
  samples = [
    [lay.Text(3), lay.Video(2, 4), lay.Text(2)],
    [lay.Text(2), lay.Image(4), lay.Text(3)],
    [lay.Text(5), lay.Image(4), lay.Text(6)],
  ]
  return lay.pack(samples, seq_len=SEQ, num_rows=2)


def _batch(cfg, layout, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, cfg.decoder.vocab_size, layout.shape)
  batch = vlm.prepare_inputs(layout, tokens, cfg)
  frames = int(np.asarray(batch["visual_slot"]).max()) // cfg.frame_tokens + 1
  batch["pixels"] = jnp.asarray(rng.normal(size=(2, frames, 28, 28, 3)), jnp.float32)
  return batch


def test_prepare_inputs():
  cfg = _cfg("v2pe", v2pe_delta=0.5)
  layout = _layout()
  batch = _batch(cfg, layout)
  slot = np.asarray(batch["visual_slot"])
  visual = np.asarray(layout.modality) == 1
  np.testing.assert_array_equal(slot >= 0, visual)
  for r in range(2):  # frame-major running index over the row's visual tokens
    np.testing.assert_array_equal(slot[r][visual[r]], np.arange(visual[r].sum()))
  want = masks.token_mask(layout.segment_ids, layout.frame_ids, True)
  jax.tree.map(np.testing.assert_array_equal, batch["mask"], want)
  v2pe = positions.v2pe(layout.modality, layout.segment_ids, layout.item_ids, 0.5)
  np.testing.assert_array_equal(batch["positions"].ticks, v2pe.ticks)
  # Per-item deltas from the training sampler override the config's fixed one.
  per_item = np.full((2, layout.num_items), 0.25, np.float32)
  sampled = vlm.prepare_inputs(layout, np.zeros(layout.shape), cfg, v2pe_delta=per_item)
  want = positions.v2pe(layout.modality, layout.segment_ids, layout.item_ids, 0.25)
  np.testing.assert_array_equal(sampled["positions"].ticks, want.ticks)
  one_d = vlm.prepare_inputs(layout, np.zeros(layout.shape), _cfg("1d"))["positions"]
  np.testing.assert_array_equal(one_d.ticks, positions.one_d(layout.segment_ids).ticks)
  tad = vlm.prepare_inputs(layout, np.zeros(layout.shape), _cfg("tad"))["positions"]
  assert bool(jnp.all(tad.ticks >= one_d.ticks)) and bool(jnp.any(tad.ticks > one_d.ticks))
  mrope = _cfg("mrope", mrope_sections=(2, 3, 3))
  assert vlm.prepare_inputs(layout, np.zeros(layout.shape), mrope)["positions"].shape == (3, 2, SEQ)


def test_forward_shapes_and_splice():
  cfg = _cfg()
  model = vlm.VLM(cfg, rngs=nnx.Rngs(0))
  batch = _batch(cfg, _layout())
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, batch):
    m = nnx.merge(graphdef, state)
    media = m.encode_media(batch["pixels"])
    x = m.embed(batch["tokens"], batch["visual_slot"], media)
    cached = m(batch | {"pixels": None, "visual_embeds": media})
    return media, x, m.decoder.embed(batch["tokens"]), m(batch), cached

  media, x, text, hidden, cached = run(state, batch)
  assert media.shape == (2, batch["pixels"].shape[1] * cfg.frame_tokens, cfg.decoder.embed_dim)
  slot = np.asarray(batch["visual_slot"])
  r, t = np.nonzero(slot >= 0)
  np.testing.assert_array_equal(x[r, t], media[r, slot[r, t]])
  np.testing.assert_array_equal(x[slot < 0], text[slot < 0])
  assert hidden.shape == (2, SEQ, cfg.decoder.embed_dim)
  assert bool(jnp.all(jnp.isfinite(hidden)))
  np.testing.assert_allclose(hidden, cached, atol=1e-6)


def test_causality_through_the_vlm():
  """d logits_i / d pixels of frame f and d logits_i / d embedding_j vanish exactly where the
  frame-bidirectional, packed mask forbids; the pixels enter through the vision tower."""
  cfg = _cfg()
  model = vlm.VLM(cfg, rngs=nnx.Rngs(0))
  layout = _layout()
  batch = _batch(cfg, layout)
  graphdef, state = nnx.split(model)
  every = jnp.broadcast_to(jnp.arange(SEQ), (2, SEQ))
  probe = jax.random.normal(jax.random.key(0), (cfg.decoder.vocab_size,))

  def logits_of(pixels, shift):
    """Projected logits [B, S]; `shift` [B, S, D] is added to the spliced input embeddings."""
    m = nnx.merge(graphdef, state)
    x = m.embed(batch["tokens"], batch["visual_slot"], m.encode_media(pixels)) + shift
    return m.decode(x, batch["positions"], batch["mask"], logits_at=every) @ probe

  shift = jnp.zeros((2, SEQ, cfg.decoder.embed_dim))
  d_pixels, d_x = jax.jit(jax.jacrev(logits_of, argnums=(0, 1)))(batch["pixels"], shift)
  rows = jnp.arange(2)
  seen = np.asarray(jnp.abs(d_pixels[rows, :, rows]).sum((-3, -2, -1)) > 0)  # [B, S, F]
  allowed = np.asarray(masks.dense(layout.segment_ids, layout.frame_ids, True))
  slot = np.asarray(batch["visual_slot"])
  frame_of = np.where(slot >= 0, slot // cfg.frame_tokens, -1)
  frames = batch["pixels"].shape[1]
  want = np.stack([(allowed & (frame_of[:, None, :] == f)).any(-1) for f in range(frames)], -1)
  np.testing.assert_array_equal(seen, want)
  assert want.any() and not want.all()

  dep = np.asarray(jnp.abs(d_x[rows, :, rows]).sum(-1) > 0)  # [B, S(out), S(in)]
  pad = np.asarray(layout.segment_ids) == 0
  np.testing.assert_array_equal(dep, allowed | (np.eye(SEQ, dtype=bool)[None] & pad[:, :, None]))


def test_chunked_cross_entropy_matches_naive():
  cfg = _cfg()
  model = vlm.VLM(cfg, rngs=nnx.Rngs(0))
  layout = _layout()
  batch = _batch(cfg, layout)
  targets, weights = loss.next_token_targets(
    batch["tokens"], layout.segment_ids, layout.modality, text_weight=1.0, vision_weight=0.5
  )
  hidden = model(batch)
  dec = model.decoder

  def both(hidden):
    naive = loss.cross_entropy(dec.logits(hidden), targets, weights, z_loss=1e-3)
    chunked = loss.chunked_cross_entropy(hidden, dec.logits, targets, weights, chunk=7, z_loss=1e-3)
    return naive, chunked

  naive, chunked = both(hidden)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), naive, chunked)
  assert float(naive[1]) == float(weights.sum()) > 0
  head, layout = dec.head()
  by_weight = loss.chunked_cross_entropy(
    hidden, head, targets, weights, chunk=5, head_layout=layout
  )
  np.testing.assert_allclose(by_weight[0], naive[2]["ce"], rtol=1e-5)
  g_naive, g_chunked = (jax.grad(lambda h, i=i: both(h)[i][0])(hidden) for i in (0, 1))
  np.testing.assert_allclose(g_naive, g_chunked, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["DV", "VD"])
@pytest.mark.parametrize("chunk", [4, 5, 16])
def test_fused_cross_entropy_matches_autodiff(layout, chunk):
  """The fused schedule (gradients formed in the forward) against plain autodiff of the naive
  loss: value, metrics, and the gradients in hidden, the head weight and the loss weights, with
  z-loss, S not a multiple of the chunk, and rows of weight 0."""
  kh, kw, kt, kl = jax.random.split(jax.random.key(1), 4)
  b, s, d, v, z = 2, 13, 8, 37, 1e-2
  hidden = jax.random.normal(kh, (b, s, d), jnp.float32)
  w = jax.random.normal(kw, (d, v) if layout == "DV" else (v, d), jnp.float32)
  targets = jax.random.randint(kt, (b, s), 0, v)
  weights = jax.random.uniform(kl, (b, s)) * (jnp.arange(s) % 4 != 1)
  eq = "BSD,DV->BSV" if layout == "DV" else "BSD,VD->BSV"

  def naive(hidden, w, weights):
    out = loss.cross_entropy(jnp.einsum(eq, hidden, w), targets, weights, z_loss=z)
    return out[0], out[2]

  def fused(hidden, w, weights):
    out = loss.chunked_cross_entropy(
      hidden, w, targets, weights, chunk=chunk, z_loss=z, head_layout=layout
    )
    return out[0], out[2]

  (want, want_aux), want_g = jax.value_and_grad(naive, (0, 1, 2), has_aux=True)(hidden, w, weights)
  fn = jax.jit(jax.value_and_grad(fused, (0, 1, 2), has_aux=True))
  (got, got_aux), got_g = fn(hidden, w, weights)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got_aux, want_aux)
  np.testing.assert_allclose(jax.jit(fused)(hidden, w, weights)[0], want, rtol=1e-5)
  for g, ref in zip(got_g, want_g):
    assert g.dtype == ref.dtype and g.shape == ref.shape
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)
  # A cotangent other than 1 scales every gradient (the backward only applies it).
  _, vjp = jax.vjp(lambda *a: fused(*a)[0], hidden, w, weights)
  np.testing.assert_allclose(vjp(jnp.float32(-3.0))[0], -3.0 * want_g[0], rtol=1e-4, atol=1e-5)


def test_fused_cross_entropy_forms_logits_once_per_step():
  """The point of the fused schedule: the compiled loss-and-gradient program has 3 products with
  the head (logits, dh, dW), the recompute schedule 4; a bf16 head weight gets a bf16 gradient."""
  from lcv.models import layers

  hidden = jnp.ones((1, 16, 8), jnp.bfloat16)
  w = jnp.ones((8, 40), jnp.float32)
  t, wt = jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16))

  def dots(head):
    fn = lambda h, w: loss.chunked_cross_entropy(h, head(w), t, wt, chunk=8)[0]  # noqa: E731
    hlo = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(hidden, w).compile().as_text()
    return hlo.count(" dot(")

  recompute = lambda w: lambda h: layers.logits_dot("BCD,DV->BCV", h, w.astype(h.dtype))  # noqa: E731
  assert (dots(lambda w: w), dots(recompute)) == (3, 4)
  g = jax.grad(lambda w: loss.chunked_cross_entropy(hidden, w, t, wt, chunk=8)[0])(
    w.astype(jnp.bfloat16)
  )
  assert g.dtype == jnp.bfloat16


def test_fused_cross_entropy_rejects_bad_heads():
  h, t, wt = jnp.ones((1, 4, 8)), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4))
  with pytest.raises(ValueError, match="head_layout"):
    loss.chunked_cross_entropy(h, jnp.ones((8, 5)), t, wt, head_layout="VV")
  with pytest.raises(ValueError, match=r"must be VD with D = 8"):
    loss.chunked_cross_entropy(h, jnp.ones((8, 5)), t, wt, head_layout="VD")


def test_logits_dot_gradients_in_the_compute_dtype():
  """The LM head's matmul: float32 logits as plain autodiff gives, gradients equal to it to bf16
  precision, and no float32 matmul in the backward (the cotangent is cast down first)."""
  from lcv.models import layers

  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 8, 16), jnp.bfloat16)
  w = jax.random.normal(kw, (40, 16), jnp.bfloat16)
  ct = jax.random.normal(kc, (2, 8, 40), jnp.float32)
  plain = lambda x, w: jnp.einsum("BSD,VD->BSV", x, w, preferred_element_type=jnp.float32)  # noqa: E731
  ours = lambda x, w: layers.logits_dot("BSD,VD->BSV", x, w)  # noqa: E731
  out, vjp = jax.vjp(ours, x, w)
  want, vjp_want = jax.vjp(plain, x, w)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, want)
  for got, ref in zip(vjp(ct), vjp_want(ct)):
    assert got.dtype == jnp.bfloat16
    ref = np.asarray(ref, np.float32)
    rel = np.linalg.norm(np.asarray(got, np.float32) - ref) / np.linalg.norm(ref)
    assert rel < 1e-2, rel
  jaxpr = str(jax.make_jaxpr(lambda x, w, ct: jax.vjp(ours, x, w)[1](ct))(x, w, ct))
  grads = [
    ln for ln in jaxpr.splitlines() if "dot_general" in ln and ("[2,8,16]" in ln or "[40,16]" in ln)
  ]
  assert len(grads) == 2 and all("bf16[" in ln for ln in grads), grads


def test_next_token_targets_weights():
  seg = np.array([[1, 1, 1, 1, 2, 2, 0]])
  mod = np.array([[0, 1, 1, 0, 0, 0, 0]])
  tok = np.arange(7)[None]
  targets, weights = loss.next_token_targets(tok, seg, mod, text_weight=1.0, vision_weight=0.25)
  np.testing.assert_array_equal(targets, [[1, 2, 3, 4, 5, 6, 0]])
  np.testing.assert_array_equal(weights, [[0.25, 0.25, 1.0, 0.0, 1.0, 0.0, 0.0]])


def test_bad_inputs_raise():
  cfg = _cfg()
  layout = lay.pack([[lay.Text(2), lay.Image(9), lay.Text(2)]], seq_len=16)
  with pytest.raises(ValueError, match="visual slots"):
    vlm.prepare_inputs(layout, np.zeros(layout.shape), cfg)  # 9-token image, 4 expected
  model = vlm.VLM(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="multiple of the patch"):
    model.encode_media(jnp.zeros((1, 1, 30, 28, 3)))
  batch = _batch(cfg, _layout())
  with pytest.raises(ValueError, match="visual slots"):
    model.embed(batch["tokens"], batch["visual_slot"], jnp.zeros((2, 4, cfg.decoder.embed_dim)))
  with pytest.raises(ValueError, match="tokens"):
    vlm.prepare_inputs(layout, np.zeros((1, 3)), cfg)
  with pytest.raises(ValueError, match="tokens_per_frame"):
    VLMConfig(decoder=cfg.decoder, vision=cfg.vision, projector=cfg.projector, tokens_per_frame=9)
  with pytest.raises(ValueError, match="out_dim"):
    VLMConfig(decoder=cfg.decoder, vision=cfg.vision, projector=ProjectorConfig(in_dim=32))
