"""Tiny VLM on synthetic videos: trains on CPU in about a minute with the loss clearly falling.

    python scripts/train.py --config configs/train_tiny.py --workdir runs/tiny
    python scripts/train.py --config configs/train_tiny.py:context=2 --workdir runs/tiny_cp

arg: comma-separated overrides of the knobs below, e.g. "steps=300,positions=1d,context=2".
"""

from __future__ import annotations

from importlib import util
from pathlib import Path

from lcv.config import DecoderConfig, OptimizerConfig, RunConfig, VisionConfig

# Configs are loaded by path, not imported as a package; so is the part they share.
_spec = util.spec_from_file_location("lcv_configs_common", Path(__file__).with_name("common.py"))
common = util.module_from_spec(_spec)
_spec.loader.exec_module(common)

KNOBS = dict(steps=60, seq_len=512, batch=8, positions="v2pe", context=1, frame_bidirectional=True)


def get_config(arg: str = "") -> RunConfig:
  k = common.parse_knobs(arg, KNOBS)
  decoder = DecoderConfig.variant("tiny", rope=common.rope(1e4, k["positions"]), remat="none")
  # 7 px patches: 16 tokens per 28 px frame, enough to read a colour, a shape or a digit.
  vision = VisionConfig.variant("tiny", patch=7, class_token=False)
  optimizer = OptimizerConfig(lr=3e-3, warmup_steps=10, weight_decay=0.01)
  data = dict(synthetic_frames=(2, 4), max_frames=4, frames_per_row=32)
  train = dict(log_every=5, checkpoint_every=50)
  return common.vlm_run(decoder, vision, k, optimizer=optimizer, data=data, train=train)
