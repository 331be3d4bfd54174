"""Tiny VLM (2-layer decoder, 2-block ViT on 28 px frames): seconds on CPU, for tests and smoke.

    python scripts/train.py --config configs/tiny.py --workdir runs/tiny
    python scripts/train.py --config configs/tiny.py:positions=v2pe,context=2 --workdir runs/tiny

arg: comma-separated knobs, e.g. "steps=50,positions=tad,frame_bidirectional=false".
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
  steps=20, seq_len=256, batch=4, positions="1d", frame_bidirectional=True, scan=True, context=1
)


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
  positions = k["positions"]
  rope = RopeConfig(
    theta=1e4,
    positions=positions,
    v2pe_random=positions == "v2pe",
    mrope_sections=(2, 3, 3) if positions == "mrope" else None,
  )
  decoder = DecoderConfig.variant(
    "tiny",
    rope=rope,
    scan_layers=k["scan"],
    remat="none",
    # A sequence sharded over devices needs sequence-parallel attention (ring, lcv.parallel).
    attention_impl="ring" if k["context"] > 1 else "auto",
  )
  vision = VisionConfig.variant("tiny")  # 28 px, 14 px patches: 4 tokens per frame
  model = VLMConfig(
    decoder=decoder,
    vision=vision,
    projector=ProjectorConfig(in_dim=vision.width, out_dim=decoder.embed_dim),
    frame_bidirectional=k["frame_bidirectional"],
  )
  data = DataConfig(
    seq_len=k["seq_len"], batch_size=k["batch"], image_size=vision.image_size, max_frames=4
  )
  train = TrainConfig(
    steps=k["steps"],
    log_every=5,
    checkpoint_every=max(k["steps"], 1),
    data=data,
    optimizer=OptimizerConfig(lr=3e-3, warmup_steps=5, weight_decay=0.01),
  )
  return RunConfig(model=model, mesh=MeshConfig(fsdp=-1, context=k["context"]), train=train)
