"""Logit / feature parity with `transformers` for every importable class, in float32.

Each test builds a tiny random Hugging Face model, saves it with `save_pretrained`, imports the
directory with `lcv.models.checkpoints.load_hf` and compares outputs on the same random input.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from lcv import masks  # noqa: E402
from lcv.models import checkpoints, vision  # noqa: E402
from lcv.positions import as_positions  # noqa: E402

TOL = 1e-4
TEXT = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  vocab_size=64,
  max_position_embeddings=64,
)
VISION = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  image_size=28,
  patch_size=14,
)


def _save(model, path):
  torch.manual_seed(0)
  with torch.no_grad():  # random norms and biases, so a swapped or dropped one shows
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(path)
  return model


def _lcv_logits(decoder, embeds, positions):
  b, s = embeds.shape[:2]
  mask = masks.token_mask(np.ones((b, s), np.int32), -np.ones((b, s), np.int32), False)
  at = np.broadcast_to(np.arange(s), (b, s))
  return np.asarray(decoder(jnp.asarray(embeds), as_positions(positions), mask, logits_at=at))


def _text_parity(hf_model, path, scan_layers=True):
  _save(hf_model, path)
  cfg, dec = checkpoints.load_hf(str(path), dtype="float32", scan_layers=scan_layers)
  rs = np.random.RandomState(0)
  ids = rs.randint(0, TEXT["vocab_size"], (2, 8))
  # Far positions make every RoPE band (and hence each scaling rule) matter.
  pos = np.broadcast_to(np.arange(8) + 40, (2, 8)).astype(np.int32)
  with torch.no_grad():
    want = hf_model(torch.tensor(ids), position_ids=torch.tensor(pos, dtype=torch.long)).logits
  got = _lcv_logits(dec, dec.embed(jnp.asarray(ids)), pos)
  np.testing.assert_allclose(got, want.numpy(), atol=TOL, rtol=0)
  return cfg


@pytest.mark.parametrize(
  ("arch", "extra"),
  [
    ("llama", dict(tie_word_embeddings=False)),  # GQA 4 q-heads over 2 kv-heads, untied
    ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),  # qkv bias, tied, MQA
    ("llama", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    (
      "llama",
      dict(
        rope_scaling=dict(
          rope_type="llama3",
          factor=8.0,
          low_freq_factor=1.0,
          high_freq_factor=4.0,
          original_max_position_embeddings=16,
        )
      ),
    ),
    (
      "qwen2",
      dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    ),
  ],
  ids=["llama-gqa-untied", "qwen2-bias-tied", "rope-linear", "rope-llama3", "rope-yarn"],
)
def test_causal_lm_logits(arch, extra, tmp_path):
  kw = {**TEXT, **extra}
  if arch == "llama":
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
  else:
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
  cfg = _text_parity(hf, tmp_path)
  assert cfg.qkv_bias == (arch == "qwen2")
  assert cfg.tie_embeddings == kw.get("tie_word_embeddings", False)
  if "rope_scaling" in extra:
    assert cfg.rope.scaling.kind == extra["rope_scaling"]["rope_type"]


def test_unscanned_layers_import(tmp_path):
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TEXT, "num_hidden_layers": 1}))
  _text_parity(hf, tmp_path, scan_layers=False)


def _features(hf_model, path, sizes, **overrides):
  _save(hf_model, path)
  cfg, enc = checkpoints.load_hf(str(path), **overrides)
  for h, w in sizes:
    px = np.random.RandomState(h + w).randn(2, 3, h, w).astype(np.float32)
    with torch.no_grad():
      out = hf_model(torch.tensor(px), output_hidden_states=True, interpolate_pos_encoding=True)
    got = np.asarray(enc(jnp.asarray(px.transpose(0, 2, 3, 1))))
    yield cfg, out, got


def test_clip_features(tmp_path):
  hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
  for cfg, out, got in _features(hf, tmp_path, [(28, 28), (42, 56)]):
    assert cfg.feature_layer == -2 and cfg.class_token
    # LLaVA's features: second-to-last hidden state, class token dropped.
    np.testing.assert_allclose(got, out.hidden_states[-2][:, 1:].numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("image_size", [28, 30])
def test_siglip_features(image_size, tmp_path):
  """30 px with 14 px patches is so400m/14-384's case: the strided conv ignores the last 2 px."""
  hf = transformers.SiglipVisionModel(
    transformers.SiglipVisionConfig(**{**VISION, "image_size": image_size})
  )
  sizes = [(image_size, image_size), (56, 42)]
  for cfg, out, got in _features(hf, tmp_path, sizes[: 2 if image_size == 28 else 1]):
    assert not cfg.class_token and cfg.post_norm and cfg.drop_remainder == (image_size == 30)
    np.testing.assert_allclose(got, out.last_hidden_state.numpy(), atol=TOL, rtol=0)


