"""Hugging Face checkpoints -> lcv configs and parameters; lcv parameters <-> Orbax.

Researchers start from pretrained weights (LongVA: Qwen2-7B-Instruct-224K + CLIP-L/336; LWM:
Llama-2-7B), so import must be exact: `check_parity.py` and tests/models/test_parity.py hold every
supported class to 1e-4 against `transformers` in float32.

    cfg, model = load_hf(hf_dir)              # config.json + *.safetensors -> (config, nnx module)
    save_params(out_dir, nnx.state(model))    # Orbax
    state = load_params(out_dir, nnx.state(abstract_model))
    cfg, vlm = vlm_from_hf(hf_dir, pool=2)    # a LLaVA layout as one `lcv.models.vlm.VLM`
    save_converted(out_dir, cfg, model); cfg, model = load_converted(out_dir)

Supported `architectures` (`SUPPORTED`): LlamaForCausalLM and Qwen2ForCausalLM (-> `Decoder`),
CLIPVisionModel and SiglipVisionModel (-> `VisionEncoder`), LlavaForConditionalGeneration,
LlavaNextForConditionalGeneration and LlavaOnevisionForConditionalGeneration (-> vision tower,
mlp2x_gelu projector and decoder), and LlavaQwenForCausalLM / LlavaLlamaForCausalLM as the
original LLaVA-NeXT training code writes them (LongVA's own release; CLIP towers). Tensors are
read from `model.safetensors` or the shards listed in `model.safetensors.index.json`, memory-mapped
by a small reader of the safetensors format (bf16 through ml_dtypes, so no torch is needed).

Configs come from `config.json` (`lcv.models.hf_config`); names and tensor layouts from
`lcv.models.hf_names`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lcv.config import DecoderConfig, ProjectorConfig, RopeConfig, RopeScaling, VisionConfig
from lcv.models import hf_names
from lcv.models.decoder import Decoder
from lcv.models.hf_config import (
  VLMParts,
  decoder_config,
  original_llava_configs,
  vision_config,
  vlm_configs,
)
from lcv.models.projector import Projector
from lcv.models.vision import VisionEncoder

# architecture -> what it imports as.
SUPPORTED: dict[str, str] = {
  "LlamaForCausalLM": "decoder",
  "Qwen2ForCausalLM": "decoder",
  "CLIPVisionModel": "vision",
  "SiglipVisionModel": "vision",
  "LlavaForConditionalGeneration": "vlm",
  "LlavaNextForConditionalGeneration": "vlm",
  "LlavaOnevisionForConditionalGeneration": "vlm",
  # Written by the original LLaVA / LLaVA-NeXT training code (LongVA's lmms-lab release).
  "LlavaQwenForCausalLM": "vlm",
  "LlavaLlamaForCausalLM": "vlm",
}

_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


# ----------------------------------------------------------------------------- files


def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  """Memory-mapped arrays of one .safetensors file (8-byte header size, JSON header, raw data)."""
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(
        f"{path}: tensor {name!r} has dtype {info['dtype']}; "
        f"supported: {sorted(_SAFETENSORS_DTYPES)}"
      )
    begin, end = info["data_offsets"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    out[name] = data[begin:end].view(dtype).reshape(info["shape"])
  return out


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory: `model.safetensors` or a sharded index."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      tensors.update(read_safetensors_file(os.path.join(hf_dir, shard)))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise ValueError(f"{index} lists tensors absent from its shards: {missing[:5]}")
    return tensors
  if os.path.exists(single):
    return read_safetensors_file(single)
  raise FileNotFoundError(
    f"{hf_dir=} has neither model.safetensors nor model.safetensors.index.json; convert "
    ".bin checkpoints with transformers' save_pretrained(safe_serialization=True) first"
  )


def read_hf_config(hf_dir: str) -> dict:
  """The checkpoint's config.json as a dict."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{hf_dir=} has no config.json (a Hugging Face model directory)")
  with open(path) as f:
    return json.load(f)


def _tower_config(tower: str) -> dict | None:
  """The vision config of a local tower directory (CLIPVisionModel or full CLIPModel config)."""
  if not os.path.isdir(tower):
    return None
  cfg = read_hf_config(tower)
  if "vision_config" in cfg:  # a full CLIP model: its vision half
    return {"model_type": f"{cfg.get('model_type', 'clip')}_vision_model", **cfg["vision_config"]}
  return cfg


