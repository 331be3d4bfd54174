"""What the run configs share: the knob parser and the assembly of a `RunConfig` from a VLM's rows.

Each config file keeps its own KNOBS and says only how its run differs; sizes are rows of the
variant tables in `lcv.config`. Config files are loaded by path (`--config configs/NAME.py[:arg]`),
not imported as a package, so they load this file by path too: it is not registered in
`sys.modules`, so it holds functions and constants only (a dataclass here would fail to build).
"""

from __future__ import annotations

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
  TrainConfig,
  VisionConfig,
  VLMConfig,
)

# OpenAI CLIP's pixel normalisation (per RGB channel), which its ViT-L/14-336 tower expects.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Knobs of the real-size VLMs under a CLIP tower (LongVA's recipe: 32K-token fine-tune, 1-D
# positions, token-causal mask, full remat); a config adds its own, e.g. `theta`.
CLIP_VLM_KNOBS = dict(
  steps=1000,
  seq_len=32_768,
  batch=1,
  positions="1d",
  frame_bidirectional=False,
  remat="full",
  context=1,
  # False: unstacked decoder layers, no lax.scan. 2.7-3.3% faster steps at 32K (1.5B, H200: the
  # scan copies each saved residual into its stacked buffer) for a longer compile (41 s vs 18 s).
  scan=True,
)
# LLaVA-1.6 / LongVA fine-tuning rates (longva/scripts/finetune.sh): 1e-5 for the LLM and
# projector, 2e-6 (a 0.2 multiplier) for the vision tower.
LONGVA_OPTIMIZER = OptimizerConfig(lr=1e-5, warmup_steps=30, groups=((r"^vision/", 0.2),))


def load_sibling(name: str):
  """configs/<name>.py as a module (configs are loaded by path, not imported as a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"lcv_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_knobs(arg: str | None, defaults: dict) -> dict:
  """`defaults` updated from `arg` = "key=value,..." (values take the type of the default).

  Booleans read "1", "true" or "yes" (any case) as True and anything else as False.
  """
  knobs = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in knobs:
      raise ValueError(f"unknown knob {key!r} in {arg!r}; known: {sorted(knobs)}")
    kind = type(knobs[key])
    knobs[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return knobs


def rope(theta: float, positions: str, mrope_sections: tuple[int, ...] | None = None) -> RopeConfig:
  """RoPE with `positions` ("1d" | "v2pe" | "tad" | "mrope"); V2PE draws its stride per sample.

  `mrope_sections` is used only by "mrope" (and is required by it: `RopeConfig` checks).
  """
  return RopeConfig(
    theta=theta,
    positions=positions,
    v2pe_random=positions == "v2pe",
    mrope_sections=mrope_sections if positions == "mrope" else None,
  )


def attention_impl(context: int, requested: str = "auto") -> str:
  """`requested`, except that "auto" over a sequence sharded on `context` > 1 devices is "ring".

  A sequence sharded over devices needs sequence-parallel attention (ring, `lcv.parallel`).
  """
  return "ring" if context > 1 and requested == "auto" else requested


def vlm_run(
  decoder: DecoderConfig,
  vision: VisionConfig,
  knobs: dict,
  *,
  optimizer: OptimizerConfig,
  projector: dict | None = None,
  data: dict | None = None,
  train: dict | None = None,
) -> RunConfig:
  """The run of `decoder` under `vision` as `knobs` size it, on an FSDP x `context` mesh.

  knobs: needs steps, seq_len, batch, frame_bidirectional and context (see `parse_knobs`).
  projector, data, train: extra fields of `ProjectorConfig`, `DataConfig` and `TrainConfig`
    beyond what the towers and knobs set.
  """
  model = VLMConfig(
    decoder=decoder,
    vision=vision,
    projector=ProjectorConfig(in_dim=vision.width, out_dim=decoder.embed_dim, **(projector or {})),
    frame_bidirectional=knobs["frame_bidirectional"],
  )
  data_config = DataConfig(
    seq_len=knobs["seq_len"],
    batch_size=knobs["batch"],
    image_size=vision.image_size,
    **(data or {}),
  )
  train_config = TrainConfig(
    steps=knobs["steps"], data=data_config, optimizer=optimizer, **(train or {})
  )
  mesh = MeshConfig(fsdp=-1, context=knobs["context"])
  return RunConfig(model=model, mesh=mesh, train=train_config)


def clip_vlm_run(
  llm: str,
  knobs: dict,
  *,
  theta: float,
  max_frames: int,
  optimizer: OptimizerConfig,
  attention: str = "auto",
) -> RunConfig:
  """LLM variant `llm` under CLIP ViT-L/14-336 + mlp2x_gelu + 2x2 pooling (144 tokens per frame).

  The LLaVA-1.6 / LongVA visual path: 576 patches of a 336 px frame from the tower's
  second-to-last layer, projected and average-pooled to 12 x 12; towers and projector in bf16.
  knobs: `CLIP_VLM_KNOBS` (and any others the config reads itself).
  """
  decoder = DecoderConfig.variant(
    llm,
    rope=rope(theta, knobs["positions"]),
    remat=knobs["remat"],
    scan_layers=knobs["scan"],
    attention_impl=attention_impl(knobs["context"], attention),
  )
  return vlm_run(
    decoder,
    VisionConfig.variant("clip_l14_336", dtype="bfloat16"),
    knobs,
    optimizer=optimizer,
    projector=dict(pool=2, dtype="bfloat16"),
    data=dict(max_frames=max_frames, pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD),
  )


# A Qwen2 decoder under the CLIP tower (configs/qwen2_0_5b.py, qwen2_1_5b.py): the CLIP-VLM knobs
# plus Qwen2's RoPE theta and the attention implementation ("auto" is ring when context > 1).
QWEN2_CLIP_KNOBS = dict(CLIP_VLM_KNOBS, theta=1e6, attention="auto")


def qwen2_clip_run(variant: str, arg: str | None) -> RunConfig:
  """The LongVA-recipe run of a Qwen2 `variant` ("qwen2-0.5b", "qwen2-1.5b") from knobs `arg`."""
  k = parse_knobs(arg, QWEN2_CLIP_KNOBS)
  return clip_vlm_run(
    variant,
    k,
    theta=k["theta"],
    attention=k["attention"],
    max_frames=64,
    optimizer=LONGVA_OPTIMIZER,
  )
