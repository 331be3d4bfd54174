"""Hugging Face `config.json` -> lcv configs (`DecoderConfig`, `VisionConfig`, `ProjectorConfig`).

Reads both the transformers 4 spelling (`rope_theta`, `rope_scaling` with "type") and the 5 one
(`rope_parameters` with "rope_type"). Anything the lcv modules do not implement (o_proj bias, MLP
bias, sliding windows, partial rotary, multi-layer vision features...) is a clear error rather
than a silently different model. Missing keys are errors too: transformers fills class defaults
that a raw config.json may omit, and guessing them here would hide a mismatch.
"""

from __future__ import annotations

import dataclasses

from lcv.config import DecoderConfig, ProjectorConfig, RopeConfig, RopeScaling, VisionConfig


def _need(hf: dict, key: str, where: str):
  if hf.get(key) is None:
    raise ValueError(f"{where} config.json lacks {key!r}; add it (transformers' default) and retry")
  return hf[key]


def rope_config(hf: dict) -> RopeConfig:
  """RoPE theta and scaling from a text config (transformers 4 or 5 spelling)."""
  params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
    raise ValueError("partial_rotary_factor != 1 is not supported (Llama / Qwen2 rotate all dims)")
  original = params.get("original_max_position_embeddings") or hf.get(
    "original_max_position_embeddings", hf.get("max_position_embeddings")
  )
  factor = params.get("factor")
  if kind == "default":
    scaling = None
  elif kind == "linear":
    scaling = RopeScaling(kind="linear", factor=float(factor))
  elif kind == "dynamic":
    scaling = RopeScaling(
      kind="dynamic", factor=float(factor), original_max_position_embeddings=original
    )
  elif kind == "yarn":
    if factor is None:  # DeepSeek-style: implied by the two context lengths.
      factor = hf["max_position_embeddings"] / original
    scaling = RopeScaling(
      kind="yarn",
      factor=float(factor),
      original_max_position_embeddings=original,
      beta_fast=float(params.get("beta_fast") or 32.0),
      beta_slow=float(params.get("beta_slow") or 1.0),
      mscale=params.get("mscale"),
      mscale_all_dim=params.get("mscale_all_dim"),
      attention_factor=params.get("attention_factor"),
      truncate=bool(params.get("truncate", True)),
    )
  elif kind == "llama3":
    scaling = RopeScaling(
      kind="llama3",
      factor=float(factor),
      original_max_position_embeddings=original,
      low_freq_factor=float(params["low_freq_factor"]),
      high_freq_factor=float(params["high_freq_factor"]),
    )
  else:
    raise ValueError(
      f"rope_type {kind!r} is not supported; use default, linear, dynamic, yarn or llama3"
    )
  return RopeConfig(theta=theta, scaling=scaling)


def decoder_config(hf: dict, tensors_have_lm_head: bool = True, **overrides) -> DecoderConfig:
  """`DecoderConfig` of a Llama / Qwen2 text config; `overrides` (dtype, remat...) win."""
  where = f"text ({hf.get('model_type')})"
  if hf.get("model_type") not in ("llama", "qwen2"):
    raise ValueError(f"text model_type={hf.get('model_type')!r}; lcv imports llama and qwen2")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r}; the lcv decoder implements SwiGLU (silu)")
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported by the lcv decoder (Llama / Qwen2 have none)")
  if hf.get("model_type") == "llama" and hf.get("attention_bias"):
    raise ValueError("Llama attention_bias=True also biases o_proj, which the lcv decoder lacks")
  if hf.get("use_sliding_window"):
    raise ValueError("use_sliding_window=True is not supported; lcv attention is full causal")
  hidden = _need(hf, "hidden_size", where)
  heads = _need(hf, "num_attention_heads", where)
  tie = hf.get("tie_word_embeddings")
  if tie is None:  # transformers 4 and 5 disagree on the default; the weights decide.
    tie = not tensors_have_lm_head
  fields = dict(
    vocab_size=_need(hf, "vocab_size", where),
    embed_dim=hidden,
    mlp_dim=_need(hf, "intermediate_size", where),
    num_layers=_need(hf, "num_hidden_layers", where),
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hidden // heads,
    rope=rope_config(hf),
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    qkv_bias=hf["model_type"] == "qwen2",
    tie_embeddings=bool(tie),
  )
  return DecoderConfig(**{**fields, **overrides})


