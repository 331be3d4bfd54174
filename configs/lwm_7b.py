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
  steps=1000,
  seq_len=32_768,
  batch=1,
  theta=0.0,  # 0: LWM's value for seq_len
  positions="1d",
  frame_bidirectional=False,
  remat="full",
  context=1,
)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# (max context, RoPE theta) of LWM's stages.
LWM_THETA = ((32_768, 1e6), (262_144, 1e7), (524_288, 2.5e7), (1_048_576, 5e7))


def lwm_theta(seq_len: int) -> float:
  """LWM's RoPE theta for a training context (the stage that covers it)."""
  for max_len, theta in LWM_THETA:
    if seq_len <= max_len:
      return theta
  raise ValueError(f"{seq_len=} is beyond LWM's 1M-token schedule; pass theta= explicitly")


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
  theta = k["theta"] or lwm_theta(k["seq_len"])
  rope = RopeConfig(theta=theta, positions=k["positions"], v2pe_random=k["positions"] == "v2pe")
  decoder = DecoderConfig.variant(
    "llama2-7b",
    rope=rope,
    remat=k["remat"],
    attention_impl="ring" if k["context"] > 1 else "auto",
  )
  vision = VisionConfig.variant("clip_l14_336", dtype="bfloat16")
  projector = ProjectorConfig(
    in_dim=vision.width, out_dim=decoder.embed_dim, pool=2, dtype="bfloat16"
  )
  model = VLMConfig(
    decoder=decoder,
    vision=vision,
    projector=projector,
    frame_bidirectional=k["frame_bidirectional"],
  )
  data = DataConfig(
    seq_len=k["seq_len"],
    batch_size=k["batch"],
    image_size=vision.image_size,
    max_frames=256,
    pixel_mean=CLIP_MEAN,
    pixel_std=CLIP_STD,
  )
  # Learning rate and warmup are our choice for fine-tuning a 7B model, not taken from LWM.
  optimizer = OptimizerConfig(lr=4e-5, warmup_steps=50)
  train = TrainConfig(steps=k["steps"], data=data, optimizer=optimizer)
  return RunConfig(model=model, mesh=MeshConfig(fsdp=-1, context=k["context"]), train=train)
