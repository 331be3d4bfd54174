"""LongVA's long-context transfer, stage A (arXiv 2406.16852; notes: vlm_methods section 1.9).

    python scripts/extend_context.py --config configs/extend_longva.py --workdir runs/longva

One stage: Qwen2-7B-Instruct's decoder extended to 224,000 tokens with RoPE theta 1e9 (Qwen2's
default is 1e6), 1000 steps at lr 1e-5, about 4 x 224K tokens per step (batch 1 with 4-way
gradient accumulation in LongVA; here 4 rows per step), zig-zag ring attention over 8 devices.
LongVA trains this stage on text only (SlimPajama); our VLM task trains on the configured data
(synthetic videos unless `base.train.data` points at a TFDS set). The vision tower is frozen.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from lcv.config import (
  TextNIAHConfig,
  VNIAHConfig,
)
from lcv.train.stages import Extension, Stage

_spec = importlib.util.spec_from_file_location(
  "lcv_configs_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


SEQ_LEN = 224_000


def get_config(arg: str = "") -> Extension:
  if arg:
    raise ValueError(f"configs/extend_longva.py takes no argument; got {arg!r} (use --set)")
  # configs/longva_7b.py (Qwen2-7B decoder, CLIP L/14 tower pooled to 144 tokens per frame),
  # loaded by path; the stage sets theta 1e9, the length and the context size.
  base = common.load_sibling("longva_7b").get_config("")
  opt = dataclasses.replace(base.train.optimizer, weight_decay=0.0, groups=((r"^vision/", 0.0),))
  base = dataclasses.replace(base, train=dataclasses.replace(base.train, optimizer=opt))
  stage = Stage("224k", SEQ_LEN, 1e9, 1000, 1e-5, 4 * SEQ_LEN, 8, warmup_steps=20)
  return Extension(
    base=base,
    stages=(stage,),
    # LongVA's text check: 32K..512K step 32K (here up to the training length, then 2x beyond).
    text_niah=TextNIAHConfig(min_tokens=32_000, depth_step=0.1, num_samples=5, pad_multiple=4000),
    vniah=VNIAHConfig(min_frames=200, depth_step=0.2, pad_multiple=4000),
    eval_points=7,
    eval_beyond=2,
  )
