"""`attend`: one attention function, many implementations (DESIGN section 3).

Every implementation computes the same masked softmax attention; they differ in where they run
and what they support:

  xla          `lcv.kernels.blockwise`: plain jnp online softmax, any platform, returns lse.
  cudnn        `jax.nn.dot_product_attention(implementation="cudnn")`: GPU only, and only for
               masks that are plain causal with trailing padding (query/key lengths), or full
               (every query sees every key: a vision tower's frames).
  pallas_gpu   `lcv.kernels.gpu`: the Hopper Mosaic GPU kernels (`flash_hopper`) on sm_90 with
               bf16/fp16 and head dim 64/128/256, else the portable `flash_gpu` (interpret mode
               off GPU).
  pallas_tpu   `lcv.kernels.flash_tpu` (interpret mode off TPU).
  ring, ulysses, hybrid, all_gather
               `lcv.parallel.ring_attention.sequence_parallel_attention`: q/k/v are global arrays
               sharded along the sequence over the mesh's `context` axis.
  auto         pallas_gpu on GPU (cudnn when asked with prefer_cudnn=True and the mask allows),
               pallas_tpu on TPU, xla elsewhere or when the Pallas module is not installed.

Backends are imported when first used, so importing this module pulls in no kernel.

Axis letters: B batch, T query length, S key length, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcv import masks
from lcv.kernels import blockwise

# name -> fn(q, k, v, q_mask, kv_mask, *, scale, **impl_kwargs) -> o or (o, lse).
IMPLEMENTATIONS: dict[str, Callable] = {}

SEQUENCE_PARALLEL = ("ring", "ulysses", "hybrid", "all_gather")


def register(name: str):
  """Decorator adding an implementation to `IMPLEMENTATIONS` under `name`."""

  def add(fn):
    IMPLEMENTATIONS[name] = fn
    return fn

  return add


@register("xla")
def _xla(q, k, v, q_mask, kv_mask, *, scale, **kwargs):
  return blockwise.attention(q, k, v, q_mask.lo, q_mask.hi, kv_mask.index, scale=scale, **kwargs)


@register("pallas_gpu")
def _pallas_gpu(q, k, v, q_mask, kv_mask, *, scale, **kwargs):
  from lcv.kernels import gpu

  kwargs.setdefault("interpret", jax.default_backend() != "gpu")
  return gpu.attention(q, k, v, q_mask.lo, q_mask.hi, kv_mask.index, scale=scale, **kwargs)


@register("pallas_tpu")
def _pallas_tpu(q, k, v, q_mask, kv_mask, *, scale, **kwargs):
  from lcv.kernels import flash_tpu

  kwargs.setdefault("interpret", jax.default_backend() != "tpu")
  return flash_tpu.attention(q, k, v, q_mask.lo, q_mask.hi, kv_mask.index, scale=scale, **kwargs)


def _sequence_parallel(strategy: str):
  def impl(q, k, v, q_mask, kv_mask, *, scale, **kwargs):
    from lcv.parallel import ring_attention

    return ring_attention.sequence_parallel_attention(
      q, k, v, q_mask, kv_mask, strategy=strategy, scale=scale, **kwargs
    )

  return impl


for _name in SEQUENCE_PARALLEL:
  register(_name)(_sequence_parallel(_name))


def causal_lengths(q_mask: masks.TokenMask, kv_mask: masks.TokenMask):
  """Query lengths int32[B] if the mask is plain causal with trailing padding, else None.

  That is the only mask cuDNN takes without a dense bias: in every row the first L tokens are one
  segment in natural order (lo = 0, hi = own index) and the rest are padding (empty interval).
  Needs concrete (not traced) masks.
  """
  lo, hi, q_idx = (np.asarray(x) for x in q_mask)
  k_idx = np.asarray(kv_mask.index)
  t = lo.shape[1]
  if not (q_idx == np.arange(t)).all() or not (k_idx == np.arange(k_idx.shape[1])).all():
    return None
  valid = hi >= lo
  lengths = valid.sum(axis=1)
  prefix = np.arange(t)[None, :] < lengths[:, None]
  if not (valid == prefix).all() or not ((lo == 0) & (hi == q_idx) | ~valid).all():
    return None
  return lengths.astype(np.int32)


def _is_traced(*token_masks: masks.TokenMask) -> bool:
  """True if any mask array is abstract (under jit) and so cannot be inspected on the host."""
  try:
    for m in token_masks:
      for x in m:
        np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return True
  return False


def full_mask(q_mask: masks.TokenMask, kv_mask: masks.TokenMask) -> bool:
  """True if every query may see every key (one bidirectional segment, no padding), the vision
  tower's mask. Needs concrete (not traced) masks."""
  lo, hi, _ = (np.asarray(x) for x in q_mask)
  k_idx = np.asarray(kv_mask.index)
  s = k_idx.shape[1]
  return bool((k_idx == np.arange(s)).all() and (lo == 0).all() and (hi == s - 1).all())


