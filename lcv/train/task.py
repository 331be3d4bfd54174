"""The VLM training task: how packed rows become model inputs, the loss, and the step's FLOPs.

    task = vlm_task(vlm_cfg, train_cfg, mesh_cfg)
    loop.train(task, train_cfg, mesh)

Host side (`inputs_fn`), per batch: `lcv.models.vlm.prepare_inputs` derives slots, positions and
the interval mask from the packed `Layout` in natural order; V2PE training strides are drawn per
visual item from a generator seeded by the row's identity (so they are host-count independent and
exact on resume); then, with context parallelism, every per-token array is reordered as one pytree
(`lcv.parallel.context`, zig-zag by default) and the loss, which only sums over tokens, is
unchanged. Pixels travel as uint8 and are normalised on device.

Loss: LWM-style weighted next-token cross-entropy (weights from packing: answer / prompt roles,
nothing across samples or at visual targets) plus optional z-loss, through
`lcv.models.loss.chunked_cross_entropy` (no [S, V] logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcv import masks
from lcv.config import MeshConfig, TrainConfig, VLMConfig
from lcv.models import decoder as decoder_lib
from lcv.models import loss as loss_lib
from lcv.models import vlm as vlm_lib
from lcv.parallel import context as context_lib
from lcv.parallel import rules as rules_lib
from lcv.train import flops as flops_lib
from lcv.train import loop, optim

# Per-token leaves of the model batch (everything but media) are reordered for context parallelism.
_MEDIA = ("pixels", "visual_embeds")


# V2PE's training set of strides {1, 1/2, ..., 1/256} (arXiv 2412.09616, section 3.2).
V2PE_DELTAS = tuple(2.0**-k for k in range(9))


def _v2pe_deltas(row_ids, num_items: int, seed: int, deltas=V2PE_DELTAS) -> np.ndarray:
  """float32[B, n_items] strides drawn uniformly from `deltas`, one generator per row identity."""
  table = np.asarray(deltas, np.float32)
  out = np.ones((len(row_ids), max(num_items, 1)), np.float32)
  for r, (slot, first) in enumerate(np.asarray(row_ids)):
    rng = np.random.default_rng([seed, int(slot), int(first)])
    out[r] = table[rng.integers(0, len(table), out.shape[1])]
  return out


def check(vlm_cfg: VLMConfig, train_cfg: TrainConfig, mesh_cfg: MeshConfig | None = None):
  """Clear errors for config combinations that cannot train."""
  data = train_cfg.data
  if vlm_cfg.vision is not None and data.image_size != vlm_cfg.vision.image_size:
    raise ValueError(
      f"data.image_size={data.image_size} must equal the vision tower's image_size="
      f"{vlm_cfg.vision.image_size} (frames are resized to it); set --set data.image_size="
      f"{vlm_cfg.vision.image_size}"
    )
  if vlm_cfg.vision is None:
    raise ValueError("training from pixels needs a vision tower (VLMConfig.vision)")
  vocab = vlm_cfg.decoder.vocab_size
  from lcv.data import tokenizer as tokenizer_lib

  tok_vocab = tokenizer_lib.load(data.tokenizer).vocab_size
  if tok_vocab > vocab:
    raise ValueError(
      f"tokenizer {data.tokenizer!r} has {tok_vocab} ids but decoder.vocab_size={vocab}; raise it"
    )
  if mesh_cfg is not None and mesh_cfg.context > 1 and mesh_cfg.load_balance != "none":
    multiple = context_lib.required_multiple(mesh_cfg.context, mesh_cfg.load_balance)
    if data.seq_len % multiple:
      raise ValueError(
        f"data.seq_len={data.seq_len} must be a multiple of {multiple} for "
        f"{mesh_cfg.load_balance} order over context={mesh_cfg.context}"
      )


def make_inputs_fn(
  vlm_cfg: VLMConfig, train_cfg: TrainConfig, mesh_cfg: MeshConfig | None, v2pe_deltas=None
):
  """Host batch -> model inputs. V2PE strides are drawn per item from `v2pe_deltas` when it has
  two or more values (a context-extension stage's set), else from `V2PE_DELTAS` when the model's
  rope asks for random strides."""
  rope = vlm_cfg.decoder.rope
  data = train_cfg.data
  context = mesh_cfg.context if mesh_cfg is not None else 1
  balance = mesh_cfg.load_balance if mesh_cfg is not None else "none"
  if v2pe_deltas is None or len(v2pe_deltas) < 2:
    v2pe_deltas = V2PE_DELTAS if rope.positions == "v2pe" and rope.v2pe_random else None

  def inputs_fn(host: dict) -> dict:
    lay = host["layout"]
    delta = None
    if v2pe_deltas is not None:
      delta = _v2pe_deltas(host["row_id"], lay.num_items, data.seed, v2pe_deltas)
    batch = vlm_lib.prepare_inputs(lay, host["tokens"], vlm_cfg, v2pe_delta=delta)
    batch = jax.tree.map(np.asarray, batch)
    batch["targets"] = host["targets"]
    batch["weights"] = host["weights"]
    if context > 1 and balance != "none":
      batch = context_lib.to_order(batch, context, balance)
    batch["pixels"] = host["frames"]
    return batch

  return inputs_fn


def make_loss_fn(
  vlm_cfg: VLMConfig, train_cfg: TrainConfig, chunk: int = 2048, lm_head: str = "fused"
):
  """`loss_fn(model, batch)`; `lm_head` picks `chunked_cross_entropy`'s schedule: "fused"
  (gradients formed with the loss, logits once per step) or "recompute" (logits again in the
  backward)."""
  if lm_head not in ("fused", "recompute"):
    raise ValueError(f"{lm_head=}; use 'fused' or 'recompute'")
  mean = np.asarray(train_cfg.data.pixel_mean, np.float32)
  std = np.asarray(train_cfg.data.pixel_std, np.float32)

  def loss_fn(model, batch):
    pixels = (batch["pixels"].astype(jnp.float32) / 255.0 - mean) / std
    hidden = model({**batch, "pixels": pixels})
    head, layout = model.decoder.head() if lm_head == "fused" else (model.decoder.logits, "DV")
    return loss_lib.chunked_cross_entropy(
      hidden,
      head,
      batch["targets"],
      batch["weights"],
      chunk=chunk,
      z_loss=train_cfg.z_loss,
      head_layout=layout,
    )

  return loss_fn


def vision_flops_per_frame(vlm_cfg: VLMConfig, *, tower_trainable: bool = True) -> float:
  """Training FLOPs of the tower + projector for one frame (full attention inside the frame).

  A frozen tower (held constant by `stop_gradient`) costs its forward pass only."""
  v, p = vlm_cfg.vision, vlm_cfg.projector
  tokens = v.grid**2 + int(v.class_token)
  shape = flops_lib.Shape(
    layers=v.num_layers_run,
    embed=v.width,
    heads=v.heads,
    kv_heads=v.heads,
    head_dim=v.head_dim,
    mlp=v.mlp,
    gated=False,
  )
  patch_embed = 3 * 2 * tokens * v.patch**2 * v.channels * v.width
  tower = flops_lib.train_flops(shape, tokens, tokens * tokens) + patch_embed
  if not tower_trainable:
    tower /= 3
  merged = v.grid**2 // p.shuffle_factor**2
  projector = 3 * 2 * merged * (p.mlp_in * p.out_dim + p.out_dim**2)
  return tower + projector


def make_flops_fn(vlm_cfg: VLMConfig, *, tower_trainable: bool = True):
  per_frame = vision_flops_per_frame(vlm_cfg, tower_trainable=tower_trainable)

  def flops_fn(host: dict) -> float:
    lay = host["layout"]
    b, s = lay.segment_ids.shape
    lo, hi = masks.intervals(lay.segment_ids, lay.frame_ids, vlm_cfg.frame_bidirectional)
    density = float(np.mean(np.asarray(masks.density(lo, hi, masks.key_indices(b, s)))))
    llm = decoder_lib.flops_per_token(vlm_cfg.decoder, s, mask_density=density) * b * s
    frames = host["frames"].shape[0] * host["frames"].shape[1]  # the tower runs on all R slots
    return llm + frames * per_frame

  return flops_fn


def _tower_frozen(train_cfg: TrainConfig) -> bool:
  groups = train_cfg.optimizer.groups
  i = optim.group_of("vision/blocks/q_kernel/value", groups)
  return i < len(groups) and groups[i][1] == 0


def vlm_task(
  vlm_cfg: VLMConfig,
  train_cfg: TrainConfig,
  mesh_cfg: MeshConfig | None = None,
  *,
  loss_chunk: int = 2048,
  lm_head: str = "fused",
  v2pe_deltas=None,
) -> loop.Task:
  """The `loop.Task` that trains `lcv.models.vlm.VLM(vlm_cfg)` on `train_cfg.data`
  (`v2pe_deltas`: see `make_inputs_fn`; `loss_chunk`, `lm_head`: see `make_loss_fn`)."""
  check(vlm_cfg, train_cfg, mesh_cfg)
  seed = train_cfg.seed
  return loop.Task(
    model_fn=lambda: vlm_lib.VLM(vlm_cfg, rngs=nnx.Rngs(seed)),
    loss_fn=make_loss_fn(vlm_cfg, train_cfg, loss_chunk, lm_head),
    inputs_fn=make_inputs_fn(vlm_cfg, train_cfg, mesh_cfg, v2pe_deltas),
    tokens_per_frame=vlm_cfg.frame_tokens,
    rules=rules_lib.RULES,
    flops_fn=make_flops_fn(vlm_cfg, tower_trainable=not _tower_frozen(train_cfg)),
  )
