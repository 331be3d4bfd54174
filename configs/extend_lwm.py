"""LWM's staged context extension (arXiv 2402.08268): 32K -> 128K -> 256K -> 512K -> 1M tokens.

    python scripts/extend_context.py --config configs/extend_lwm.py --workdir runs/lwm
    python scripts/extend_context.py --config configs/extend_lwm.py:preset=tiny \
        --workdir runs/ext_tiny

RoPE theta per stage is LWM's released one (1e6, 1e7, 1e7, 2.5e7, 5e7; the README table and
scripts, notes: ring anchors section 2.9). The paper's "about 4M tokens per batch" is taken as
recalled there (unverified); steps and learning rates are ours. The base model is
configs/lwm_7b.py (a Llama-2-7B decoder under a CLIP L/14 tower pooled to 144 tokens per frame),
with the tower frozen. LWM itself uses
1-D positions and a token-causal mask; `positions=v2pe` / `frame_bidirectional=true` switch to
ours. Context sizes assume a pod: each stage keeps 32K tokens per device.

preset=tiny: three CPU-sized stages, 256 -> 512 -> 1024 tokens over context 1 / 2 / 4 of 8
devices, with theta growing x4 per stage, for tests and smoke runs.

arg: comma-separated knobs, e.g. "preset=tiny,steps=3,positions=1d".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from lcv.config import (
  DataConfig,
  DecoderConfig,
  MeshConfig,
  OptimizerConfig,
  ProjectorConfig,
  RopeConfig,
  RunConfig,
  TextNIAHConfig,
  TrainConfig,
  VisionConfig,
  VLMConfig,
  VNIAHConfig,
)
from lcv.train.stages import V2PE_DELTAS, Extension, Stage

_spec = importlib.util.spec_from_file_location(
  "lcv_configs_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

KNOBS = dict(
  preset="7b", steps=0, positions="1d", frame_bidirectional=False, eval_points=4, depth_step=0.25
)

# (name, seq_len, theta, context) of LWM-Text's progression.
LWM_STAGES = (
  ("32k", 32_768, 1e6, 1),
  ("128k", 131_072, 1e7, 4),
  ("256k", 262_144, 1e7, 8),
  ("512k", 524_288, 2.5e7, 16),
  ("1m", 1_048_576, 5e7, 32),
)


def parse(arg: str) -> dict:
  knobs = common.parse_knobs(arg, KNOBS)
  if knobs["preset"] not in ("7b", "tiny"):
    raise ValueError(f"preset={knobs['preset']!r} must be '7b' or 'tiny'")
  return knobs


def _rope(k, theta):
  return RopeConfig(theta=theta, positions=k["positions"], v2pe_random=k["positions"] == "v2pe")


def tiny(k) -> Extension:
  # No class token: the tower's 2 x 2 patch sequence then splits over the context axis.
  vision = VisionConfig.variant("tiny", class_token=False, feature_layer=-1)
  model = VLMConfig(
    decoder=DecoderConfig.variant("tiny", rope=_rope(k, 1e4), remat="none"),
    vision=vision,
    projector=ProjectorConfig(in_dim=vision.width, out_dim=64),
    frame_bidirectional=k["frame_bidirectional"],
  )
  data = DataConfig(
    image_size=vision.image_size, synthetic_frames=(2, 4), max_frames=4, frames_per_row=64,
    prefetch=1,
  )  # fmt: skip
  train = TrainConfig(
    log_every=1, checkpoint_every=0, async_checkpoint=False, keep_checkpoints=2, data=data,
    optimizer=OptimizerConfig(weight_decay=0.01),
  )  # fmt: skip
  steps = k["steps"] or 20
  deltas = V2PE_DELTAS if k["positions"] == "v2pe" else None
  stages = tuple(
    Stage(name, seq, theta, steps, lr, 2048, ctx, v2pe_deltas=deltas, warmup_steps=min(2, steps))
    for name, seq, theta, ctx, lr in (
      ("256", 256, 1e4, 1, 3e-3),
      ("512", 512, 4e4, 2, 1e-3),
      ("1k", 1024, 1.6e5, 4, 1e-3),
    )
  )
  return Extension(
    base=RunConfig(model=model, mesh=MeshConfig(data=1, fsdp=-1), train=train),
    stages=stages,
    text_niah=TextNIAHConfig(
      min_tokens=256,
      depth_step=k["depth_step"],
      num_samples=1,
      prompt_template="plain",
      pad_multiple=64,
    ),  # fmt: skip
    vniah=VNIAHConfig(
      min_frames=8,
      depth_step=k["depth_step"],
      prompt_template="plain",
      pad_multiple=64,
      encode_batch=16,
    ),  # fmt: skip
    eval_points=k["eval_points"],
  )


def lwm_7b(k) -> Extension:
  # The LWM-7B-shaped VLM of configs/lwm_7b.py; stages set length, theta and context.
  base = common.load_sibling("lwm_7b").get_config(
    f"positions={k['positions']},frame_bidirectional={k['frame_bidirectional']}"
  )
  opt = dataclasses.replace(base.train.optimizer, weight_decay=0.0, groups=((r"^vision/", 0.0),))
  train = dataclasses.replace(base.train, log_every=10, checkpoint_every=100, optimizer=opt)
  base = dataclasses.replace(base, train=train)
  steps = k["steps"]
  deltas = V2PE_DELTAS if k["positions"] == "v2pe" else None
  tokens = 4 * 2**20
  stages = tuple(
    Stage(
      name,
      seq,
      theta,
      steps or 500,
      2e-5,
      max(tokens // seq, 1) * seq,
      ctx,
      v2pe_deltas=deltas,
      warmup_steps=25,
    )  # fmt: skip
    for name, seq, theta, ctx in LWM_STAGES
  )
  return Extension(
    base=base,
    stages=stages,
    text_niah=TextNIAHConfig(depth_step=0.1, num_samples=5, pad_multiple=4096),
    vniah=VNIAHConfig(depth_step=0.2, pad_multiple=4096),
    eval_points=k["eval_points"],
  )


def get_config(arg: str = "") -> Extension:
  k = parse(arg)
  return tiny(k) if k["preset"] == "tiny" else lwm_7b(k)