def test_bicubic_matches_torch():
  grid = np.random.RandomState(0).randn(5, 5, 3).astype(np.float32)
  for h, w in ((7, 9), (3, 4)):
    want = torch.nn.functional.interpolate(
      torch.tensor(grid).permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False
    )[0].permute(1, 2, 0)
    got = vision.interpolate_positions(jnp.asarray(grid.reshape(25, 3)), 5, h, w)
    np.testing.assert_allclose(np.asarray(got).reshape(h, w, 3), want.numpy(), atol=1e-5)


def _splice(parts, ids, pixels, image_token):
  """lcv side of a LLaVA forward: vision -> projector -> embeddings at the image tokens."""
  feats = parts["projector"](parts["vision"](jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  x = parts["decoder"].embed(jnp.asarray(ids))
  rows, cols = np.nonzero(ids == image_token)
  x = x.at[rows, cols].set(feats.reshape(-1, feats.shape[-1]))
  return x


def test_llava_end_to_end_logits(tmp_path):
  """LLaVA-1.5 layout (CLIP layer -2, class token dropped, Qwen2) through `VLM`: encode_media,
  embed at visual slots, decode, against LlavaForConditionalGeneration with pixel_values."""
  image_token = 63
  cfg = transformers.LlavaConfig(
    vision_config=transformers.CLIPVisionConfig(**VISION),
    text_config=transformers.Qwen2Config(**TEXT),
    image_token_index=image_token,
    image_seq_length=4,
  )
  hf = _save(transformers.LlavaForConditionalGeneration(cfg), tmp_path)
  vlm_cfg, vlm = checkpoints.vlm_from_hf(str(tmp_path), dtype="float32")
  assert vlm_cfg.vision.feature_layer == -2 and vlm_cfg.frame_tokens == 4
  ids = np.random.RandomState(0).randint(0, 60, (2, 10))
  ids[:, 2:6] = image_token  # 28 px / 14 -> 4 patch tokens per image
  px = np.random.RandomState(1).randn(2, 3, 28, 28).astype(np.float32)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px)).logits.numpy()
  slot = np.where(ids == image_token, np.cumsum(ids == image_token, axis=1) - 1, -1)
  media = vlm.encode_media(jnp.asarray(px.transpose(0, 2, 3, 1)))
  x = vlm.embed(jnp.asarray(ids), jnp.asarray(slot), media)
  pos = np.broadcast_to(np.arange(10), (2, 10)).astype(np.int32)
  np.testing.assert_allclose(_lcv_logits(vlm.decoder, x, pos), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["LlavaOnevision", "LlavaNext"])
def test_llava_next_onevision_layout(arch, tmp_path):
  """LLaVA-OneVision (SigLIP read at layer -1 without its post-norm, "full" strategy) and
  LLaVA-NeXT (CLIP at -2, "default") names: vision_tower, multi_modal_projector, language_model
  (LongVA's HF release). Their anyres tiling is not lcv's layout, so the comparison splices the
  projected features at the image slots of both models."""
  if arch == "LlavaOnevision":
    vis = transformers.SiglipVisionConfig(**VISION)
    cfg = transformers.LlavaOnevisionConfig(
      vision_config=vis, text_config=transformers.Qwen2Config(**TEXT), image_token_index=63
    )
  else:
    vis = transformers.CLIPVisionConfig(**VISION)
    cfg = transformers.LlavaNextConfig(
      vision_config=vis, text_config=transformers.Qwen2Config(**TEXT), image_token_index=63
    )
  hf = _save(getattr(transformers, f"{arch}ForConditionalGeneration")(cfg), tmp_path)
  parts_cfg, parts = checkpoints.load_hf(str(tmp_path), dtype="float32")
  assert isinstance(parts_cfg, checkpoints.VLMParts) and not parts_cfg.vision.post_norm
  layer = cfg.vision_feature_layer
  assert parts_cfg.vision.feature_layer == layer
  px = np.random.RandomState(2).randn(2, 3, 28, 28).astype(np.float32)
  with torch.no_grad():
    states = hf.model.vision_tower(torch.tensor(px), output_hidden_states=True).hidden_states
    drop = 1 if cfg.vision_feature_select_strategy == "default" else 0
    want_feats = hf.model.multi_modal_projector(states[layer][:, drop:])
  ids = np.random.RandomState(3).randint(0, 60, (2, 8))
  ids[:, 1:5] = 63
  x = _splice(parts, ids, px, 63)
  embeds = hf.model.get_input_embeddings()(torch.tensor(ids))
  embeds[torch.tensor(ids) == 63] = want_feats.reshape(-1, want_feats.shape[-1])
  with torch.no_grad():
    want = hf(inputs_embeds=embeds).logits.numpy()
  got_feats = parts["projector"](parts["vision"](jnp.asarray(px.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(np.asarray(got_feats), want_feats.detach().numpy(), atol=TOL, rtol=0)
  pos = np.broadcast_to(np.arange(8), (2, 8)).astype(np.int32)
  np.testing.assert_allclose(_lcv_logits(parts["decoder"], x, pos), want, atol=TOL, rtol=0)
