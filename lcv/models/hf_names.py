"""Hugging Face parameter names -> lcv parameter paths, with the layout change of each tensor.

Three tables, one per component, relative to the component's own prefix (`split_components`
strips "model.", "language_model.", "vision_tower.vision_model." and friends):

- `DECODER`: Llama / Qwen2 (`LlamaForCausalLM`, `Qwen2ForCausalLM`, and the language model of the
  LLaVA classes) onto `lcv.models.decoder.Decoder`.
- `VISION`: CLIP / SigLIP vision transformers onto `lcv.models.vision.VisionEncoder`.
- `PROJECTOR`: LLaVA's `multi_modal_projector` (linear_1, GELU, linear_2) onto
  `lcv.models.projector.Projector`.

A row is (lcv path, HF name, layout). Per-layer rows have "{i}" in the HF name and a path under
the layer stack ("layers" / "blocks"): with stacked layers the L tensors are stacked on a leading
axis, with unstacked layers (`DecoderConfig.scan_layers=False`) each lands at "layers/{i}/...".
Layouts map torch's [out, in] weights to lcv's [in, ..., out] kernels; each knows the torch shape
it expects for a given lcv shape, so a config that disagrees with the checkpoint is reported by
tensor name and both shapes before anything is reshaped.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

Layout = tuple[
  Callable[[tuple[int, ...]], tuple[int, ...]], Callable[[np.ndarray, tuple], np.ndarray]
]

# name: (torch shape expected for an lcv shape, torch array -> lcv array of that lcv shape).
LAYOUTS: dict[str, Layout] = {
  "copy": (lambda s: s, lambda a, s: a),
  # nn.Linear weight [out, in] -> kernel [in, out].
  "linear": (lambda s: (s[1], s[0]), lambda a, s: a.T),
  # q/k/v weight [N * H, D] -> [D, N, H].
  "heads_in": (lambda s: (s[1] * s[2], s[0]), lambda a, s: a.T.reshape(s)),
  # o weight [D, N * H] -> [N, H, D].
  "heads_out": (lambda s: (s[2], s[0] * s[1]), lambda a, s: a.T.reshape(s)),
  # q/k/v bias [N * H] -> [N, H].
  "heads_bias": (lambda s: (s[0] * s[1],), lambda a, s: a.reshape(s)),
  # Conv2d weight [D, C, p, p] -> patch kernel [p, p, C, D].
  "conv": (lambda s: (s[3], s[2], s[0], s[1]), lambda a, s: a.transpose(2, 3, 1, 0)),
}

# Decoder rows (`lcv.models.decoder` module docstring lists the lcv tree).
DECODER: tuple[tuple[str, str, str], ...] = (
  ("embed/embedding", "embed_tokens.weight", "copy"),
  ("layers/input_norm/scale", "layers.{i}.input_layernorm.weight", "copy"),
  ("layers/attn/q_proj", "layers.{i}.self_attn.q_proj.weight", "heads_in"),
  ("layers/attn/k_proj", "layers.{i}.self_attn.k_proj.weight", "heads_in"),
  ("layers/attn/v_proj", "layers.{i}.self_attn.v_proj.weight", "heads_in"),
  ("layers/attn/q_bias", "layers.{i}.self_attn.q_proj.bias", "heads_bias"),
  ("layers/attn/k_bias", "layers.{i}.self_attn.k_proj.bias", "heads_bias"),
  ("layers/attn/v_bias", "layers.{i}.self_attn.v_proj.bias", "heads_bias"),
  ("layers/attn/o_proj", "layers.{i}.self_attn.o_proj.weight", "heads_out"),
  ("layers/post_attn_norm/scale", "layers.{i}.post_attention_layernorm.weight", "copy"),
  ("layers/mlp/gate_proj", "layers.{i}.mlp.gate_proj.weight", "linear"),
  ("layers/mlp/up_proj", "layers.{i}.mlp.up_proj.weight", "linear"),
  ("layers/mlp/down_proj", "layers.{i}.mlp.down_proj.weight", "linear"),
  ("final_norm/scale", "norm.weight", "copy"),
  ("lm_head", "lm_head.weight", "linear"),
)

VISION: tuple[tuple[str, str, str], ...] = (
  ("patch_kernel", "embeddings.patch_embedding.weight", "conv"),
  ("patch_bias", "embeddings.patch_embedding.bias", "copy"),
  ("class_embed", "embeddings.class_embedding", "copy"),
  ("pos_embed", "embeddings.position_embedding.weight", "copy"),
  ("pre_norm_scale", "pre_layrnorm.weight", "copy"),  # sic: CLIP's spelling
  ("pre_norm_bias", "pre_layrnorm.bias", "copy"),
  ("blocks/ln1_scale", "encoder.layers.{i}.layer_norm1.weight", "copy"),
  ("blocks/ln1_bias", "encoder.layers.{i}.layer_norm1.bias", "copy"),
  ("blocks/q_kernel", "encoder.layers.{i}.self_attn.q_proj.weight", "heads_in"),
  ("blocks/q_bias", "encoder.layers.{i}.self_attn.q_proj.bias", "heads_bias"),
  ("blocks/k_kernel", "encoder.layers.{i}.self_attn.k_proj.weight", "heads_in"),
  ("blocks/k_bias", "encoder.layers.{i}.self_attn.k_proj.bias", "heads_bias"),
  ("blocks/v_kernel", "encoder.layers.{i}.self_attn.v_proj.weight", "heads_in"),
  ("blocks/v_bias", "encoder.layers.{i}.self_attn.v_proj.bias", "heads_bias"),
  ("blocks/o_kernel", "encoder.layers.{i}.self_attn.out_proj.weight", "heads_out"),
  ("blocks/o_bias", "encoder.layers.{i}.self_attn.out_proj.bias", "copy"),
  ("blocks/ln2_scale", "encoder.layers.{i}.layer_norm2.weight", "copy"),
  ("blocks/ln2_bias", "encoder.layers.{i}.layer_norm2.bias", "copy"),
  ("blocks/fc1_kernel", "encoder.layers.{i}.mlp.fc1.weight", "linear"),
  ("blocks/fc1_bias", "encoder.layers.{i}.mlp.fc1.bias", "copy"),
  ("blocks/fc2_kernel", "encoder.layers.{i}.mlp.fc2.weight", "linear"),
  ("blocks/fc2_bias", "encoder.layers.{i}.mlp.fc2.bias", "copy"),
  ("post_norm_scale", "post_layernorm.weight", "copy"),
  ("post_norm_bias", "post_layernorm.bias", "copy"),
)

PROJECTOR: tuple[tuple[str, str, str], ...] = (
  ("fc1_kernel", "linear_1.weight", "linear"),
  ("fc1_bias", "linear_1.bias", "copy"),
  ("fc2_kernel", "linear_2.weight", "linear"),
  ("fc2_bias", "linear_2.bias", "copy"),
)

# Checkpoint tensors with no lcv counterpart, dropped knowingly: rotary caches, SigLIP's
# attention-pooling head (we return patch features) and LLaVA-NeXT / OneVision's anyres row
# separator (lcv lays frames out flat, LongVA style). A tied LM head and a post-norm that the
# features skip (CLIP, LLaVA) are dropped by `lcv.models.checkpoints` where the config says so.
IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids)$|^vision:head\.|^image_newline$")

# (regex on the checkpoint name, replacement), first match wins. Covers the names transformers 4
# and 5 write for the LLaVA classes ("language_model.model.*", "model.language_model.*",
# "language_model.lm_head.*", "vision_tower.vision_model.*", "model.vision_tower.*"), the original
# LLaVA code's ("model.mm_projector.*", ...) and the plain LM / vision classes ("model.*",
# "lm_head.*", "vision_model.*").
_PREFIXES = (
  (r"^(model\.)?language_model\.(model\.)?", "text:"),
  # The original LLaVA / LLaVA-NeXT training code (LongVA's own release): the CLIPVisionModel sits
  # inside a CLIPVisionTower wrapper and the projector is nn.Sequential(Linear, GELU, Linear).
  (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision:"),
  (r"^model\.mm_projector\.0\.", "projector:linear_1."),
  (r"^model\.mm_projector\.2\.", "projector:linear_2."),
  (r"^(model\.)?vision_tower\.(vision_model\.)?", "vision:"),
  (r"^(model\.)?multi_modal_projector\.", "projector:"),
  (r"^model\.image_newline$", "image_newline"),
  (r"^vision_model\.", "vision:"),
  (r"^model\.", "text:"),
  (r"^lm_head\.", "text:lm_head."),
)


def split_components(names, default: str | None = None) -> dict[str, str]:
  """Map each checkpoint tensor name to "component:relative name".

  E.g. "language_model.model.layers.0.mlp.up_proj.weight" -> "text:layers.0.mlp.up_proj.weight",
  "vision_tower.vision_model.embeddings.class_embedding" -> "vision:embeddings.class_embedding",
  "lm_head.weight" -> "text:lm_head.weight". Names without a known prefix go to `default`
  (transformers 5 saves a CLIPVisionModel as bare "embeddings.*", "encoder.*"), or keep their
  name when it is None.
  """
  out = {}
  for name in names:
    for pattern, replacement in _PREFIXES:
      if re.match(pattern, name):
        out[name] = re.sub(pattern, replacement, name, count=1)
        break
    else:
      out[name] = name if default is None else f"{default}:{name}"
  return out
