"""A small stand-alone task for the training-machinery tests: one masked attention layer over
token + patch embeddings, so losses depend on frames, packing and the mask, at CPU-test size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcv import masks
from lcv.data import media
from lcv.parallel import rules as rules_lib
from lcv.train import loop

VOCAB, D, PATCH, IMAGE = 260, 32, 8, 16
TOKENS_PER_FRAME = (IMAGE // PATCH) ** 2


def _w(rngs, shape, names):
  init = nnx.with_partitioning(nnx.initializers.normal(0.05), names)
  return nnx.Param(init(rngs.params(), shape))


class TinyLM(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = _w(rngs, (VOCAB, D), ("vocab", "embed"))
    self.patch = _w(rngs, (PATCH * PATCH * 3, D), ("patches", "embed"))
    self.qkv = _w(rngs, (3, D, D), (None, "embed", "mlp"))
    self.mlp = _w(rngs, (D, 2 * D), ("embed", "mlp"))
    self.out = _w(rngs, (2 * D, D), ("mlp", "embed"))
    self.head = _w(rngs, (D, VOCAB), ("embed", "vocab"))

  def __call__(self, b):
    x = self.embed[...][b["tokens"]]
    vis = jnp.einsum("BPC,CD->BPD", b["patches"], self.patch[...])
    slot = b["visual_slot"]
    picked = jnp.take_along_axis(vis, jnp.maximum(slot, 0)[..., None], axis=1)
    x = jnp.where(slot[..., None] >= 0, picked, x)
    q, k, v = (jnp.einsum("BSD,DE->BSE", x, w) for w in self.qkv[...])
    allow = masks.allowed(b["lo"], b["hi"], b["index"])
    s = jnp.where(allow, jnp.einsum("BTE,BSE->BTS", q, k) / np.sqrt(D), -1e9)
    x = x + jnp.einsum("BTS,BSE->BTE", jax.nn.softmax(s, -1), v)
    x = x + jnp.einsum("BSF,FD->BSD", jax.nn.gelu(x @ self.mlp[...]), self.out[...])
    return x @ self.head[...]


def loss_fn(model, b):
  logits = model(b).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
  return jnp.sum(nll * b["weights"]), jnp.sum(b["weights"]), {}


def inputs_fn(host):
  lay = host["layout"]
  lo, hi = masks.intervals(lay.segment_ids, lay.frame_ids, True)
  vis = lay.modality == 1
  slot = np.where(vis, np.cumsum(vis, axis=1) - 1, -1).astype(np.int32)
  b, r = host["frames"].shape[:2]
  patches = media.patchify(host["frames"].reshape(b * r, IMAGE, IMAGE, 3), PATCH)
  patches = patches.reshape(b, r * TOKENS_PER_FRAME, -1).astype(np.float32) / 255.0
  return {
    "tokens": host["tokens"],
    "targets": host["targets"],
    "weights": host["weights"],
    "visual_slot": slot,
    "lo": np.asarray(lo),
    "hi": np.asarray(hi),
    "index": np.broadcast_to(np.arange(lo.shape[1], dtype=np.int32), lo.shape).copy(),
    "patches": patches,
  }


def task() -> loop.Task:
  return loop.Task(
    model_fn=lambda: TinyLM(nnx.Rngs(0)),
    loss_fn=loss_fn,
    inputs_fn=inputs_fn,
    tokens_per_frame=TOKENS_PER_FRAME,
    rules=rules_lib.RULES,
  )