def architecture(hf: dict) -> str:
  """The one supported architecture of a config; a clear error otherwise."""
  archs = hf.get("architectures") or []
  if len(archs) != 1 or archs[0] not in SUPPORTED:
    raise ValueError(f"unsupported architectures={archs}; lcv imports one of: {sorted(SUPPORTED)}")
  return archs[0]


# ----------------------------------------------------------------------------- weights


def _flatten(tree, prefix=()) -> dict[str, object]:
  out = {}
  for k, v in tree.items():
    path = (*prefix, str(k))
    if isinstance(v, dict):
      out.update(_flatten(v, path))
    else:
      out["/".join(path)] = v
  return out


def _unflatten_into(tree, flat: dict[str, np.ndarray], prefix=()):
  return {
    k: _unflatten_into(v, flat, (*prefix, str(k)))
    if isinstance(v, dict)
    else flat["/".join((*prefix, str(k)))]
    for k, v in tree.items()
  }


def convert_component(
  tensors: dict[str, np.ndarray],
  table,
  targets: dict[str, jax.ShapeDtypeStruct],
  component: str,
  depth: int,
  stack: str,
) -> tuple[dict[str, np.ndarray], set[str]]:
  """lcv arrays for one component from its checkpoint tensors.

  Args:
    tensors: "component:name" -> array (after `hf_names.split_components`).
    table: rows of `hf_names` (lcv path, HF name with optional {i}, layout).
    targets: lcv path -> abstract array of the component's parameters (what to produce).
    component: "text", "vision" or "projector".
    depth: number of layers; stack: the layer-stack path ("layers" / "blocks").

  Returns:
    (lcv path -> array in the target dtype, the checkpoint names consumed).
  """
  out, used = {}, set()
  for path, hf_name, layout in table:
    per_layer = "{i}" in hf_name
    layer_paths = [path] if path in targets else []
    if per_layer and not layer_paths:  # unstacked layers: layers/0/attn/q_proj, ...
      rest = path[len(stack) + 1 :]
      layer_paths = [
        f"{stack}/{i}/{rest}" for i in range(depth) if f"{stack}/{i}/{rest}" in targets
      ]
    if not layer_paths:
      continue  # the config has no such parameter (no class token, no qkv bias, tied head...)
    expected_src, apply = hf_names.LAYOUTS[layout]

    def fetch(name, shape, path=path, expected_src=expected_src, apply=apply):
      key = f"{component}:{name}"
      if key not in tensors:
        raise ValueError(
          f"checkpoint has no tensor {name!r} ({component}) for lcv parameter {path!r}"
        )
      a = tensors[key]
      want = tuple(expected_src(tuple(shape)))
      if tuple(a.shape) != want:
        raise ValueError(
          f"checkpoint tensor {name!r} has shape {tuple(a.shape)} but the config implies {want} "
          f"(lcv parameter {path!r} of shape {tuple(shape)}); config.json and the weights disagree"
        )
      used.add(key)
      return apply(np.asarray(a), tuple(shape))

    for target_path in layer_paths:
      target = targets[target_path]
      if not per_layer:
        value = fetch(hf_name, target.shape)
      elif target_path == path:  # stacked: [L, ...]
        value = np.stack([fetch(hf_name.format(i=i), target.shape[1:]) for i in range(depth)])
      else:
        i = int(target_path.split("/")[1])
        value = fetch(hf_name.format(i=i), target.shape)
      out[target_path] = value.astype(target.dtype)
  missing = sorted(set(targets) - set(out))
  if missing:
    raise ValueError(f"no checkpoint tensor maps to lcv parameters {missing} ({component})")
  return out, used


def _import(tensors, ctor: Callable[[], nnx.Module], table, component, depth, stack):
  """Build `ctor()` abstractly (no random init), then load its parameters from `tensors`.

  Returns (module, the checkpoint names consumed).
  """
  graphdef, state = nnx.split(nnx.eval_shape(ctor))
  pure = nnx.to_pure_dict(state)
  flat, used = convert_component(tensors, table, _flatten(pure), component, depth, stack)
  flat = {k: jnp.asarray(v) for k, v in flat.items()}
  nnx.replace_by_pure_dict(state, _unflatten_into(pure, flat))
  return nnx.merge(graphdef, state), used


