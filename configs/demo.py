"""The flagship demo: long-context transfer at small scale (scripts/demo.py).

A small VLM is trained from scratch on short synthetic videos (<= `seq_len` tokens): haystack
frames of dark colour noise with a dim grey square, one needle frame inserted at a random place (a
large coloured digit on a white card), and the question "what digit is on the white card?".
Positions are V2PE with a random stride per video, the mask frame-block-causal, and attention is
ring attention over the `context` axis of 8 emulated CPU devices (the gpu preset: one GPU, no
ring). V-NIAH (`lcv.eval.vniah`) then asks the same question with the needle at several depths of
haystacks `eval_scales` times longer than any training video, on haystack frames never seen in
training. Attention logits are LogN-scaled for queries that see more than `logn` keys, in
training and evaluation (`lcv.attention.logn_scale`): without it the needle's weight is diluted
by the 64x longer haystack (docs/results.md has the ablation).

    python scripts/demo.py                                  # CPU, 8 emulated devices
    python scripts/demo.py --config configs/demo.py:preset=gpu   # one H100 / H200
    python scripts/demo.py --config configs/demo.py:positions=1d,frame_bidirectional=false
    python scripts/demo.py --config configs/demo.py:logn=0       # the ablation without it

arg: comma-separated knobs, e.g. "preset=gpu", "steps=200,positions=tad".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from lcv.config import (
  DecoderConfig,
  MeshConfig,
  OptimizerConfig,
  ProjectorConfig,
  RopeConfig,
  VisionConfig,
  VLMConfig,
)

_spec = importlib.util.spec_from_file_location(
  "lcv_configs_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

KNOBS = dict(
  preset="cpu",
  steps=0,
  positions="v2pe",
  frame_bidirectional=True,
  logn=64,
  context=0,
  batch=0,
  seed=0,
)


@dataclasses.dataclass(frozen=True)
class Demo:
  """The demo run.

  model, mesh, optimizer: as everywhere (`lcv.config`).
  steps, batch, seq_len: training steps, rows per step, tokens per row (S).
  min_frames: fewest haystack frames of a training video (the most fill `seq_len`).
  curriculum: (start, end) fractions of training: before `start` videos hold the needle and
    min_frames haystack frames (learn to read the needle), then the longest video grows until it
    fills seq_len at `end` (learn to find it).
  eval_scales: V-NIAH lengths as multiples of seq_len; depths: needle depths (0..1).
  eval_delta: the fixed V2PE stride at evaluation (V2PE models only); 1/64 keeps a 64x longer
    video inside the position range seen in training.
  image_size: frame side in pixels (the tower's); digits: needle digits used in training (V-NIAH
    uses `eval_digits`).
  """

  model: VLMConfig
  mesh: MeshConfig
  optimizer: OptimizerConfig
  steps: int = 260
  batch: int = 16
  seq_len: int = 256
  min_frames: int = 0
  curriculum: tuple[float, float] = (0.3, 0.7)
  eval_scales: tuple[int, ...] = (1, 4, 16, 64)
  depths: tuple[float, ...] = (0.0, 0.5, 1.0)
  eval_delta: float = 1 / 64
  image_size: int = 28
  digits: str = "0123456789"
  eval_digits: str = "23579"
  seed: int = 0


def parse(arg: str) -> dict:
  knobs = common.parse_knobs(arg, KNOBS)
  if knobs["preset"] not in ("cpu", "gpu"):
    raise ValueError(f"preset={knobs['preset']!r} must be 'cpu' or 'gpu'")
  if knobs["positions"] not in ("1d", "v2pe", "tad"):
    raise ValueError(f"positions={knobs['positions']!r} must be 1d, v2pe or tad")
  return knobs


def get_config(arg: str = "") -> Demo:
  k = parse(arg)
  gpu = k["preset"] == "gpu"
  context = k["context"] or (1 if gpu else 8)  # one GPU; 8 emulated CPU devices
  seq_len = 512 if gpu else 256
  # 7 px patches: 16 per 28 px frame (a tower sequence the context axis divides), pooled 2 x 2
  # to 4 tokens per frame in the LLM. On a GPU a step's ~3,400 frames go through the tower in one
  # chunk instead of ~106 sequential ones of 32 (at 28 px memory is no concern).
  vision = VisionConfig.variant(
    "tiny",
    patch=7,
    class_token=False,
    feature_layer=-1,
    width=64 if gpu else 32,
    frame_chunk=4096 if gpu else 32,
  )
  rope = RopeConfig(
    theta=1e4, positions=k["positions"], v2pe_random=k["positions"] == "v2pe", tad_gamma=1.0
  )
  decoder = DecoderConfig.variant(
    "tiny",
    rope=rope,
    remat="none",
    embed_dim=128 if gpu else 64,
    mlp_dim=512 if gpu else 128,
    num_layers=4 if gpu else 2,
    attention_impl="ring" if context > 1 else "auto",
    # LogN-scaling (lcv.attention.logn_scale) of every query that sees more than `logn` keys,
    # in training too (as Scalable-Softmax, arXiv 2501.19399): the model learns its logit scale
    # with the factor in place, and a needle in a 64x longer video is not diluted 64x.
    logn_scale_len=k["logn"],
  )
  model = VLMConfig(
    decoder=decoder,
    vision=vision,
    projector=ProjectorConfig(in_dim=vision.width, out_dim=decoder.embed_dim, pool=2),
    frame_bidirectional=k["frame_bidirectional"],
  )
  steps = k["steps"] or (600 if gpu else 260)
  return Demo(
    model=model,
    mesh=MeshConfig(data=1, fsdp=-1, context=context),
    optimizer=OptimizerConfig(lr=1e-3, warmup_steps=20, weight_decay=0.01, end_lr_ratio=0.05),
    steps=steps,
    batch=k["batch"] or (32 if gpu else 16),
    seq_len=seq_len,
    seed=k["seed"],
  )
