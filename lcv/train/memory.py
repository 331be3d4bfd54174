"""Device memory of a training step: by formula, and as XLA measures it after compilation.

The formula (per device, bytes) adds what a VLM training step keeps alive at its peak:

  params       P_train * bytes(param_dtype) / W      W = fsdp * context * tensor: the rules shard
  grads        P_train * bytes(param_dtype) / W      every weight matrix over all of them
  optimizer    AdamW mu + nu: 2 * 4 bytes * P_train / W (frozen groups hold none)
  saved        L * tokens * per-layer residuals of the remat policy (below), tokens = the
               device's B / (data * fsdp) rows x S / context positions: the residual stream
               stays sequence-sharded (rules "length" -> context)
  working      one block's forward + backward intermediates, rebuilt during its backward
  loss         the chunked LM head: [B, C, V] float32 logits, their softmax and gradient, and
               the head's float32 gradient sum (`lcv.models.loss`, fused schedule)
  vision       the tower's frames (split over data x fsdp x context: rules "frames"), chunk by
               chunk, plus the spliced visual tokens (gathered back for the splice)
  batch        the step's inputs (ids, masks, positions, uint8 pixels)

Per-layer residuals by `DecoderConfig.remat` (per token, in the compute dtype):
  full           D                                 (the block input; LWM / MaxText "full")
  attention      D + N*H + 2*N                     (plus the attention output and float32 lse)
  dots_saveable  D + N*H + 2*K*H + D + 2*F + D     (matmul outputs: q, k, v, o, gate, up, down)
  dots_attention dots_saveable + N*H + 2*N         (and the attention output and lse)
  offload        D on device; the dots go to pinned host memory (reported as `host`)
  none           every intermediate (norms, q/k/v after RoPE, attention, the SwiGLU branch)

`measure` lowers and compiles the real jitted step and reads `compiled.memory_analysis()`
(arguments + outputs - aliased + temporaries), the number that decides whether a run fits.
tests/test_memory.py holds the formula to the measurement on CPU; docs/memory.md has the plan
for 1M tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lcv import layout as layout_lib
from lcv.config import DecoderConfig, MeshConfig, RunConfig, VLMConfig
from lcv.models import decoder as decoder_lib
from lcv.parallel import mesh as mesh_lib

GiB = 2**30


def _bytes(dtype: str) -> int:
  return np.dtype(jax.numpy.dtype(dtype)).itemsize


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes per device of each part of a training step (see the module docstring)."""

  params: float
  grads: float
  optimizer: float
  saved: float
  working: float
  loss: float
  vision: float
  batch: float
  host: float = 0.0

  @property
  def state(self) -> float:
    """Train state: params + optimizer (what the checkpoint holds)."""
    return self.params + self.optimizer

  @property
  def total(self) -> float:
    """Device peak: everything but the host-offloaded part."""
    return sum(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "host")

  def table(self) -> str:
    rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
    rows.append(("total (device)", self.total))
    return "\n".join(f"  {name:<15} {value / GiB:10.3f} GiB" for name, value in rows)