def _check_all_used(tensors, used) -> None:
  extra = sorted(k for k in tensors if k not in used and not hf_names.IGNORED.search(k))
  if extra:
    raise ValueError(
      f"checkpoint tensors with no lcv parameter: {extra[:8]}{' ...' if len(extra) > 8 else ''}; "
      "the architecture has parts lcv does not implement"
    )


def load_hf(hf_dir: str, **overrides):
  """Import a Hugging Face checkpoint directory.

  Args:
    hf_dir: local directory with config.json and safetensors weights.
    **overrides: config fields to override: DecoderConfig fields for LMs and LLaVA (e.g.
      dtype="float32", scan_layers=False; LLaVA's tower and projector follow its dtype and
      param_dtype), VisionConfig fields for vision towers.

  Returns:
    (config, module): (DecoderConfig, Decoder), (VisionConfig, VisionEncoder), or for LLaVA
    layouts (VLMParts, {"vision": VisionEncoder, "projector": Projector, "decoder": Decoder});
    `vlm_from_hf` assembles the latter into a `VLM`.
  """
  hf = read_hf_config(hf_dir)
  kind = SUPPORTED[architecture(hf)]
  raw = read_safetensors(hf_dir)
  names = hf_names.split_components(raw, {"decoder": "text", "vision": "vision"}.get(kind))
  tensors = {names[k]: v for k, v in raw.items()}
  has_head = "text:lm_head.weight" in tensors

  def decoder(cfg):
    if cfg.tie_embeddings:
      tensors.pop("text:lm_head.weight", None)  # some tied checkpoints store a copy
    ctor = lambda: Decoder(cfg, rngs=nnx.Rngs(0))
    return _import(tensors, ctor, hf_names.DECODER, "text", cfg.num_layers, "layers")

  def vision(cfg):
    model, used = _import(
      tensors,
      lambda: VisionEncoder(cfg, rngs=nnx.Rngs(0)),
      hf_names.VISION,
      "vision",
      cfg.depth,
      "blocks",
    )
    if not cfg.post_norm:  # CLIP's post-norm serves the pooled token only; LLaVA skips SigLIP's.
      used |= {k for k in tensors if k.startswith("vision:post_layernorm.")}
    return model, used

  if kind == "decoder":
    cfg = decoder_config(hf, has_head, **overrides)
    model, used = decoder(cfg)
  elif kind == "vision":
    cfg = vision_config(hf, **overrides)
    model, used = vision(cfg)
  else:
    if "mm_vision_tower" in hf:  # original LLaVA code: a text config with mm_* fields
      cfg = original_llava_configs(hf, _tower_config(hf["mm_vision_tower"]), has_head, **overrides)
    else:
      cfg = vlm_configs(hf, has_head, **overrides)
    dec, used_text = decoder(cfg.decoder)
    vis, used_vision = vision(cfg.vision)
    proj, used_proj = _import(
      tensors,
      lambda: Projector(cfg.projector, rngs=nnx.Rngs(0)),
      hf_names.PROJECTOR,
      "projector",
      0,
      "",
    )
    model, used = {"vision": vis, "projector": proj, "decoder": dec}, used_text | used_vision
    used |= used_proj
  _check_all_used(tensors, used)
  return cfg, model


def vlm_from_hf(hf_dir: str, *, pool: int = 1, frame_bidirectional: bool = False, **overrides):
  """A `lcv.models.vlm.VLM` from a LLaVA-layout checkpoint (LongVA's HF release: `pool=2`).

  Args:
    hf_dir: LLaVA / LLaVA-NeXT / LLaVA-OneVision directory.
    pool: the projector's average-pool window (not stored in the checkpoint).
    frame_bidirectional: TC-LLaVA's frame-wise block-causal mask instead of causal.
    **overrides: DecoderConfig fields, as for `load_hf`.

  Returns:
    (VLMConfig, VLM) with every parameter loaded.
  """
  from lcv.config import VLMConfig
  from lcv.models.vlm import VLM

  parts, modules = load_hf(hf_dir, **overrides)
  if not isinstance(parts, VLMParts):
    raise ValueError(f"{hf_dir=} holds a {type(parts).__name__}, not a LLaVA-layout VLM")
  cfg = VLMConfig(
    decoder=parts.decoder,
    vision=parts.vision,
    projector=dataclasses.replace(parts.projector, pool=pool),
    frame_bidirectional=frame_bidirectional,
  )
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0))))
  return cfg, nnx.merge(graphdef, nnx.state(modules))