_ACTS = {
  "quick_gelu": "quick_gelu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
  "gelu": "gelu",
}


def vision_config(hf: dict, **overrides) -> VisionConfig:
  """`VisionConfig` of a CLIP / SigLIP vision config.

  Defaults follow each family's use as a VLM tower read directly: CLIP -> second-to-last block,
  class token dropped, no post-norm (LLaVA); SigLIP -> last block with post-norm
  (`SiglipVisionModel.last_hidden_state`). `overrides` win.
  """
  kind = hf.get("model_type", "")
  where = f"vision ({kind})"
  if kind not in ("clip_vision_model", "siglip_vision_model"):
    raise ValueError(
      f"vision model_type={kind!r}; lcv imports clip_vision_model, siglip_vision_model"
    )
  act = hf.get("hidden_act", "quick_gelu" if kind.startswith("clip") else "gelu_pytorch_tanh")
  if act not in _ACTS:
    raise ValueError(f"vision hidden_act={act!r} is not supported; known: {sorted(_ACTS)}")
  patch, size = _need(hf, "patch_size", where), _need(hf, "image_size", where)
  clip = kind.startswith("clip")
  fields = dict(
    patch=patch,
    image_size=size,
    width=_need(hf, "hidden_size", where),
    depth=_need(hf, "num_hidden_layers", where),
    heads=_need(hf, "num_attention_heads", where),
    mlp=_need(hf, "intermediate_size", where),
    channels=hf.get("num_channels", 3),
    class_token=clip,
    pre_norm=clip,
    post_norm=not clip,
    act=_ACTS[act],
    feature_layer=-2 if clip else -1,
    patch_bias=not clip,
    drop_remainder=bool(size % patch),
    norm_eps=float(hf.get("layer_norm_eps", 1e-5 if clip else 1e-6)),
  )
  return VisionConfig(**{**fields, **overrides})


@dataclasses.dataclass(frozen=True)
class VLMParts:
  """The three configs of a LLaVA-layout checkpoint (`lcv.config.VLMConfig` takes them)."""

  decoder: DecoderConfig
  vision: VisionConfig
  projector: ProjectorConfig


def vlm_configs(hf: dict, tensors_have_lm_head: bool = True, **decoder_overrides) -> VLMParts:
  """Decoder, vision and projector configs of a LLaVA / LLaVA-NeXT / LLaVA-OneVision config.

  The vision tower keeps `vision_feature_layer`'s hidden state *without* post-norm (as LLaVA
  reads `hidden_states[layer]`) and drops the class token under the "default" select strategy.
  The projector has no pooling: LongVA's 2 x 2 average pool is a usage choice, not a weight; set
  it with `dataclasses.replace(parts.projector, pool=2)`.
  """
  layer = hf.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ValueError(f"vision_feature_layer={layer!r}: only a single layer is supported")
  strategy = hf.get("vision_feature_select_strategy", "default")
  vis_hf = _need(hf, "vision_config", "LLaVA")
  clip = vis_hf.get("model_type", "").startswith("clip")
  if strategy not in ("default", "full"):
    raise ValueError(f"vision_feature_select_strategy={strategy!r}; use default or full")
  if strategy == "default" and not clip:
    raise ValueError(
      "vision_feature_select_strategy='default' drops the first token, but a SigLIP tower has no "
      "class token; such checkpoints use 'full'"
    )
  precision = {k: decoder_overrides[k] for k in ("dtype", "param_dtype") if k in decoder_overrides}
  vision = vision_config(
    vis_hf,
    feature_layer=layer,
    post_norm=False,
    keep_class_token=clip and strategy == "full",
    **precision,
  )
  if hf.get("projector_hidden_act", "gelu") != "gelu":
    raise ValueError(f"projector_hidden_act={hf['projector_hidden_act']!r}; lcv's is gelu (exact)")
  if not hf.get("multimodal_projector_bias", True):
    raise ValueError("multimodal_projector_bias=False is not supported (mlp2x_gelu has biases)")
  decoder = decoder_config(
    _need(hf, "text_config", "LLaVA"), tensors_have_lm_head, **decoder_overrides
  )
  projector = ProjectorConfig(
    in_dim=vision.width,
    out_dim=decoder.embed_dim,
    dtype=decoder.dtype,
    param_dtype=decoder.param_dtype,
  )
  return VLMParts(decoder=decoder, vision=vision, projector=projector)


