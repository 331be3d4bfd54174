"""Qwen2-0.5B LLM + CLIP ViT-L/14-336 + mlp2x_gelu + 2x2 pooling (144 tokens per frame).

A real-size VLM in LongVA's recipe at 0.5B scale: the MFU and long-context benchmarks run it at
32K tokens on one GPU, and it scales out with the context knob (ring attention over the sequence).

    python scripts/train.py --config configs/qwen2_0_5b.py --workdir runs/qwen2_0_5b
    python scripts/train.py --config configs/qwen2_0_5b.py:seq_len=131072,context=4 --workdir runs/q

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

# common.CLIP_VLM_KNOBS (steps, seq_len, batch, positions, frame_bidirectional, remat, context),
# plus Qwen2's RoPE theta and the attention implementation ("auto" is ring when context > 1).
KNOBS = dict(common.CLIP_VLM_KNOBS, theta=1e6, attention="auto")


def get_config(arg: str | None = None) -> RunConfig:
  k = common.parse_knobs(arg, KNOBS)
  return common.clip_vlm_run(
    "qwen2-0.5b",
    k,
    theta=k["theta"],
    attention=k["attention"],
    max_frames=64,
    optimizer=common.LONGVA_OPTIMIZER,
  )