# ----------------------------------------------------------------------------- orbax

_CONFIG_TYPES = {
  c.__name__: c for c in (DecoderConfig, VisionConfig, ProjectorConfig, RopeConfig, RopeScaling)
}


def config_to_dict(cfg) -> dict:
  """JSON-ready dict of a (nested) lcv config, tagged with its class names."""
  if isinstance(cfg, VLMParts):
    return {"__class__": "VLMParts", **{k: config_to_dict(getattr(cfg, k)) for k in _PARTS}}
  out = {"__class__": type(cfg).__name__}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    out[f.name] = config_to_dict(v) if dataclasses.is_dataclass(v) else v
  return out


def config_from_dict(d: dict):
  """Inverse of `config_to_dict` (JSON lists come back as tuples)."""
  d = dict(d)
  name = d.pop("__class__")
  fields = {
    k: config_from_dict(v)
    if isinstance(v, dict) and "__class__" in v
    else tuple(v)
    if isinstance(v, list)
    else v
    for k, v in d.items()
  }
  if name == "VLMParts":
    return VLMParts(**fields)
  if name not in _CONFIG_TYPES:
    raise ValueError(f"unknown config class {name!r}; known: {sorted(_CONFIG_TYPES)} and VLMParts")
  return _CONFIG_TYPES[name](**fields)


_PARTS = ("vision", "projector", "decoder")


def build(cfg, abstract: bool = False):
  """The lcv module(s) of an imported config (random init, or shapes only when `abstract`)."""

  def make():
    rngs = nnx.Rngs(0)
    if isinstance(cfg, VLMParts):
      return {
        "vision": VisionEncoder(cfg.vision, rngs=rngs),
        "projector": Projector(cfg.projector, rngs=rngs),
        "decoder": Decoder(cfg.decoder, rngs=rngs),
      }
    if isinstance(cfg, DecoderConfig):
      return Decoder(cfg, rngs=rngs)
    if isinstance(cfg, VisionConfig):
      return VisionEncoder(cfg, rngs=rngs)
    raise ValueError(f"cannot build a model from {type(cfg).__name__}")

  return nnx.eval_shape(make) if abstract else make()


def save_params(path: str, state: nnx.State) -> None:
  """Write parameters (an `nnx.State`, e.g. `nnx.state(model, nnx.Param)`) with Orbax."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, nnx.to_pure_dict(state))


def load_params(path: str, target: nnx.State) -> nnx.State:
  """Read parameters saved by `save_params` into the structure (and shardings) of `target`.

  `target` may be abstract (`nnx.state(nnx.eval_shape(...))`); restored arrays take its dtypes
  and, when its leaves carry shardings, its shardings.
  """
  import orbax.checkpoint as ocp

  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
    nnx.to_pure_dict(target),
  )
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.abspath(path), abstract)
  nnx.replace_by_pure_dict(target, restored)
  return target


def save_converted(out_dir: str, cfg, model) -> None:
  """`out_dir/lcv_config.json` + `out_dir/params` (Orbax) of an imported model."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "lcv_config.json"), "w") as f:
    json.dump(config_to_dict(cfg), f, indent=2)
  save_params(os.path.join(out_dir, "params"), nnx.state(model, nnx.Param))


def load_converted(out_dir: str):
  """(config, model) from a directory written by `save_converted` / convert_checkpoint.py."""
  with open(os.path.join(out_dir, "lcv_config.json")) as f:
    cfg = config_from_dict(json.load(f))
  model = build(cfg, abstract=True)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = load_params(os.path.join(out_dir, "params"), params)
  return cfg, nnx.merge(graphdef, params, rest)
