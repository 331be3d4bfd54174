"""LWM-7B-shaped VLM (Large World Model, arXiv 2402.08268): a Llama-2-7B decoder whose RoPE theta
grows with the context, under a CLIP ViT-L/14-336 tower pooled to 144 tokens per frame.

LWM extends Llama-2-7B in stages and raises theta with each: 1e6 at 32K, 1e7 at 128K-256K,
2.5e7 at 512K and 5e7 at 1M (its released configs); `theta` follows `seq_len` unless given.
LWM encodes frames with VQGAN tokens (256 per frame); we keep its LLM shape and context schedule
and use continuous CLIP features instead. 1-D positions and a token-causal mask, as in LWM; loss
weights on text and vision targets are separate (`lcv.models.loss.next_token_targets`).

    python scripts/train.py --config configs/lwm_7b.py:seq_len=1048576,context=32 --workdir runs/lwm
    python scripts/train.py --config configs/lwm_7b.py:seq_len=131072,context=4 --workdir runs/lwm

arg: comma-separated knobs, e.g. "seq_len=262144,context=8,theta=1e7".
"""

from __future__ import annotations

from importlib import util
from pathlib import Path

from lcv.config import OptimizerConfig, RunConfig

# Configs are loaded by path, not imported as a package; so is the part they share.
_spec = util.spec_from_file_location("lcv_configs_common", Path(__file__).with_name("common.py"))
common = util.module_from_spec(_spec)
_spec.loader.exec_module(common)

# common.CLIP_VLM_KNOBS, plus theta (0: LWM's value for seq_len).
KNOBS = dict(common.CLIP_VLM_KNOBS, theta=0.0)

# (max context, RoPE theta) of LWM's stages.
LWM_THETA = ((32_768, 1e6), (262_144, 1e7), (524_288, 2.5e7), (1_048_576, 5e7))


def lwm_theta(seq_len: int) -> float:
  """LWM's RoPE theta for a training context (the stage that covers it)."""
  for max_len, theta in LWM_THETA:
    if seq_len <= max_len:
      return theta
  raise ValueError(f"{seq_len=} is beyond LWM's 1M-token schedule; pass theta= explicitly")


def get_config(arg: str | None = None) -> RunConfig:
  k = common.parse_knobs(arg, KNOBS)
  # Learning rate and warmup are our choice for fine-tuning a 7B model, not taken from LWM.
  optimizer = OptimizerConfig(lr=4e-5, warmup_steps=50)
  theta = k["theta"] or lwm_theta(k["seq_len"])
  return common.clip_vlm_run("llama2-7b", k, theta=theta, max_frames=256, optimizer=optimizer)