def _axis_sizes(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  return mesh_lib.resolve_shape(mesh_cfg, num_devices)


def vision_params(vlm: VLMConfig) -> int:
  """Parameters of the tower (layers actually run) and projector."""
  v, p = vlm.vision, vlm.projector
  if v is None:
    return 0
  per_layer = 4 * v.width * v.width + 2 * v.width * v.mlp + 9 * v.width + v.mlp
  tokens = v.grid**2 + int(v.class_token)
  embed = v.patch**2 * v.channels * v.width + tokens * v.width + 4 * v.width
  projector = p.mlp_in * p.out_dim + p.out_dim * p.out_dim + 2 * p.out_dim + 2 * p.mlp_in
  return v.depth * per_layer + embed + projector


def layer_residuals(cfg: DecoderConfig) -> tuple[int, int, int]:
  """Per-token element counts of one block: (saved on device, offloaded to host, working set).

  A block's forward intermediates, per token: its input and the residual after attention (2D),
  two RMSNorms computed in float32 keeping input and output (4D), q, k, v before and after RoPE
  (2 (N H + 2 K H)), the attention output (N H) and its projection (D), the SwiGLU branch (gate,
  up, silu(gate), product: 4F) and the down projection (D): 8D + 2(NH + 2KH) + NH + 4F. The
  working set of a block's backward is four times that (the recomputed forward, its gradients,
  and XLA's fusion temporaries; measured on CPU, tests/test_memory.py).
  """
  d, f, n, k, h = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  dots = n * h + 2 * k * h + d + 2 * f + d
  everything = 8 * d + 2 * (n * h + 2 * k * h) + n * h + 4 * f
  attn = n * h + 2 * n  # o in the compute dtype, lse in float32 (two compute-dtype elements)
  saved = {
    "full": d,
    "attention": d + attn,
    "dots_saveable": d + dots,
    "dots_attention": d + dots + attn,
    "offload": d,
    "none": everything,
  }[cfg.remat]
  host = dots if cfg.remat == "offload" else 0
  return saved, host, WORKING_FACTOR * everything


# Backward working set of one block, in multiples of its forward intermediates.
WORKING_FACTOR = 4


def estimate(
  cfg: RunConfig,
  num_devices: int,
  *,
  frames_per_row: int | None = None,
  loss_chunk: int = 2048,
  frozen: float = 0.0,
  weight_shards: int | None = None,
) -> Estimate:
  """Per-device bytes of one training step of `cfg` on `num_devices` devices.

  Args:
    cfg: the run (model, mesh, data.seq_len and batch_size).
    num_devices: devices in the mesh.
    frames_per_row: frames the tower encodes per row (default the data config's capacity).
    loss_chunk: tokens per LM-head chunk (`lcv.models.loss.chunked_cross_entropy`).
    frozen: fraction of parameters frozen (no gradient kept, no optimizer state).
    weight_shards: ways each weight is split (default fsdp * context * tensor, the rules table);
      1 models replicated weights.
  """
  vlm, data = cfg.model, cfg.train.data
  dec = vlm.decoder
  axes = _axis_sizes(cfg.mesh, num_devices)
  w_shards = weight_shards or axes["fsdp"] * axes["context"] * axes["tensor"]
  rows = max(data.batch_size // (axes["data"] * axes["fsdp"]), 1)
  tokens = rows * data.seq_len / axes["context"]
  p_bytes, c_bytes = _bytes(dec.param_dtype), _bytes(dec.dtype)

  n_params = decoder_lib.param_count(dec) + vision_params(vlm)
  trainable = n_params * (1 - frozen)
  params = n_params * p_bytes / w_shards
  grads = trainable * p_bytes / w_shards
  # AdamW moments, plus the update's float32 temporaries (clipped grads and updates).
  optimizer = 2 * 4 * trainable / w_shards
  update = 2 * 4 * trainable / w_shards

  saved, host, working = layer_residuals(dec)
  attn_stats = 4 * dec.num_heads * 2  # float32 lse + row max per query head
  saved_b = dec.num_layers * tokens * (saved * c_bytes + attn_stats)
  host_b = dec.num_layers * tokens * host * c_bytes
  # The embeddings in, the final hidden states and their gradient (float32 at the boundary).
  stream = tokens * dec.embed_dim * (2 * c_bytes + 4)
  working_b = tokens * working * c_bytes / axes["tensor"] + stream + update
  if axes["context"] > 1:
    # Ring attention's backward (lcv.parallel.ring_attention) holds the rotating K/V block and
    # its float32 dK/dV accumulators twice (the block in hand and the one arriving), plus the
    # float32 dQ accumulator and the merged output of the forward it recomputes.
    kv = tokens * dec.num_kv_heads * dec.head_dim
    q = tokens * dec.num_heads * dec.head_dim
    working_b += (2 * kv * (2 * c_bytes + 2 * 4) + 2 * q * 4) / axes["tensor"]

  chunk = min(loss_chunk, data.seq_len)
  # Plus the fused schedule's float32 dW sum, held from the loss to the optimizer update.
  loss = 3 * rows * chunk * dec.vocab_size * 4 / axes["tensor"]
  loss += dec.embed_dim * dec.vocab_size * 4 / w_shards

  vision = 0.0
  frames = 0
  if vlm.vision is not None:
    v = vlm.vision
    frames = frames_per_row or max(data.frames_per_row, 0) or data.seq_len // vlm.frame_tokens
    v_tokens = v.grid**2 + int(v.class_token)
    v_bytes = _bytes(v.dtype)
    per_frame_saved = v.num_layers_run * v_tokens * v.width * v_bytes
    ctx = axes["context"]  # the device's rows' frames are further split over context
    chunk_frames = -(-min(v.frame_chunk, rows * frames) // ctx)
    v_working = chunk_frames * v_tokens * 2 * (4 * v.width + v.mlp) * v_bytes
    pixels = rows * frames * v.image_size**2 * v.channels * 4  # normalised float32 copy
    spliced = rows * frames * vlm.frame_tokens * dec.embed_dim * c_bytes
    vision = rows * frames * per_frame_saved / ctx + v_working + pixels + spliced

  # ids, targets, weights, visual slots, segment ids, modality, positions, mask lo/hi/index.
  batch = rows * data.seq_len * 10 * 4 / axes["context"]
  if vlm.vision is not None:
    batch += rows * frames * vlm.vision.image_size**2 * vlm.vision.channels
  return Estimate(params, grads, optimizer, saved_b, working_b, loss, vision, batch, host_b)


def example_host_batch(vlm: VLMConfig, seq_len: int, batch_size: int, frames: int, seed: int = 0):
  """A host batch in the pipeline's format (`lcv.data.pipeline`): each row one sample of text,
  a `frames`-frame video and text filling `seq_len`; random ids and pixels. For measuring and
  benchmarking steps at lengths the synthetic packer would fill with thousands of samples."""
  n_tok = vlm.frame_tokens
  visual = frames * n_tok
  if visual + 2 > seq_len:
    raise ValueError(f"{frames=} x {n_tok} tokens per frame leave no text in {seq_len=}")
  pre = (seq_len - visual) // 8 or 1
  chunks = [
    layout_lib.Text(pre),
    layout_lib.Video(frames, n_tok),
    layout_lib.Text(seq_len - visual - pre),
  ]
  lay = layout_lib.pack([chunks] * batch_size, seq_len, num_rows=batch_size)
  rng = np.random.default_rng(seed)
  vocab = min(vlm.decoder.vocab_size, 256)
  tokens = rng.integers(3, vocab, (batch_size, seq_len)).astype(np.int32)
  text = np.asarray(lay.modality) == layout_lib.TEXT
  targets = np.zeros_like(tokens)
  targets[:, :-1] = tokens[:, 1:]
  weights = np.zeros(tokens.shape, np.float32)
  weights[:, :-1] = text[:, 1:]
  size = vlm.vision.image_size if vlm.vision is not None else 1
  pixels = rng.integers(0, 256, (batch_size, max(frames, 1), size, size, 3), dtype=np.uint8)
  row_id = np.stack([np.arange(batch_size), np.zeros(batch_size, np.int64)], 1)
  return {
    "layout": lay, "tokens": tokens, "targets": targets, "weights": weights, "frames": pixels,
    "row_id": row_id,
  }  # fmt: skip


def compiled_step(task, cfg: RunConfig, mesh, host: dict):
  """(compiled train step, setup, placed batch) of `task` on `mesh` for one host batch."""
  from lcv.data import feeding
  from lcv.train import state as state_lib
  from lcv.train import step as step_lib

  setup = state_lib.setup(task.model_fn, cfg.train.optimizer, cfg.train.steps, mesh, task.rules)
  slots = feeding.host_slots(mesh, cfg.train.data.batch_size)
  batch = feeding.to_device(task.inputs_fn(host), mesh, slots, cfg.train.data.batch_size)
  train_step = step_lib.make_train_step(
    setup.graphdef, setup.tx, task.loss_fn, grad_accum=cfg.train.grad_accum,
    schedules=setup.schedules,
  )  # fmt: skip
  with state_lib.scope(mesh, task.rules):
    jitted = step_lib.jit_train_step(train_step, setup)
    abstract_batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch
    )
    compiled = jitted.lower(setup.abstract, abstract_batch).compile()
  return compiled, setup, batch


def analysis(compiled) -> dict[str, float]:
  """Bytes from `compiled.memory_analysis()` (per device), and the step's peak: arguments +
  outputs - aliased (donated) + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    raise ValueError("this backend's compiled executable reports no memory_analysis()")
  out = {
    name: float(getattr(m, f"{name}_size_in_bytes", 0) or 0)
    for name in ("argument", "output", "alias", "temp", "generated_code", "host_temp")
  }
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def measure(task, cfg: RunConfig, mesh, host: dict) -> dict[str, float]:
  """`analysis` of the compiled train step of `task` for the host batch `host`."""
  compiled, _, _ = compiled_step(task, cfg, mesh, host)
  return analysis(compiled)


def fits(estimate_: Estimate, device_bytes: float, headroom: float = 0.9) -> bool:
  """Whether the estimated peak fits `headroom` of a device's memory."""
  return estimate_.total <= headroom * device_bytes


def human(n: float) -> str:
  """Bytes as GiB / MiB text."""
  return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 2**20:.1f} MiB"