@register("cudnn")
def _cudnn(q, k, v, q_mask, kv_mask, *, scale, causal_only: bool = False, full_only: bool = False):
  """cuDNN flash attention for plain causal masks with padding, or full masks; ValueError for
  anything else.

  Under jit the masks are traced and cannot be checked: pass causal_only=True to assert that they
  are plain causal (segment 1 then padding, natural order), or full_only=True that every query
  sees every key; else this raises.
  """
  if causal_only and full_only:
    raise ValueError("pass at most one of causal_only=True and full_only=True")
  traced = _is_traced(q_mask, kv_mask)
  full = full_only or (not traced and full_mask(q_mask, kv_mask))
  if full:
    lengths = None
  elif traced:
    if not causal_only:
      raise ValueError(
        "impl='cudnn' must check that the mask is plain causal or full, but the mask is traced "
        "(under jit): pass causal_only=True or full_only=True if it is, or use "
        "impl='pallas_gpu' or 'xla'"
      )
    lengths = jnp.sum(q_mask.hi >= q_mask.lo, axis=1, dtype=jnp.int32)
  else:
    lengths = causal_lengths(q_mask, kv_mask)
    if lengths is None:
      raise ValueError(
        "impl='cudnn' supports plain causal masks with trailing padding and full masks only; "
        "frame_bidirectional masks / packing (several segments per row) / reordered tokens need "
        "impl='pallas_gpu' or 'xla'"
      )
  if jax.default_backend() != "gpu":
    raise ValueError(
      f"impl='cudnn' needs a CUDA GPU, the platform is {jax.default_backend()!r}: use impl='xla'"
    )
  if full:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  o = jax.nn.dot_product_attention(
    q,
    k,
    v,
    scale=scale,
    is_causal=True,
    query_seq_lengths=lengths,
    key_value_seq_lengths=jnp.minimum(lengths, k.shape[1]),
    implementation="cudnn",
  )
  # Padding rows: zeros, as every other implementation returns.
  valid = jnp.arange(q.shape[1])[None, :] < jnp.asarray(lengths)[:, None]
  return jnp.where(valid[:, :, None, None], o, 0).astype(q.dtype)


def _auto(q_mask, kv_mask, prefer_cudnn: bool) -> str:
  platform = jax.default_backend()
  if platform == "gpu":
    if prefer_cudnn and not _is_traced(q_mask, kv_mask):
      if causal_lengths(q_mask, kv_mask) is not None or full_mask(q_mask, kv_mask):
        return "cudnn"
    name = "pallas_gpu"
  elif platform == "tpu":
    name = "pallas_tpu"
  else:
    return "xla"
  module = "lcv.kernels.flash_gpu" if name == "pallas_gpu" else "lcv.kernels.flash_tpu"
  return name if importlib.util.find_spec(module) is not None else "xla"


def _masks(t, s, segment_ids, frame_ids, frame_bidirectional, mask, kv_mask):
  """(q_mask, kv_mask) TokenMasks from ids or from the given masks."""
  if mask is None:
    if segment_ids is None:
      raise ValueError("attend needs the token layout: pass segment_ids (and frame_ids) or mask")
    if t != s:
      raise ValueError(
        f"segment_ids/frame_ids describe one sequence (T == S), but T={t} != S={s}: pass "
        "mask= (queries) and kv_mask= (keys) TokenMasks instead"
      )
    segment_ids = jnp.asarray(segment_ids)
    if frame_ids is None:
      frame_ids = jnp.full(segment_ids.shape, -1, jnp.int32)
    if jnp.shape(frame_ids) != segment_ids.shape:
      raise ValueError(f"{jnp.shape(frame_ids)=} must equal {segment_ids.shape=}")
    mask = masks.token_mask(segment_ids, frame_ids, frame_bidirectional)
  elif segment_ids is not None or frame_ids is not None:
    raise ValueError("pass either segment_ids/frame_ids or mask, not both")
  if kv_mask is None:
    if t != s:
      raise ValueError(f"keys differ from queries (T={t} != S={s}): pass kv_mask=, the keys' mask")
    kv_mask = mask
  return mask, kv_mask


