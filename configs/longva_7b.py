"""LongVA-7B (arXiv 2406.16852): Qwen2-7B-Instruct-224K + CLIP ViT-L/14-336 + mlp2x_gelu + 2x2 pool.

The LLM is Qwen2-7B with RoPE theta raised to 1e9 and trained on 224K-token text (LongVA's
"long context transfer"); each frame or 336 px crop is 576 CLIP patches from the second-to-last
layer, projected and average-pooled to 12 x 12 = 144 tokens, concatenated without separators
(UniRes). Positions are plain 1-D and the mask token-causal, as LongVA runs it; V2PE / TAD /
frame-bidirectional are knobs. Weights: scripts/convert_checkpoint.py from the HF release.

    python scripts/train.py --config configs/longva_7b.py --workdir runs/longva
    python scripts/eval_vniah.py --config configs/longva_7b.py:context=8 --checkpoint runs/longva

arg: comma-separated knobs, e.g. "seq_len=229376,context=8,positions=v2pe".
"""

from __future__ import annotations

from lcv.config import (
  DataConfig,
  DecoderConfig,
  MeshConfig,
  OptimizerConfig,
  ProjectorConfig,
  RopeConfig,
  RunConfig,
  TrainConfig,
  VisionConfig,
  VLMConfig,
)

# LongVA's multimodal fine-tune runs at model_max_length 32768 (longva/scripts/finetune.sh).
KNOBS = dict(
  steps=1000,
  seq_len=32_768,
  batch=1,
  positions="1d",
  frame_bidirectional=False,
  remat="full",
  context=1,
)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def parse(arg: str | None) -> dict:
  """KNOBS updated from "key=value,..." (values take the type of the default)."""
  knobs = dict(KNOBS)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in knobs:
      raise ValueError(f"unknown knob {key!r} in {arg!r}; known: {sorted(knobs)}")
    kind = type(knobs[key])
    knobs[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return knobs


def get_config(arg: str | None = None) -> RunConfig:
  k = parse(arg)
  rope = RopeConfig(theta=1e9, positions=k["positions"], v2pe_random=k["positions"] == "v2pe")
  decoder = DecoderConfig.variant(
    "qwen2-7b",
    rope=rope,
    remat=k["remat"],
    attention_impl="ring" if k["context"] > 1 else "auto",
  )
  vision = VisionConfig.variant("clip_l14_336", dtype="bfloat16")
  projector = ProjectorConfig(
    in_dim=vision.width, out_dim=decoder.embed_dim, pool=2, dtype="bfloat16"
  )
  model = VLMConfig(
    decoder=decoder,
    vision=vision,
    projector=projector,
    frame_bidirectional=k["frame_bidirectional"],
  )
  data = DataConfig(
    seq_len=k["seq_len"],
    batch_size=k["batch"],
    image_size=vision.image_size,
    max_frames=128,
    pixel_mean=CLIP_MEAN,
    pixel_std=CLIP_STD,
  )
  # LongVA finetune.sh: lr 1e-5, vision tower 2e-6 (multiplier 0.2).
  optimizer = OptimizerConfig(lr=1e-5, warmup_steps=30, groups=((r"^vision/", 0.2),))
  train = TrainConfig(steps=k["steps"], data=data, optimizer=optimizer)
  return RunConfig(model=model, mesh=MeshConfig(fsdp=-1, context=k["context"]), train=train)
