"""Typed configuration: frozen dataclasses, one per component.

Configs are code (`configs/*.py` return these); layers receive their own sub-config, never the
whole run config. Sizes are table rows (see `lcv.models`), not subclasses.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

# --- rope / positions ---

RopeKind = Literal["none", "linear", "ntk", "dynamic", "yarn", "llama3"]
PositionKind = Literal["1d", "v2pe", "tad", "mrope"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE context extension, with Hugging Face `rope_scaling` semantics (`lcv.rope.inv_freq`).

  kind: "none"; "linear" (position interpolation, positions / factor); "ntk" (NTK-aware, theta *
    factor ** (H / (H - 2))); "dynamic" (NTK from the static sequence length); "yarn" (with its
    attention temperature); "llama3" (Llama-3.1 frequency bands).
  original_max_position_embeddings: the pre-training context; needed by dynamic (where Hugging Face
    calls it max_position_embeddings), yarn and llama3.
  """

  kind: RopeKind = "none"
  factor: float = 1.0
  original_max_position_embeddings: int | None = None
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  mscale: float | None = None  # yarn (DeepSeek style)
  mscale_all_dim: float | None = None  # yarn (DeepSeek style)
  attention_factor: float | None = None  # yarn; None = 0.1 * ln(factor) + 1
  truncate: bool = True  # yarn: round the correction range to whole dims
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3

  def __post_init__(self):
    needs_context = ("dynamic", "yarn", "llama3")
    if self.kind in needs_context and self.original_max_position_embeddings is None:
      raise ValueError(f"RopeScaling({self.kind=}) needs original_max_position_embeddings.")
    if self.factor <= 0:
      raise ValueError(f"RopeScaling {self.factor=} must be > 0.")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Positions and rotary embedding of the decoder (DESIGN section 2).

  positions: which position ids the model uses (`lcv.positions`).
  v2pe_delta: fixed V2PE stride at inference (1/2^k, k <= 8); training samples one per item when
    `v2pe_random`.
  tad_gamma: weight of the frame index in TAD positions (gamma * 256 must be an integer).
  mrope_sections: M-RoPE frequency split (t, h, w), summing to head_dim / 2 (Qwen2-VL: 16, 24, 24).
  """

  theta: float = 10_000.0
  scaling: RopeScaling | None = None
  positions: PositionKind = "1d"
  v2pe_delta: float = 1.0
  v2pe_random: bool = False
  tad_gamma: float = 1.0
  mrope_sections: tuple[int, ...] | None = None

  def __post_init__(self):
    if (self.positions == "mrope") != (self.mrope_sections is not None):
      raise ValueError(
        f"{self.positions=} and {self.mrope_sections=}: M-RoPE positions need mrope_sections "
        "and only they use them."
      )


# --- models: vision / projector ---


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """ViT image encoder (`lcv.models.vision`); one row of `VISION_VARIANTS` plus overrides.

  patch: square patch side in pixels; image_size: the resolution the position table was trained
    at (other sizes interpolate it bicubically, class position kept).
  width / depth / heads / mlp: D, layers, N, F.
  class_token: prepend a learned class token (CLIP); keep_class_token: keep it in the features
    (LLaVA "full" select strategy) instead of dropping it (LLaVA "default").
  pre_norm: LayerNorm after the embeddings (CLIP's `pre_layrnorm`); post_norm: LayerNorm on the
    returned features (SigLIP's `post_layernorm`; CLIP applies its own only to the pooled token).
  act: MLP activation ("quick_gelu" x * sigmoid(1.702 x) for CLIP, "gelu_tanh" for SigLIP).
  feature_layer: which hidden state becomes the features, in Hugging Face's `hidden_states`
    indexing (0 = embeddings, depth = last block, negative counts from the end); layers after it
    are never run. LLaVA / LongVA take CLIP's second-to-last (-2).
  patch_bias: the patch projection has a bias (SigLIP) or not (CLIP).
  drop_remainder: image sides that are not a multiple of `patch` lose their trailing pixels, as
    the checkpoint's VALID strided convolution does (SigLIP so400m/14 at 384 px reads 378 px);
    otherwise such images are an error.
  frame_chunk: frames encoded per step of the video loop (`lax.map`), bounding activation memory;
    on a mesh, a multiple of the devices that shard "batch" (data x fsdp).
  remat: recompute each block in the backward pass (`jax.checkpoint`) when training the tower.
  attention_impl: the blocks' `lcv.attention.attend` impl. "auto" is cuDNN on GPU for bf16 /
    fp16 towers (a frame's full attention is its best case: CLIP-L/336 on 226 frames took 0.198 s
    with it, 0.210 s with the Pallas kernel, H200), else attend's own choice.
  """

  patch: int = 14
  image_size: int = 336
  width: int = 1024
  depth: int = 24
  heads: int = 16
  mlp: int = 4096
  channels: int = 3
  class_token: bool = True
  keep_class_token: bool = False
  pre_norm: bool = True
  post_norm: bool = False
  act: Literal["quick_gelu", "gelu_tanh", "gelu"] = "quick_gelu"
  feature_layer: int = -2
  patch_bias: bool = False
  drop_remainder: bool = False
  norm_eps: float = 1e-5
  frame_chunk: int = 32
  remat: bool = False
  attention_impl: str = "auto"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f"{self.width=} must be a multiple of {self.heads=}")
    if self.image_size % self.patch and not self.drop_remainder:
      raise ValueError(f"{self.image_size=} must be a multiple of {self.patch=}")
    if not -self.depth - 1 <= self.feature_layer <= self.depth:
      raise ValueError(
        f"{self.feature_layer=} must index the depth + 1 hidden states: "
        f"{-self.depth - 1} <= feature_layer <= {self.depth}"
      )
    if self.keep_class_token and not self.class_token:
      raise ValueError(f"{self.keep_class_token=} needs class_token=True")

  @classmethod
  def variant(cls, name: str, **overrides) -> VisionConfig:
    """A `VISION_VARIANTS` row with `overrides` applied, e.g. `variant("clip_l14_336")`."""
    if name not in VISION_VARIANTS:
      raise ValueError(f"unknown vision variant {name!r}; known: {sorted(VISION_VARIANTS)}")
    return cls(**{**VISION_VARIANTS[name], **overrides})

  @property
  def grid(self) -> int:
    """Patches per side at `image_size`."""
    return self.image_size // self.patch

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def num_layers_run(self) -> int:
    """Blocks actually run to reach `feature_layer`."""
    return self.feature_layer % (self.depth + 1)


# fmt: off
VISION_VARIANTS: dict[str, dict] = {
  # CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336), LLaVA / LongVA's tower: 24 x 24
  # = 576 patch tokens from the second-to-last block, class token dropped.
  "clip_l14_336": dict(
    patch=14, image_size=336, width=1024, depth=24, heads=16, mlp=4096, class_token=True,
    pre_norm=True, post_norm=False, act="quick_gelu", feature_layer=-2, patch_bias=False,
    norm_eps=1e-5,
  ),
  # SigLIP so400m/14 at 384 px (google/siglip-so400m-patch14-384): 27 x 27 = 729 tokens, no class
  # token, post-LayerNorm on the last block's output (SiglipVisionModel.last_hidden_state).
  "siglip_so400m14_384": dict(
    patch=14, image_size=384, width=1152, depth=27, heads=16, mlp=4304, class_token=False,
    pre_norm=False, post_norm=True, act="gelu_tanh", feature_layer=-1, patch_bias=True,
    drop_remainder=True, norm_eps=1e-6,
  ),
  # CPU tests and smoke runs: 28 px images, 2 x 2 patches.
  "tiny": dict(
    patch=14, image_size=28, width=32, depth=2, heads=4, mlp=64, class_token=True,
    pre_norm=True, post_norm=False, act="quick_gelu", feature_layer=-2, patch_bias=False,
    norm_eps=1e-5,
  ),
}
# fmt: on


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """Vision -> LLM projector (`lcv.models.projector`): LLaVA's mlp2x_gelu plus token reduction.

  in_dim: vision width (features in); out_dim: LLM width D.
  pixel_shuffle: InternVL's space-to-depth before the MLP: ratio 0.5 merges 2 x 2 neighbouring
    patches into one token of 4x the width (1024 -> 256 tokens per 448 px tile).
  norm: LayerNorm on the MLP input (InternVL's mlp1 starts with one; LLaVA's does not).
  pool: average-pool window on the patch grid after the MLP (LongVA: 2, 576 -> 144 tokens).
  """

  in_dim: int = 1024
  out_dim: int = 4096
  pixel_shuffle: float | None = None
  norm: bool = False
  pool: int = 1
  norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.pool < 1:
      raise ValueError(f"{self.pool=} must be >= 1 (1 = no pooling)")
    if self.pixel_shuffle is not None:
      r = 1 / self.pixel_shuffle
      if self.pixel_shuffle <= 0 or abs(r - round(r)) > 1e-6 or round(r) < 2:
        raise ValueError(f"{self.pixel_shuffle=} must be 1/k for an integer k >= 2, e.g. 0.5")

  @property
  def shuffle_factor(self) -> int:
    """Patches merged per side by pixel shuffle (1 = none)."""
    return 1 if self.pixel_shuffle is None else round(1 / self.pixel_shuffle)

  @property
  def mlp_in(self) -> int:
    """Width entering the MLP (after pixel shuffle)."""
    return self.in_dim * self.shuffle_factor**2


# --- models: decoder / vlm ---
# `DecoderConfig.remat` values (`lcv.models.decoder.remat_policy` maps them to jax policies).
REMAT_POLICIES = ("none", "full", "attention", "dots_saveable", "dots_attention", "offload")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Llama / Qwen2 decoder LLM (`lcv.models.decoder`); one row of `DECODER_VARIANTS` + overrides.

  vocab_size / embed_dim / mlp_dim: V, D, F. num_heads / num_kv_heads / head_dim: N, K, H (GQA
    when K < N). qkv_bias: Qwen2's q/k/v projections carry a bias, Llama's do not.
  tie_embeddings: the LM head reuses the token embedding (Qwen2 0.5B / 1.5B).
  dtype / param_dtype: compute (activations, matmul inputs) vs stored parameter dtype.
  scan_layers: stack the blocks on a leading "layers" axis and run them with `lax.scan` (one
    compiled block, fast compiles at depth); False keeps a list of blocks (same math, and the
    same initial values for the same seed: each block is a slice of the stacked init). Unstacked
    blocks skip the scan's stacked residual buffers and the copies into them: a 1.5B model's
    32K step on an H200 ran 2.7-3.3% faster, compiled in ~45 s instead of ~20 s.
  remat: what a block's backward recomputes: "none" saves everything; "full" saves only the block
    input; "attention" saves the block input and the attention kernels' (o, lse), so the backward
    never re-runs attention (~0.1 GB per layer at 32K tokens, 1.5B shape); "dots_saveable" keeps
    matmul outputs; "dots_attention" keeps both (only elementwise work is recomputed; a 1.5B
    model at 32K fits on one H200); "offload" moves the dots to pinned host memory (GPU / TPU;
    on CPU it falls back to "dots_saveable").
  attention_impl: passed to `lcv.attention.attend` ("auto", "xla", "cudnn", "pallas_gpu", ...).
  logn_scale_len: 0 = off; else LogN-scaling of the attention logits for queries that see more
    than this many keys (`lcv.attention.logn_scale`). Set to the training length it changes
    nothing in training (an evaluation-time switch); set shorter, the model trains with it.
  """

  vocab_size: int = 32_000
  embed_dim: int = 4096
  mlp_dim: int = 11_008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rope: RopeConfig = RopeConfig()
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  tie_embeddings: bool = False
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: Literal["none", "full", "attention", "dots_saveable", "dots_attention", "offload"] = "full"
  attention_impl: str = "auto"
  logn_scale_len: int = 0

  def __post_init__(self):
    if self.logn_scale_len and self.logn_scale_len < 2:
      raise ValueError(f"{self.logn_scale_len=} must be 0 (off) or a key count >= 2 (log 1 = 0)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"{self.num_heads=} must be a multiple of {self.num_kv_heads=} (grouped-query attention)"
      )
    if self.head_dim % 2:
      raise ValueError(f"{self.head_dim=} must be even (RoPE rotates pairs of channels)")
    sections = self.rope.mrope_sections
    if sections is not None and sum(sections) != self.head_dim // 2:
      raise ValueError(f"mrope_sections {sections} must sum to {self.head_dim // 2=}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"{self.remat=}; choose one of {REMAT_POLICIES}")

  @classmethod
  def variant(cls, name: str, **overrides) -> DecoderConfig:
    """A `DECODER_VARIANTS` row with `overrides`, e.g. `variant("qwen2-7b", num_layers=2)`."""
    if name not in DECODER_VARIANTS:
      raise ValueError(f"unknown decoder variant {name!r}; known: {sorted(DECODER_VARIANTS)}")
    return cls(**{**DECODER_VARIANTS[name], **overrides})


# Rows are the Hugging Face `config.json` of each model (hidden_size, intermediate_size, ...).
# fmt: off
DECODER_VARIANTS: dict[str, dict] = {
  # Qwen/Qwen2-0.5B(-Instruct): 14 q-heads over 2 kv-heads, qkv bias, tied embeddings.
  "qwen2-0.5b": dict(
    vocab_size=151_936, embed_dim=896, mlp_dim=4864, num_layers=24, num_heads=14, num_kv_heads=2,
    head_dim=64, rope=RopeConfig(theta=1e6), norm_eps=1e-6, qkv_bias=True, tie_embeddings=True,
  ),
  # Qwen/Qwen2-1.5B(-Instruct).
  "qwen2-1.5b": dict(
    vocab_size=151_936, embed_dim=1536, mlp_dim=8960, num_layers=28, num_heads=12, num_kv_heads=2,
    head_dim=128, rope=RopeConfig(theta=1e6), norm_eps=1e-6, qkv_bias=True, tie_embeddings=True,
  ),
  # Qwen/Qwen2-7B(-Instruct); LongVA's LLM (lmms-lab/Qwen2-7B-Instruct-224K) is this row with
  # theta 1e9 (configs/longva_7b.py).
  "qwen2-7b": dict(
    vocab_size=152_064, embed_dim=3584, mlp_dim=18_944, num_layers=28, num_heads=28,
    num_kv_heads=4, head_dim=128, rope=RopeConfig(theta=1e6), norm_eps=1e-6, qkv_bias=True,
    tie_embeddings=False,
  ),
  # meta-llama/Llama-2-7b-hf; LWM-Text / LWM (arXiv 2402.08268) keep this shape and raise theta.
  "llama2-7b": dict(
    vocab_size=32_000, embed_dim=4096, mlp_dim=11_008, num_layers=32, num_heads=32,
    num_kv_heads=32, head_dim=128, rope=RopeConfig(theta=1e4), norm_eps=1e-5, qkv_bias=False,
    tie_embeddings=False,
  ),
  # meta-llama/Meta-Llama-3-8B.
  "llama3-8b": dict(
    vocab_size=128_256, embed_dim=4096, mlp_dim=14_336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rope=RopeConfig(theta=5e5), norm_eps=1e-5, qkv_bias=False,
    tie_embeddings=False,
  ),
  # CPU tests and smoke runs (vocab covers the byte tokenizer's 259 ids).
  "tiny": dict(
    vocab_size=320, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, rope=RopeConfig(theta=1e4), norm_eps=1e-6, qkv_bias=True, tie_embeddings=False,
    dtype="float32",
  ),
}
# fmt: on


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """Vision tower + projector + decoder (`lcv.models.vlm`).

  vision / projector: None for a text-only model, or one fed precomputed `visual_embeds`.
  tokens_per_frame: visual tokens per frame / image / tile entering the decoder. Derived from the
    vision grid and the projector's token reduction when left None; required without a tower.
  frame_bidirectional: tokens of one frame see each other (TC-LLaVA's frame-wise block-causal
    mask, arXiv 2409.03206); otherwise plain causal.
  Positions (1-D / V2PE / TAD / M-RoPE) follow `decoder.rope`.
  """

  decoder: DecoderConfig = DecoderConfig()
  vision: VisionConfig | None = None
  projector: ProjectorConfig | None = None
  tokens_per_frame: int | None = None
  frame_bidirectional: bool = False

  def __post_init__(self):
    if (self.vision is None) != (self.projector is None):
      raise ValueError("VLMConfig needs both vision and projector, or neither (precomputed embeds)")
    if self.projector is not None and self.projector.out_dim != self.decoder.embed_dim:
      raise ValueError(f"{self.projector.out_dim=} must equal {self.decoder.embed_dim=}")
    if self.vision is not None and self.projector.in_dim != self.vision.width:
      raise ValueError(f"{self.projector.in_dim=} must equal {self.vision.width=}")
    derived = self._derived_tokens_per_frame()
    if derived is None and self.tokens_per_frame is None:
      raise ValueError("tokens_per_frame is required when the VLM has no vision tower")
    if None not in (derived, self.tokens_per_frame) and derived != self.tokens_per_frame:
      raise ValueError(
        f"{self.tokens_per_frame=} disagrees with the {derived} tokens the vision tower and "
        "projector produce per frame; leave it None to derive it"
      )

  def _derived_tokens_per_frame(self) -> int | None:
    if self.vision is None:
      return None
    grid = self.vision.grid
    for reduce in (self.projector.shuffle_factor, self.projector.pool):
      if grid % reduce:
        raise ValueError(f"vision grid {grid} is not divisible by the projector reduction {reduce}")
      grid //= reduce
    return grid * grid + int(self.vision.keep_class_token)

  @property
  def frame_tokens(self) -> int:
    """Visual tokens per frame (n_tok)."""
    return self.tokens_per_frame or self._derived_tokens_per_frame()


# --- mesh / parallelism ---


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh (`lcv.parallel.mesh.make_mesh`) and sequence-parallel attention choices.

  data, fsdp, context, tensor: mesh axis sizes inside one slice / node (fast links); exactly one
    may be -1 (= the remaining devices). `context` shards the sequence; it also shards weights
    (rules "embed" -> ("fsdp", "context")), as LWM and MaxText do.
  dcn_data, dcn_fsdp: how many slices / nodes (slow links) the data and fsdp axes span; the
    context and tensor axes never cross the slow network.
  context_parallel: attention over a context-sharded sequence: "ring" | "ulysses" | "hybrid" |
    "all_gather" (`lcv.parallel.ring_attention`).
  ulysses: Ulysses group size for "hybrid" (must divide `context`; ring across the groups).
  load_balance: token order along the sequence for causal balance: "zigzag" | "striped" | "none"
    (`lcv.parallel.context`).
  """

  data: int = 1
  fsdp: int = -1
  context: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  context_parallel: Literal["ring", "ulysses", "hybrid", "all_gather"] = "ring"
  ulysses: int = 1
  load_balance: Literal["zigzag", "striped", "none"] = "zigzag"


# --- data / training ---


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training data: source, media preprocessing, tokenizer and masked packing (`lcv.data`).

  source: "synthetic" (procedural videos, `lcv.data.synthetic`) or "tfds" (a TFDS dataset with the
    features documented in docs/training.md, read through `tfds.data_source`).
  tokenizer: "bytes" (built-in byte-level) or a local Hugging Face tokenizer directory.
  seq_len: S, tokens per packed row. batch_size: B, global rows per step.
  max_frames: F, frames kept per sample (uniform or fps sampling); image_size: frames are resized
    (aspect kept) and padded to image_size x image_size (the vision tower's size).
  frames_per_row: R, frame capacity of a packed row (0: seq_len // tokens_per_frame); the vision
    tower encodes R frames per row, so keep it near the real need.
  pixel_mean / pixel_std: per-channel normalisation of [0, 1] pixels for the vision tower.
  synthetic_*: frames per video (min, max), text kinds (`lcv.data.synthetic.KINDS`), set size.
  answer_weight / prompt_weight: loss weight of answer-or-caption text and of prompt text.
  """

  source: Literal["synthetic", "tfds"] = "synthetic"
  tfds_name: str = ""
  tfds_dir: str | None = None
  split: str = "train"
  tokenizer: str = "bytes"
  seq_len: int = 1024
  batch_size: int = 8
  max_frames: int = 4
  frame_sampling: Literal["uniform", "fps"] = "uniform"
  fps: float = 1.0
  image_size: int = 32
  frames_per_row: int = 0
  pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  answer_weight: float = 1.0
  prompt_weight: float = 0.0
  shuffle: bool = True
  seed: int = 0
  prefetch: int = 2
  synthetic_frames: tuple[int, int] = (2, 4)
  synthetic_kinds: tuple[str, ...] = ("caption", "colour", "object")
  synthetic_size: int = 100_000


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with warmup + decay, clipping, and per-group learning rates (`lcv.train.optim`).

  groups: (regex, lr multiplier) pairs matched against "/"-joined parameter paths, first match wins;
    multiplier 0 freezes the group (no optimizer state). Unmatched parameters use multiplier 1.
  no_decay: regex of parameters without weight decay (norm scales, biases).
  """

  lr: float = 3e-4
  schedule: Literal["cosine", "linear", "constant"] = "cosine"
  warmup_steps: int = 20
  end_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  groups: tuple[tuple[str, float], ...] = ()
  no_decay: str = r"(bias|scale|norm)"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training run (`lcv.train.loop`): steps, accumulation, loss, logging, checkpoints.

  grad_accum: micro-batches per optimizer step (rows per micro-batch = batch_size / grad_accum).
  z_loss: coefficient of the PaLM z-loss. checkpoint_every: steps between saves (0: only at the
  end and on SIGTERM); keep_checkpoints: newest kept. profile_steps: (start, stop) steps of a
  profiler trace written to <workdir>/profile; (0, 0) for none.
  """

  steps: int = 200
  grad_accum: int = 1
  z_loss: float = 0.0
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  workdir: str = ""
  profile_steps: tuple[int, int] = (0, 0)
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One experiment, as `configs/*.py:get_config(arg)` returns it to scripts/train.py."""

  model: VLMConfig
  mesh: MeshConfig = MeshConfig()
  train: TrainConfig = TrainConfig()


# --- evaluation ---


@dataclasses.dataclass(frozen=True)
class VNIAHConfig:
  """V-NIAH, LongVA's visual needle-in-a-haystack (`lcv.eval.vniah`, docs/eval.md).

  haystack: "synthetic" (procedural frames, no download), a video file (decoded at `haystack_fps`
    with PyAV, the `data` extra) or a directory of frame images (sorted by name).
  needles: "builtin" (5 rendered needles) or a needle JSON file (`lcv.eval.needles`).
  Grid: frame counts range(min_frames, max_frames + 1, frame_step) x depths
    arange(0, 1 + depth_step, depth_step); the needle is one extra frame inserted at
    int(depth * num_frames) (LongVA defaults: 200..3000 step 200, depth step 0.2).
  image_size, image_mean, image_std: frames are padded to a square with the mean colour, resized and
    normalised before the vision tower (LLaVA's "pad" preprocessing, CLIP statistics).
  prompt_template: a key of `lcv.eval.prompts.TEMPLATES`; replace_double_newline splits Llama-3's
    "\n\n" token (271) into two "\n" (198) in the template text, as LongVA's llama3 runs do.
  distractor: V-NIAH-D, a look-alike image `distractor_gap` frames before or after the needle.
  scoring: "teacher_forced" (exact match of every answer token under teacher forcing, LongVA's
    benchmark) or "generate" (greedy decoding of up to max_new_tokens, prefix match).
  pad_multiple: sequences are padded to a multiple of this (fewer compilations; must be a multiple
    of 2 x the context-parallel size for zig-zag sharding).
  v2pe_delta: visual position stride at inference for V2PE models (None: the model's default).
  prefix_chunk: > 0 scores an `lcv.models.vlm.VLM` in chunks of this many tokens with the prefix
    shared by a cell's needles prefilled once into a KV cache (`lcv.eval.prefix_cache`; a
    divisor of pad_multiple); 0 runs each case as one forward (zig-zag sharded over `context`).
  encode_batch: frames per vision-tower call when filling the embedding cache.
  """

  haystack: str = "synthetic"
  haystack_fps: float = 1.0
  needles: str = "builtin"
  min_frames: int = 200
  max_frames: int = 3000
  frame_step: int = 200
  depth_step: float = 0.2
  image_size: int = 336
  image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
  image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
  prompt_template: str = "qwen2"
  replace_double_newline: bool = False
  distractor: bool = False
  distractor_gap: int = 200
  scoring: Literal["teacher_forced", "generate"] = "teacher_forced"
  max_new_tokens: int = 16
  pad_multiple: int = 1024
  v2pe_delta: float | None = None
  prefix_chunk: int = 0
  encode_batch: int = 32
  seed: int = 24242424
  cache_dir: str = "niah_cache"
  output_dir: str = "niah_output"


@dataclasses.dataclass(frozen=True)
class TextNIAHConfig:
  """Text needle-in-a-haystack in the LWM / LongVA style (`lcv.eval.text_niah`).

  The needle "The special magic {city} number is: {7 digits}." is inserted at a sentence boundary
  at `depth` of a haystack of `length` tokens, from a local text file or the synthetic generator;
  `distractors` other cities carry their own numbers. Grid: lengths range(min_tokens, max_tokens +
  1, length_step) x depths arange(0, 1 + depth_step, depth_step); num_samples needles per cell.
  """

  haystack: str = "synthetic"
  min_tokens: int = 1024
  max_tokens: int = 8192
  length_step: int = 1024
  depth_step: float = 0.1
  num_samples: int = 5
  distractors: int = 0
  prompt_template: str = "qwen2"
  scoring: Literal["teacher_forced", "generate"] = "teacher_forced"
  max_new_tokens: int = 16
  pad_multiple: int = 1024
  seed: int = 0
  output_dir: str = "niah_output"