def logn_scale(lo: jax.Array, hi: jax.Array, base_len: int) -> jax.Array:
  """Per-query logit multiplier max(1, log n / log base_len), n = the query's allowed keys.

  LogN-scaling (Chiang & Cholak 2022, arXiv 2202.12172; Qwen, arXiv 2309.16609 section 2.3):
  a query spreading softmax mass over n keys sees its largest weight shrink like 1/n, so a model
  trained on at most `base_len` keys loses its sharpest lookups on longer inputs. Multiplying the
  logits by log n / log base_len keeps that entropy roughly constant. Queries with at most
  base_len keys get exactly 1: with base_len = the training length a trained model is unchanged
  on training-length inputs (Qwen's inference-time use); with a shorter base_len the model
  trains with the factor (as Scalable-Softmax, arXiv 2501.19399). n = hi - lo + 1 counts the
  interval of DESIGN section 2: frame blocks and packing are counted exactly, in any token order.

  Args:
    lo, hi: int32[B, T] the queries' key intervals (`masks.TokenMask`); rows without keys have
      hi < lo and get 1.
    base_len: the key count from which queries are scaled (>= 2): the training length, or
      shorter to train with the factor.

  Returns:
    float32[B, T].
  """
  if base_len < 2:
    raise ValueError(f"{base_len=} must be >= 2 (log 1 = 0); e.g. the training length")
  n = jnp.maximum(hi - lo + 1, 1).astype(jnp.float32)
  return jnp.maximum(jnp.log(n) / np.log(base_len), 1.0)


def attend(
  q,
  k,
  v,
  *,
  segment_ids=None,
  frame_ids=None,
  frame_bidirectional: bool = True,
  mask: masks.TokenMask | None = None,
  kv_mask: masks.TokenMask | None = None,
  impl: str = "auto",
  scale: float | None = None,
  return_lse: bool = False,
  **impl_kwargs,
):
  """Masked softmax attention with the one mask of DESIGN section 2.

  Args:
    q: [B, T, N, H] queries; k, v: [B, S, K, H] keys/values, N % K == 0 (GQA), one dtype.
    segment_ids, frame_ids: int[B, S] token layout of the sequence (T == S; keys = queries).
      frame_ids defaults to all text (-1).
    frame_bidirectional: tokens of one frame see each other (TC-LLaVA block-causal mask).
    mask: `masks.TokenMask` of the queries instead of the ids (e.g. zig-zag reordered data).
    kv_mask: `masks.TokenMask` of the keys when they differ from the queries (chunked prefill,
      decode); only its `index` (global key positions) is used.
    impl: "auto" or one of `IMPLEMENTATIONS`.
    scale: softmax scale, default H ** -0.5.
    return_lse: also return the log-sum-exp, float32[B, N, T] (natural log, scale applied).
    **impl_kwargs: passed to the implementation (block sizes, mesh, causal_only, ...);
      prefer_cudnn=True lets impl="auto" pick cuDNN on GPU when the mask allows.

  Returns:
    o: [B, T, N, H] in q.dtype, zeros on rows with no allowed key; or (o, lse) if return_lse.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if impl != "auto" and impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown {impl=}; valid: {['auto', *sorted(IMPLEMENTATIONS)]}")
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"q must be [B, T, N, H] and k, v [B, S, K, H]; got {q.shape=}, {k.shape=}")
  prefer_cudnn = impl_kwargs.pop("prefer_cudnn", False)
  # cuDNN must inspect the mask on the host: with concrete ids, build it eagerly even under jit.
  host = impl == "cudnn" or (impl == "auto" and prefer_cudnn)
  with jax.ensure_compile_time_eval() if host else contextlib.nullcontext():
    q_mask, kv_mask = _masks(
      q.shape[1], k.shape[1], segment_ids, frame_ids, frame_bidirectional, mask, kv_mask
    )
  blockwise.check_inputs(q, k, v, q_mask.lo, q_mask.hi, kv_mask.index)
  if q_mask.index.shape != q_mask.lo.shape:
    raise ValueError(f"{q_mask.index.shape=} must equal {q_mask.lo.shape=} (the queries' [B, T])")
  if impl == "auto":
    impl = _auto(q_mask, kv_mask, prefer_cudnn)
  out = IMPLEMENTATIONS[impl](q, k, v, q_mask, kv_mask, scale=scale, **impl_kwargs)
  o, lse = out if isinstance(out, tuple) else (out, None)
  if not return_lse:
    return o
  if lse is None:
    raise ValueError(f"{impl=} does not return the log-sum-exp; use impl='xla' or a Pallas impl")
  return o, lse