# Vision towers that the original LLaVA training code names only by hub id in config.json: their
# vision configs (openai/clip-vit-large-patch14-336 is LLaVA-1.5 / NeXT / LongVA's tower).
KNOWN_TOWERS: dict[str, dict] = {
  "openai/clip-vit-large-patch14-336": dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
  ),
}

_ORIGINAL_TEXT_TYPES = {"llava_qwen": "qwen2", "llava_llama": "llama", "llava": "llama"}


def original_llava_configs(
  hf: dict, tower: dict | None, tensors_have_lm_head: bool = True, **decoder_overrides
) -> VLMParts:
  """Configs of a checkpoint written by the original LLaVA / LLaVA-NeXT training code.

  LongVA's own release (`LlavaQwenForCausalLM`) is one: a Qwen2 config with `mm_*` fields on top
  and the vision tower named by `mm_vision_tower`.

  Args:
    hf: its config.json.
    tower: the tower's vision config (a CLIPVisionConfig dict); None looks `mm_vision_tower` up in
      `KNOWN_TOWERS`.
    tensors_have_lm_head, decoder_overrides: as for `decoder_config`.
  """
  name = hf.get("mm_vision_tower")
  if tower is None:
    if name not in KNOWN_TOWERS:
      raise ValueError(
        f"mm_vision_tower={name!r} is neither a local directory with a config.json nor one of "
        f"{sorted(KNOWN_TOWERS)}; point mm_vision_tower at a local copy of the tower's config"
      )
    tower = KNOWN_TOWERS[name]
  if not tower.get("model_type", "").startswith("clip"):
    raise ValueError(
      f"tower {name!r} is not CLIP; the original code's SigLIP tower drops its last block at load "
      "time, so import the Hugging Face LlavaOnevision release of such models instead"
    )
  feature = hf.get("mm_vision_select_feature", "patch")
  if feature not in ("patch", "cls_patch"):
    raise ValueError(f"mm_vision_select_feature={feature!r}; lcv supports patch and cls_patch")
  projector = hf.get("mm_projector_type", "linear")
  if projector != "mlp2x_gelu":
    raise ValueError(f"mm_projector_type={projector!r}; lcv implements mlp2x_gelu")
  if hf.get("model_type") not in _ORIGINAL_TEXT_TYPES:
    raise ValueError(f"model_type={hf.get('model_type')!r}; known: {sorted(_ORIGINAL_TEXT_TYPES)}")
  text = {**hf, "model_type": _ORIGINAL_TEXT_TYPES[hf["model_type"]]}
  llava = {
    "vision_config": tower,
    "text_config": text,
    "vision_feature_layer": hf.get("mm_vision_select_layer", -2),
    "vision_feature_select_strategy": "default" if feature == "patch" else "full",
  }
  return vlm_configs(llava, tensors_have_lm_head, **decoder_overrides)
