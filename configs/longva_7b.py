"""LongVA-7B (arXiv 2406.16852): Qwen2-7B-Instruct-224K + CLIP ViT-L/14-336 + mlp2x_gelu + 2x2 pool.

The LLM is Qwen2-7B with RoPE theta raised to 1e9 and trained on 224K-token text (LongVA's
"long context transfer"); each frame or 336 px crop is 576 CLIP patches from the second-to-last
layer, projected and average-pooled to 12 x 12 = 144 tokens, concatenated without separators
(UniRes). Positions are plain 1-D and the mask token-causal, as LongVA runs it; V2PE / TAD /
frame-bidirectional are knobs. Weights: scripts/convert_checkpoint.py from the HF release.

    python scripts/train.py --config configs/longva_7b.py --workdir runs/longva
    python scripts/eval_vniah.py --config configs/longva_7b.py:context=8 --checkpoint runs/longva

arg: comma-separated knobs, e.g. "seq_len=229376,context=8,positions=v2pe".
"""

from __future__ import annotations

from importlib import util
from pathlib import Path

from lcv.config import RunConfig

# Configs are loaded by path, not imported as a package; so is the part they share.
_spec = util.spec_from_file_location("lcv_configs_common", Path(__file__).with_name("common.py"))
common = util.module_from_spec(_spec)
_spec.loader.exec_module(common)

# steps, seq_len, batch, positions, frame_bidirectional, remat, context: LongVA's multimodal
# fine-tune runs at model_max_length 32768 (longva/scripts/finetune.sh).
KNOBS = dict(common.CLIP_VLM_KNOBS)


def get_config(arg: str | None = None) -> RunConfig:
  k = common.parse_knobs(arg, KNOBS)
  return common.clip_vlm_run(
    "qwen2-7b", k, theta=1e9, max_frames=128, optimizer=common.LONGVA_OPTIMIZER
  )
