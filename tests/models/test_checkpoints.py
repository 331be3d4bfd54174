"""Checkpoint import plumbing: safetensors (single, sharded, bf16), config.json mapping, clear
errors, Orbax round trip and the two scripts. Logit parity itself is in test_parity.py."""

import importlib.util
import json
import os
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from lcv.config import VisionConfig
from lcv.models import checkpoints, hf_config, hf_names

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEXT = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  vocab_size=64,
)


def _write_safetensors(path, tensors):
  """Minimal safetensors writer (header JSON + raw little-endian data)."""
  names = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
  header, offset, blobs = {}, 0, []
  for name, a in tensors.items():
    raw = np.ascontiguousarray(a).tobytes()
    header[name] = {
      "dtype": names[a.dtype],
      "shape": list(a.shape),
      "data_offsets": [offset, offset + len(raw)],
    }
    offset += len(raw)
    blobs.append(raw)
  head = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def _script(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_safetensors_reader_bf16_and_shards(tmp_path):
  a = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
  b = (np.arange(4, dtype=np.float32) - 1.5).astype(ml_dtypes.bfloat16)
  _write_safetensors(tmp_path / "s1.safetensors", {"a": a})
  _write_safetensors(tmp_path / "s2.safetensors", {"b": b})
  index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  got = checkpoints.read_safetensors(str(tmp_path))
  np.testing.assert_array_equal(got["a"], a)
  assert got["b"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got["b"].astype(np.float32), b.astype(np.float32))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    checkpoints.read_safetensors(str(tmp_path / "nowhere"))


def test_rope_config_both_spellings():
  v4 = {
    "rope_theta": 1e6,
    "rope_scaling": {"type": "yarn", "factor": 4.0},
    "max_position_embeddings": 4096,
  }
  r = hf_config.rope_config(v4)
  assert r.theta == 1e6 and r.scaling.kind == "yarn"
  assert r.scaling.original_max_position_embeddings == 4096  # transformers' fallback
  v5 = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}
  r = hf_config.rope_config(v5)
  assert r.theta == 5e5 and r.scaling.kind == "linear" and r.scaling.factor == 2.0
  assert hf_config.rope_config({"rope_parameters": {"rope_type": "default"}}).scaling is None
  with pytest.raises(ValueError, match="rope_type 'longrope'"):
    hf_config.rope_config({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def test_decoder_config_mapping_and_errors():
  hf = {"model_type": "qwen2", **TEXT, "rms_norm_eps": 1e-6}
  cfg = hf_config.decoder_config(hf, tensors_have_lm_head=False, dtype="float32")
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 8)
  assert cfg.qkv_bias and cfg.tie_embeddings and cfg.dtype == "float32"
  with pytest.raises(ValueError, match="o_proj"):
    hf_config.decoder_config({"model_type": "llama", **TEXT, "attention_bias": True})
  with pytest.raises(ValueError, match="lacks 'hidden_size'"):
    hf_config.decoder_config({"model_type": "llama", "num_attention_heads": 4})
  with pytest.raises(ValueError, match="llama and qwen2"):
    hf_config.decoder_config({"model_type": "mistral", **TEXT})


def test_unknown_architecture_lists_supported(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*SiglipVisionModel"):
    checkpoints.load_hf(str(tmp_path))


def _clip_dir(tmp_path, **config):
  """A tiny CLIP vision checkpoint written without torch: lcv params mapped back to HF names."""
  cfg = VisionConfig.variant("tiny")
  enc = nnx.state(checkpoints.build(cfg))
  flat = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(enc)}
  d, n, h = cfg.width, cfg.heads, cfg.head_dim
  hf = {
    "embeddings.patch_embedding.weight": flat["patch_kernel"].transpose(3, 2, 0, 1),
    "embeddings.class_embedding": flat["class_embed"],
    "embeddings.position_embedding.weight": flat["pos_embed"],
    "pre_layrnorm.weight": flat["pre_norm_scale"],
    "pre_layrnorm.bias": flat["pre_norm_bias"],
    "post_layernorm.weight": np.ones(d, np.float32),
    "post_layernorm.bias": np.zeros(d, np.float32),
  }
  for i in range(cfg.depth):
    p = f"encoder.layers.{i}."
    blk = {k[len("blocks/") :]: v[i] for k, v in flat.items() if k.startswith("blocks/")}
    for s in "qkv":
      hf[p + f"self_attn.{s}_proj.weight"] = blk[f"{s}_kernel"].reshape(d, n * h).T
      hf[p + f"self_attn.{s}_proj.bias"] = blk[f"{s}_bias"].reshape(n * h)
    hf[p + "self_attn.out_proj.weight"] = blk["o_kernel"].reshape(n * h, d).T
    hf[p + "self_attn.out_proj.bias"] = blk["o_bias"]
    for j in (1, 2):
      hf[p + f"layer_norm{j}.weight"] = blk[f"ln{j}_scale"]
      hf[p + f"layer_norm{j}.bias"] = blk[f"ln{j}_bias"]
      hf[p + f"mlp.fc{j}.weight"] = blk[f"fc{j}_kernel"].T
      hf[p + f"mlp.fc{j}.bias"] = blk[f"fc{j}_bias"]
  hf = {"vision_model." + k: np.ascontiguousarray(v, np.float32) for k, v in hf.items()}
  _write_safetensors(tmp_path / "model.safetensors", hf)
  hf_config = {
    "architectures": ["CLIPVisionModel"],
    "model_type": "clip_vision_model",
    "hidden_size": d,
    "intermediate_size": cfg.mlp,
    "num_hidden_layers": cfg.depth,
    "num_attention_heads": n,
    "image_size": cfg.image_size,
    "patch_size": cfg.patch,
    "hidden_act": "quick_gelu",
    **config,
  }
  (tmp_path / "config.json").write_text(json.dumps(hf_config))
  return enc, hf


def test_import_round_trips_parameters(tmp_path):
  want, _ = _clip_dir(tmp_path)
  cfg, enc = checkpoints.load_hf(str(tmp_path))
  assert cfg == VisionConfig.variant("tiny", drop_remainder=False)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(nnx.state(enc))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
  _clip_dir(tmp_path, intermediate_size=48)
  with pytest.raises(
    ValueError, match=r"'encoder.layers.0.mlp.fc1.weight' has shape \(64, 32\).*\(48, 32\)"
  ):
    checkpoints.load_hf(str(tmp_path))


def test_missing_and_unexpected_tensors(tmp_path):
  _, hf = _clip_dir(tmp_path)
  extra = {**hf, "vision_model.encoder.layers.0.extra.weight": np.zeros(3, np.float32)}
  _write_safetensors(tmp_path / "model.safetensors", extra)
  with pytest.raises(ValueError, match="no lcv parameter.*extra.weight"):
    checkpoints.load_hf(str(tmp_path))
  del hf["vision_model.encoder.layers.1.mlp.fc2.bias"]
  _write_safetensors(tmp_path / "model.safetensors", hf)
  with pytest.raises(ValueError, match="no tensor 'encoder.layers.1.mlp.fc2.bias'"):
    checkpoints.load_hf(str(tmp_path))


def test_convert_script_and_load_converted(tmp_path):
  hf_dir, out = tmp_path / "hf", tmp_path / "out"
  hf_dir.mkdir()
  _clip_dir(hf_dir)
  (hf_dir / "tokenizer.json").write_text("{}")
  assert _script("convert_checkpoint").main(["--hf-dir", str(hf_dir), "--out", str(out)]) == 0
  assert os.path.exists(out / "tokenizer.json")
  cfg, enc = checkpoints.load_converted(str(out))
  want_cfg, want = checkpoints.load_hf(str(hf_dir))
  assert cfg == want_cfg
  for a, b in zip(jax.tree.leaves(nnx.state(want)), jax.tree.leaves(nnx.state(enc))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_check_parity_script(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.LlavaOnevisionConfig(
    vision_config=transformers.CLIPVisionConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=28,
      patch_size=14,
    ),
    text_config=transformers.Qwen2Config(**TEXT),
    vision_feature_select_strategy="default",
    vision_feature_layer=-2,
    image_token_index=63,
    video_token_index=62,
  )
  transformers.LlavaOnevisionForConditionalGeneration(cfg).save_pretrained(tmp_path)
  rc = _script("check_parity").main(["--hf-dir", str(tmp_path), "--seq-len", "6"])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert rc == 0 and float(last) < 1e-4
  # The LLaVA layout also converts and reloads as its three parts.
  out = tmp_path / "converted"
  assert _script("convert_checkpoint").main(["--hf-dir", str(tmp_path), "--out", str(out)]) == 0
  cfg, parts = checkpoints.load_converted(str(out))
  want_cfg, want = checkpoints.load_hf(str(tmp_path))
  assert cfg == want_cfg and sorted(parts) == ["decoder", "projector", "vision"]
  for a, b in zip(jax.tree.leaves(nnx.state(want)), jax.tree.leaves(nnx.state(parts))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_component_names_of_both_transformers_generations():
  names = {
    "language_model.model.layers.0.mlp.up_proj.weight": "text:layers.0.mlp.up_proj.weight",
    "model.language_model.embed_tokens.weight": "text:embed_tokens.weight",
    "language_model.lm_head.weight": "text:lm_head.weight",
    "lm_head.weight": "text:lm_head.weight",
    "vision_tower.vision_model.post_layernorm.bias": "vision:post_layernorm.bias",
    "model.vision_tower.embeddings.class_embedding": "vision:embeddings.class_embedding",
    "model.multi_modal_projector.linear_2.weight": "projector:linear_2.weight",
    "model.image_newline": "image_newline",
  }
  assert hf_names.split_components(names) == names
  assert hf_names.split_components(["embeddings.patch_embedding.weight"], "vision") == {
    "embeddings.patch_embedding.weight": "vision:embeddings.patch_embedding.weight"
  }


def test_original_llava_code_layout(tmp_path):
  """LongVA's own release format (original LLaVA-NeXT code): same weights under model.mm_projector.*
  and model.vision_tower.vision_tower.vision_model.* load to exactly the HF-layout parameters."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  torch.manual_seed(0)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
  cfg = transformers.LlavaConfig(
    vision_config=transformers.CLIPVisionConfig(**vision, image_size=28, patch_size=14),
    text_config=transformers.Qwen2Config(**TEXT),
  )
  hf_dir, orig_dir, tower_dir = (tmp_path / n for n in ("hf", "orig", "tower"))
  transformers.LlavaForConditionalGeneration(cfg).save_pretrained(hf_dir)
  hf_config = json.loads((hf_dir / "config.json").read_text())
  original_names = {
    "text:lm_head.": "lm_head.",
    "text:": "model.",
    "vision:": "model.vision_tower.vision_tower.vision_model.",
    "projector:linear_1.": "model.mm_projector.0.",
    "projector:linear_2.": "model.mm_projector.2.",
  }
  tensors = checkpoints.read_safetensors(str(hf_dir))
  renamed = {}
  for name, component_name in hf_names.split_components(tensors).items():
    prefix = next(p for p in original_names if component_name.startswith(p))
    renamed[original_names[prefix] + component_name[len(prefix) :]] = np.asarray(tensors[name])
  orig_dir.mkdir()
  safetensors_numpy.save_file(renamed, str(orig_dir / "model.safetensors"))
  tower_dir.mkdir()
  (tower_dir / "config.json").write_text(json.dumps(hf_config["vision_config"]))
  original = {
    **hf_config["text_config"],
    "architectures": ["LlavaQwenForCausalLM"],
    "model_type": "llava_qwen",
    "mm_vision_tower": str(tower_dir),
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_projector_type": "mlp2x_gelu",
  }
  (orig_dir / "config.json").write_text(json.dumps(original))
  want_cfg, want = checkpoints.vlm_from_hf(str(hf_dir), pool=2)
  got_cfg, got = checkpoints.vlm_from_hf(str(orig_dir), pool=2)
  assert got_cfg == want_cfg and got_cfg.frame_tokens == 1  # 2 x 2 patches, 2 x 2 pool
  for a, b in zip(jax.tree.leaves(nnx.state(want)), jax.tree.leaves(nnx.state(got))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="mm_projector_type='linear'"):
    (orig_dir / "config.json").write_text(json.dumps({**original, "mm_projector_type": "linear"}))
    checkpoints.load_hf(str(orig_dir))
