"""Qwen2-1.5B LLM + CLIP ViT-L/14-336 + mlp2x_gelu + 2x2 pooling (144 tokens per frame).

A real-size VLM in LongVA's recipe at 1.5B scale: the MFU and long-context benchmarks run it at
32K tokens on one GPU, and it scales out with the context knob (ring attention over the sequence).

    python scripts/train.py --config configs/qwen2_1_5b.py --workdir runs/qwen2_1_5b
    python scripts/train.py --config configs/qwen2_1_5b.py:seq_len=131072,context=4 --workdir runs/q

arg: comma-separated knobs, e.g. "seq_len=65536,positions=v2pe,remat=dots_saveable".
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

KNOBS = dict(
  steps=1000,
  seq_len=32_768,
  batch=1,
  positions="1d",
  theta=1e6,
  frame_bidirectional=False,
  remat="full",
  attention="auto",
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
  # A sequence sharded over devices needs sequence-parallel attention (ring, lcv.parallel).
  attention = "ring" if k["context"] > 1 and k["attention"] == "auto" else k["attention"]
  rope = RopeConfig(
    theta=k["theta"], positions=k["positions"], v2pe_random=k["positions"] == "v2pe"
  )
  decoder = DecoderConfig.variant(
    "qwen2-1.5b", rope=rope, remat=k["remat"], attention_impl=attention
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
    max_frames=64,
    pixel_mean=CLIP_MEAN,
    pixel_std=CLIP_STD,
  )
  # LLaVA-1.6 / LongVA fine-tuning rates: 1e-5 for the LLM and projector, 2e-6 for the tower.
  optimizer = OptimizerConfig(lr=1e-5, warmup_steps=30, groups=((r"^vision/", 0.2),))
  train = TrainConfig(steps=k["steps"], data=data, optimizer=optimizer)
  return RunConfig(model=model, mesh=MeshConfig(fsdp=-1, context=k["context"]), train=train)
