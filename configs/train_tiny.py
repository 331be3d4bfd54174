"""Tiny VLM on synthetic videos: trains on CPU in about a minute with the loss clearly falling.

    python scripts/train.py --config configs/train_tiny.py --workdir runs/tiny
    python scripts/train.py --config configs/train_tiny.py:context=2 --workdir runs/tiny_cp

arg: comma-separated overrides of the knobs below, e.g. "steps=300,positions=1d,context=2".
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

KNOBS = dict(steps=60, seq_len=512, batch=8, positions="v2pe", context=1, frame_bidirectional=True)


def parse(arg: str) -> dict:
  knobs = dict(KNOBS)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in knobs:
      raise ValueError(f"unknown knob {key!r} in {arg!r}; known: {sorted(knobs)}")
    kind = type(knobs[key])
    knobs[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return knobs


def get_config(arg: str = "") -> RunConfig:
  k = parse(arg)
  # 7 px patches: 16 tokens per 28 px frame, enough to read a colour, a shape or a digit.
  vision = VisionConfig.variant("tiny", patch=7, class_token=False)
  rope = RopeConfig(theta=1e4, positions=k["positions"], v2pe_random=k["positions"] == "v2pe")
  model = VLMConfig(
    decoder=DecoderConfig.variant("tiny", rope=rope, remat="none"),
    vision=vision,
    projector=ProjectorConfig(in_dim=vision.width, out_dim=64),
    frame_bidirectional=k["frame_bidirectional"],
  )
  data = DataConfig(
    seq_len=k["seq_len"],
    batch_size=k["batch"],
    image_size=vision.image_size,
    synthetic_frames=(2, 4),
    max_frames=4,
    frames_per_row=32,
  )
  train = TrainConfig(
    steps=k["steps"],
    log_every=5,
    checkpoint_every=50,
    data=data,
    optimizer=OptimizerConfig(lr=3e-3, warmup_steps=10, weight_decay=0.01),
  )
  return RunConfig(model=model, mesh=MeshConfig(data=1, fsdp=-1, context=k["context"]), train=train)
