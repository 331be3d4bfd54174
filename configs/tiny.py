"""Tiny VLM (2-layer decoder, 2-block ViT on 28 px frames): seconds on CPU, for tests and smoke.

    python scripts/train.py --config configs/tiny.py --workdir runs/tiny
    python scripts/train.py --config configs/tiny.py:positions=v2pe,context=2 --workdir runs/tiny

arg: comma-separated knobs, e.g. "steps=50,positions=tad,frame_bidirectional=false".
"""

from __future__ import annotations

from importlib import util
from pathlib import Path

from lcv.config import DecoderConfig, OptimizerConfig, RunConfig, VisionConfig

# Configs are loaded by path, not imported as a package; so is the part they share.
_spec = util.spec_from_file_location("lcv_configs_common", Path(__file__).with_name("common.py"))
common = util.module_from_spec(_spec)
_spec.loader.exec_module(common)

KNOBS = dict(
  steps=20, seq_len=256, batch=4, positions="1d", frame_bidirectional=True, scan=True, context=1
)


def get_config(arg: str | None = None) -> RunConfig:
  k = common.parse_knobs(arg, KNOBS)
  decoder = DecoderConfig.variant(
    "tiny",
    rope=common.rope(1e4, k["positions"], mrope_sections=(2, 3, 3)),
    scan_layers=k["scan"],
    remat="none",
    attention_impl=common.attention_impl(k["context"]),
  )
  vision = VisionConfig.variant("tiny")  # 28 px, 14 px patches: 4 tokens per frame
  optimizer = OptimizerConfig(lr=3e-3, warmup_steps=5, weight_decay=0.01)
  train = dict(log_every=5, checkpoint_every=max(k["steps"], 1))
  return common.vlm_run(
    decoder, vision, k, optimizer=optimizer, data=dict(max_frames=4), train=train
  )
