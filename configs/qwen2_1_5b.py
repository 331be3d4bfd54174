"""Qwen2-1.5B LLM + CLIP ViT-L/14-336 + mlp2x_gelu + 2x2 pooling (144 tokens per frame).

A real-size VLM in LongVA's recipe at 1.5B scale: the MFU and long-context benchmarks run it at
32K tokens on one GPU, and it scales out with the context knob (ring attention over the sequence).

    python scripts/train.py --config configs/qwen2_1_5b.py --workdir runs/qwen2_1_5b
    python scripts/train.py --config configs/qwen2_1_5b.py:seq_len=131072,context=4 --workdir runs/q
    python scripts/train.py --config configs/qwen2_1_5b.py:remat=dots_attention,scan=false \
      --workdir runs/q32k  # the fastest one-GPU 32K setup measured (docs/training.md, "MFU")

arg: comma-separated knobs, e.g. "seq_len=65536,positions=v2pe,remat=dots_saveable".
"""

from __future__ import annotations

from importlib import util
from pathlib import Path

from lcv.config import RunConfig

# Configs are loaded by path, not imported as a package; so is the part they share.
_spec = util.spec_from_file_location("lcv_configs_common", Path(__file__).with_name("common.py"))
common = util.module_from_spec(_spec)
_spec.loader.exec_module(common)

KNOBS = common.QWEN2_CLIP_KNOBS  # CLIP-VLM knobs + theta, attention


def get_config(arg: str | None = None) -> RunConfig:
  return common.qwen2_clip_run("qwen2-1.5b", arg)
