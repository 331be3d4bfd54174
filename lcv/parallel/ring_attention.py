"""Attention over a sequence sharded on the `context` mesh axis: ring, Ulysses, hybrid, all-gather.

Ring attention (Liu et al., arXiv 2310.01889), as we need it for long-context VLMs:
- Each device keeps its query shard and passes its K/V shard, with the keys' *global* indices, to
  the next device (`lax.ppermute`). The send for step i + 1 is issued before step i's block is
  computed, with no data dependency between them, so the transfer overlaps the compute; the last
  step sends nothing (n - 1 hops). K/V travel in their own dtype (bf16 on the wire; never cast to
  float32 before the ring, unlike LWM's `float32_logits`).
- Each step returns (o_s, lse_s) from a blockwise backend (`lcv.kernels.*`); they are merged in
  float32: lse = logaddexp(lse, lse_s), o = o exp(lse_old - lse) + o_s exp(lse_s - lse)
  (notes: pallas kernels §5.1). Rows with no allowed key keep lse = -inf and o = 0, never NaN.
- Masks are intervals of global key indices (`lcv.masks`): a step whose keys lie outside every
  query interval is skipped with `lax.cond` (whole-step check; the backend skips tiles), and
  frames of any length (257 tokens) are exact because nothing is derived from chunk alignment.
- Custom VJP: the backward recomputes each step from the *final* (o, lse). dQ accumulates locally
  in float32; the dK/dV accumulator of a block travels the ring one hop behind the block, sent at
  the start of a step while that step's backward computes, and arrives at the block's owner after
  the last step.

Causal load balance comes from the token order (`lcv.parallel.context`, zig-zag), not from here.

Entries: `sequence_parallel_attention` (used by `lcv.attention.attend`; global arrays already in
device token order); `ring_attention` (self-contained, natural token order); `attention_shard` (the
per-device function for code already inside `shard_map`); `sharded_decode_attention` (per-device
partial attention over a sequence-sharded KV cache, combined by lse; no cache rotation).
Axis letters: B batch, T query length, S key length, N q-heads, K kv-heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from lcv import masks
from lcv.kernels import name_residuals
from lcv.parallel import context, rules, ulysses

STRATEGIES = ("ring", "ulysses", "hybrid", "all_gather")
_BACKENDS = {
  "xla": "lcv.kernels.blockwise",
  "pallas_gpu": "lcv.kernels.gpu",
  "pallas_tpu": "lcv.kernels.flash_tpu",
}
_NEG_INF = float("-inf")


def backend_module(backend="auto"):
  """The per-step kernel module (attention / forward / backward, `docs/internals.md`).

  "auto" is the Pallas kernel of the platform (GPU, TPU) when it imports, else the xla blockwise
  path (CPU). A module-like object with those three functions is used as given.
  """
  if not isinstance(backend, str):
    return backend
  if backend == "auto":
    platform = jax.default_backend()
    backend = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "xla")
    try:
      return importlib.import_module(_BACKENDS[backend])
    except ImportError:
      backend = "xla"
  if backend not in _BACKENDS:
    raise ValueError(f"{backend=} must be 'auto' or one of {sorted(_BACKENDS)}")
  return importlib.import_module(_BACKENDS[backend])


# --------------------------------------------------------------------------- ring


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static ring description (a custom_vjp non-differentiable argument)."""

  axis_name: str
  axis_size: int
  stride: int  # hop distance: 1 for a plain ring, the Ulysses group size for the 2-D hybrid
  scale: float | None
  backend: Any
  kw: tuple

  @property
  def steps(self) -> int:
    return self.axis_size // self.stride

  def send(self, x):
    perm = [(i, (i + self.stride) % self.axis_size) for i in range(self.axis_size)]
    return jax.tree.map(lambda a: lax.ppermute(a, self.axis_name, perm), x)

  def forward(self, *args):
    return self.backend.forward(*args, scale=self.scale, **dict(self.kw))

  def backward(self, *args):
    return self.backend.backward(*args, scale=self.scale, **dict(self.kw))


def _meets(q_lo, q_hi, k_idx):
  """Scalar bool: may any query row see any key of this block? (bound check on the key range)."""
  kmin = jnp.min(k_idx, axis=1)[:, None]
  kmax = jnp.max(k_idx, axis=1)[:, None]
  return jnp.any((q_lo <= kmax) & (q_hi >= kmin) & (q_lo <= q_hi))


def _merge(o, lse, o_s, lse_s):
  """Merge normalised partial outputs by their lse, in float32. o: [B, T, N, H], lse: [B, N, T]."""
  new = jnp.logaddexp(lse, lse_s)
  safe = jnp.where(jnp.isfinite(new), new, 0.0)  # both -inf: weights exp(-inf) = 0, not NaN

  def weight(x):
    return jnp.einsum("BNT->BTN", jnp.exp(x - safe))[..., None]

  return o * weight(lse) + o_s.astype(jnp.float32) * weight(lse_s), new


def _steps(step, carry, count: int):
  """Run `step` (carry -> carry) `count` times as one lax.scan: one compiled copy of a ring step
  however long the ring (the first / last steps, which send less, are peeled by the callers)."""
  if count <= 0:
    return carry
  return lax.scan(lambda c, _: (step(c), None), carry, None, length=count)[0]


def _ring_forward(cfg: _Ring, q, k, v, q_lo, q_hi, k_idx):
  b, t, n, _ = q.shape

  def step(carry, send: bool):
    block, o, lse = carry
    # Issue the next hop first: it does not depend on this step's compute, so they overlap.
    upcoming = cfg.send(block) if send else block
    k_s, v_s, idx_s = block
    o_s, lse_s = lax.cond(
      _meets(q_lo, q_hi, idx_s),
      lambda: cfg.forward(q, k_s, v_s, q_lo, q_hi, idx_s),
      lambda: (jnp.zeros(q.shape, q.dtype), jnp.full((b, n, t), _NEG_INF, jnp.float32)),
    )
    return (upcoming, *_merge(o, lse, o_s, lse_s))

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((b, n, t), _NEG_INF, jnp.float32))
  carry = ((k, v, k_idx), *init)
  carry = _steps(lambda c: step(c, send=True), carry, cfg.steps - 1)
  _, o, lse = step(carry, send=False)  # the last block: nothing left to send
  return o.astype(q.dtype), lse


def _ring_backward(cfg: _Ring, res, do):
  q, k, v, q_lo, q_hi, k_idx, o, lse = res

  def step(carry, send_block: bool, send_acc: bool):
    block, acc, dq = carry
    upcoming = cfg.send(block) if send_block else block
    # The accumulator of the block computed last step goes to the device that computes that block
    # now; sent before this step's backward, which it does not depend on.
    incoming = cfg.send(acc) if send_acc else acc
    k_s, v_s, idx_s = block
    dq_s, dk_s, dv_s = lax.cond(
      _meets(q_lo, q_hi, idx_s),
      lambda: cfg.backward(q, k_s, v_s, o, lse, do, q_lo, q_hi, idx_s),
      lambda: (jnp.zeros(q.shape, q.dtype), jnp.zeros_like(k_s), jnp.zeros_like(v_s)),
    )
    acc = (incoming[0] + dk_s.astype(jnp.float32), incoming[1] + dv_s.astype(jnp.float32))
    return upcoming, acc, dq + dq_s.astype(jnp.float32)

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  carry = ((k, v, k_idx), zeros, jnp.zeros(q.shape, jnp.float32))
  many = cfg.steps > 1
  carry = step(carry, send_block=many, send_acc=False)  # own block; nothing accumulated yet
  carry = _steps(lambda c: step(c, send_block=True, send_acc=True), carry, cfg.steps - 2)
  if many:
    carry = step(carry, send_block=False, send_acc=True)
  _, acc, dq = carry
  if many:
    acc = cfg.send(acc)  # the last hop home: device i now holds the gradient of its own K/V
  return dq.astype(q.dtype), acc[0].astype(k.dtype), acc[1].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Ring, q, k, v, q_lo, q_hi, k_idx):
  return _ring_forward(cfg, q, k, v, q_lo, q_hi, k_idx)[0]


def _ring_fwd(cfg: _Ring, q, k, v, q_lo, q_hi, k_idx):
  o, lse = name_residuals(*_ring_forward(cfg, q, k, v, q_lo, q_hi, k_idx))
  return o, (q, k, v, q_lo, q_hi, k_idx, o, lse)


def _ring_bwd(cfg: _Ring, res, do):
  dq, dk, dv = _ring_backward(cfg, res, do)
  ints = tuple(np.zeros(x.shape, jax.dtypes.float0) for x in res[3:6])
  return (dq, dk, dv, *ints)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention_shard(
  q,
  k,
  v,
  q_lo,
  q_hi,
  k_idx,
  *,
  axis_name: str,
  axis_size: int,
  stride: int = 1,
  scale=None,
  backend="auto",
  **backend_kw,
):
  """Per-device ring attention (call inside `jax.shard_map` over `axis_name`); differentiable.

  Args:
    q: [B, T_local, N, H]; k, v: [B, S_local, K, H] this device's shards (N % K == 0).
    q_lo, q_hi: int32[B, T_local] global key intervals of the local query rows.
    k_idx: int32[B, S_local] global indices of the local keys.
    axis_name, axis_size: the ring's mesh axis and its size n.
    stride: hop distance; the ring visits n / stride blocks (the hybrid rings over groups).
    scale: softmax scale, default H ** -0.5.
    backend: per-step kernel ("auto" | "xla" | "pallas_gpu" | "pallas_tpu" | module).
    **backend_kw: passed to the backend (e.g. block_q, block_k).

  Returns:
    o: [B, T_local, N, H] in q.dtype.
  """
  if axis_size % stride:
    raise ValueError(f"ring {stride=} must divide {axis_size=}")
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  cfg = _Ring(
    axis_name, axis_size, stride, scale, backend_module(backend), tuple(sorted(backend_kw.items()))
  )
  return _ring(cfg, q, k, v, *(jnp.asarray(x, jnp.int32) for x in (q_lo, q_hi, k_idx)))


# --------------------------------------------------------------------------- dispatch


def _local(backend, scale, backend_kw):
  module = backend_module(backend)

  def attend(q, k, v, q_lo, q_hi, k_idx):
    return module.attention(q, k, v, q_lo, q_hi, k_idx, scale=scale, **backend_kw)[0]

  return attend


def attention_shard(
  q,
  k,
  v,
  q_lo,
  q_hi,
  k_idx,
  *,
  strategy: str = "ring",
  axis_name: str = "context",
  axis_size: int,
  ulysses_size: int | None = None,
  scale=None,
  backend="auto",
  **backend_kw,
):
  """Per-device sequence-parallel attention by strategy name; the function the model calls
  inside its own `shard_map`. Arguments as `ring_attention_shard`; `ulysses_size` is the Ulysses
  group of "hybrid" (ring across axis_size / ulysses_size groups). Returns o [B, T_local, N, H].
  """
  ring = functools.partial(
    ring_attention_shard, axis_name=axis_name, axis_size=axis_size, scale=scale, backend=backend,
    **backend_kw,
  )  # fmt: skip
  if strategy == "ring":
    return ring(q, k, v, q_lo, q_hi, k_idx)
  if strategy == "hybrid":
    group = _hybrid_group(axis_size, ulysses_size)
    return ulysses.ulysses_attention_shard(
      q, k, v, q_lo, q_hi, k_idx, axis_name=axis_name, axis_size=axis_size,
      inner=functools.partial(ring, stride=group), group=group,
    )  # fmt: skip
  local = _local(backend, scale, backend_kw)
  if strategy == "ulysses":
    return ulysses.ulysses_attention_shard(
      q, k, v, q_lo, q_hi, k_idx, axis_name=axis_name, axis_size=axis_size, inner=local
    )
  if strategy == "all_gather":
    return ulysses.all_gather_attention_shard(
      q, k, v, q_lo, q_hi, k_idx, axis_name=axis_name, local=local
    )
  raise ValueError(f"{strategy=} must be one of {STRATEGIES}")


def _hybrid_group(axis_size: int, ulysses_size: int | None) -> int:
  if ulysses_size is None:
    raise ValueError("strategy='hybrid' needs ulysses_size (the Ulysses group, dividing context)")
  if ulysses_size < 1 or axis_size % ulysses_size:
    raise ValueError(f"{ulysses_size=} must be a positive divisor of the context size {axis_size}")
  return ulysses_size


def _mesh_or_ambient(mesh):
  if mesh is not None:
    return mesh
  ambient = jax.sharding.get_abstract_mesh()
  if ambient is None or ambient.empty:
    raise ValueError("no mesh: pass mesh=... or set one with jax.set_mesh(mesh)")
  return ambient


def _axes(entry) -> tuple[str, ...]:
  """One PartitionSpec entry as a tuple of mesh axis names."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _size(mesh, entry) -> int:
  return int(np.prod([mesh.shape[a] for a in _axes(entry)]))


def _specs(mesh, axis_name: str, batch: int, heads: tuple[int, ...]):
  """(batch axes, head axis) for shard_map: rules' "batch" and "act_heads" where they divide."""
  if axis_name not in mesh.axis_names:
    raise ValueError(f"{axis_name=} is not an axis of the mesh {dict(mesh.shape)}")

  def usable(name, sizes):
    axes = tuple(a for a in _axes(rules.logical_to_spec((name,), mesh)[0]) if a != axis_name)
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if not axes or any(s % _size(mesh, axes) for s in sizes):
      return None
    return axes[0] if len(axes) == 1 else axes

  return usable("batch", (batch,)), usable("act_heads", heads)


def _check_length(name: str, length: int, n: int, axis_name: str) -> None:
  if length % n:
    raise ValueError(
      f"{name} length {length} must be a multiple of the {axis_name} size {n}; pad by "
      f"{-length % n} tokens (lcv.parallel.context.pad_to_multiple)"
    )


def sequence_parallel_attention(
  q,
  k,
  v,
  q_mask: masks.TokenMask,
  kv_mask: masks.TokenMask | None = None,
  *,
  strategy: str = "ring",
  scale=None,
  mesh=None,
  axis_name: str = "context",
  backend="auto",
  ulysses_size: int | None = None,
  **backend_kw,
):
  """Attention on global arrays sharded along the sequence over `axis_name` (device token order).

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H], in device token order (e.g. zig-zag), T and S multiples
      of the context size.
    q_mask: `TokenMask` of the query tokens (lo, hi, index int32[B, T]) in the same order.
    kv_mask: `TokenMask` of the key tokens; None means q_mask (self-attention). Only its `index`
      is used.
    strategy: "ring" | "ulysses" | "hybrid" | "all_gather".
    scale: softmax scale, default H ** -0.5.
    mesh: a Mesh / AbstractMesh; default the ambient one (`jax.set_mesh`).
    axis_name: the sequence mesh axis.
    backend: per-step kernel, see `backend_module`.
    ulysses_size: Ulysses group size for "hybrid".
    **backend_kw: kernel options (block_q, block_k, ...).

  Returns:
    o: [B, T, N, H] in q.dtype, sharded like q.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"{strategy=} must be one of {STRATEGIES}")
  kv_mask = q_mask if kv_mask is None else kv_mask
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[3] != k.shape[3]:
    raise ValueError(f"q [B, T, N, H] and k, v [B, S, K, H] expected; {q.shape=} {k.shape=}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads N={q.shape[2]} must be a multiple of kv heads K={k.shape[2]}")
  mesh_ = _mesh_or_ambient(mesh)
  b, t, n_heads, _ = q.shape
  batch_ax, head_ax = _specs(mesh_, axis_name, b, (n_heads, k.shape[2]))
  n = mesh_.shape[axis_name]
  _check_length("query", t, n, axis_name)
  _check_length("key", k.shape[1], n, axis_name)
  tensor = _size(mesh_, head_ax)
  heads_local, kv_local = n_heads // tensor, k.shape[2] // tensor
  if strategy == "ulysses":
    ulysses.check_heads(heads_local, kv_local, n)
  if strategy == "hybrid":
    ulysses.check_heads(heads_local, kv_local, _hybrid_group(n, ulysses_size), "hybrid Ulysses")
  act = P(batch_ax, axis_name, head_ax, None)
  tok = P(batch_ax, axis_name)
  fn = functools.partial(
    attention_shard, strategy=strategy, axis_name=axis_name, axis_size=n,
    ulysses_size=ulysses_size, scale=scale, backend=backend, **backend_kw,
  )  # fmt: skip
  sharded = jax.shard_map(
    fn, mesh=mesh, in_specs=(act, act, act, tok, tok, tok), out_specs=act, check_vma=False
  )
  ints = (jnp.asarray(x, jnp.int32) for x in (q_mask.lo, q_mask.hi, kv_mask.index))
  return sharded(q, k, v, *ints)


def ring_attention(
  q,
  k,
  v,
  *,
  segment_ids,
  frame_ids,
  frame_bidirectional: bool = True,
  mesh,
  axis_name: str = "context",
  load_balance: bool | str = True,
  strategy: str = "ring",
  scale=None,
  backend="auto",
  ulysses_size: int | None = None,
  **backend_kw,
):
  """Sequence-parallel attention on GLOBAL arrays in natural token order; returns natural order.

  Builds the `TokenMask` from the layout (DESIGN §2), reorders tokens for causal load balance
  (zig-zag when `load_balance` is True; or "striped" / "none"), runs `sequence_parallel_attention`
  and restores the natural order.

  Args:
    q: [B, S, N, H]; k, v: [B, S, K, H].
    segment_ids, frame_ids: int[B, S] (DESIGN §2).
    frame_bidirectional: tokens of one frame attend to each other (TC-LLaVA block-causal).
    mesh: the device mesh with `axis_name`.
    load_balance: True (zig-zag), False ("none"), or a `lcv.parallel.context` order name.
    strategy, scale, backend, ulysses_size, **backend_kw: see `sequence_parallel_attention`.

  Returns:
    o: [B, S, N, H] in q.dtype.
  """
  kind = {True: "zigzag", False: "none"}.get(load_balance, load_balance)
  for name, ids in (("segment_ids", segment_ids), ("frame_ids", frame_ids)):
    if tuple(np.shape(ids)) != tuple(q.shape[:2]):
      raise ValueError(f"{name} shape {np.shape(ids)} must be [B, S] = {tuple(q.shape[:2])}")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"{axis_name=} is not an axis of the mesh {dict(mesh.shape)}")
  perm = context.order_indices(q.shape[1], mesh.shape[axis_name], kind)
  mask = context.reorder(masks.token_mask(segment_ids, frame_ids, frame_bidirectional), perm)
  q, k, v = context.reorder((q, k, v), perm, axis=1)
  o = sequence_parallel_attention(
    q, k, v, mask, strategy=strategy, scale=scale, mesh=mesh, axis_name=axis_name,
    backend=backend, ulysses_size=ulysses_size, **backend_kw,
  )  # fmt: skip
  return context.reorder(o, context.inverse(perm), axis=1)


# --------------------------------------------------------------------------- decode


def decode_attention_shard(
  q, k, v, q_lo, q_hi, k_idx, *, axis_name: str, scale=None, backend="auto", **backend_kw
):
  """Per-device decode step over this device's slice of a sequence-sharded KV cache.

  Each device attends its own cache slice ((o, lse) from the backend); the partials are combined
  exactly across the axis: m = pmax(lse), w = exp(lse - m), o = psum(w o) / psum(w). One small
  all-reduce per layer instead of rotating the cache (notes: ring anchors §5.7).

  Args:
    q: [B, T, N, H] new queries (replicated over the axis).
    k, v: [B, S_local, K, H] this device's cache slice.
    q_lo, q_hi: int32[B, T] global key intervals of the queries (e.g. lo = 0, hi = position).
    k_idx: int32[B, S_local] global index of every cache slot (slots beyond hi are masked).

  Returns:
    o: [B, T, N, H] in q.dtype, identical on every device.
  """
  module = backend_module(backend)
  o, lse = module.forward(q, k, v, q_lo, q_hi, k_idx, scale=scale, **backend_kw)
  m = lax.pmax(lse, axis_name)
  w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))  # 0 where lse = -inf
  den = lax.psum(w, axis_name)
  num = lax.psum(o.astype(jnp.float32) * jnp.einsum("BNT->BTN", w)[..., None], axis_name)
  den = jnp.einsum("BNT->BTN", jnp.where(den > 0, den, 1.0))[..., None]
  return (num / den).astype(q.dtype)


def sharded_decode_attention(
  q,
  k_cache,
  v_cache,
  q_lo,
  q_hi,
  k_idx=None,
  *,
  scale=None,
  mesh=None,
  axis_name: str = "context",
  backend="auto",
  **backend_kw,
):
  """Decode attention on global arrays: q replicated, KV cache sharded along S over `axis_name`.

  Args:
    q: [B, T, N, H] (T = 1 for token-by-token decoding).
    k_cache, v_cache: [B, S, K, H], S a multiple of the axis size.
    q_lo, q_hi: int32[B, T] global key intervals of the queries.
    k_idx: int32[B, S] global index of each cache slot; default arange(S).
    scale, mesh, axis_name, backend, **backend_kw: as in `sequence_parallel_attention`.

  Returns:
    o: [B, T, N, H] in q.dtype.
  """
  mesh_ = _mesh_or_ambient(mesh)
  b, t, n_heads, _ = q.shape
  if k_cache.shape != v_cache.shape or k_cache.shape[0] != b or n_heads % k_cache.shape[2]:
    raise ValueError(
      f"q [B, T, N, H] and caches [B, S, K, H] expected; {q.shape=} {k_cache.shape=}"
    )
  batch_ax, head_ax = _specs(mesh_, axis_name, b, (n_heads, k_cache.shape[2]))
  _check_length("KV cache", k_cache.shape[1], mesh_.shape[axis_name], axis_name)
  if k_idx is None:
    k_idx = masks.key_indices(b, k_cache.shape[1])
  fn = functools.partial(
    decode_attention_shard, axis_name=axis_name, scale=scale, backend=backend, **backend_kw
  )
  rep = P(batch_ax, None, head_ax, None)
  cache = P(batch_ax, axis_name, head_ax, None)
  sharded = jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(rep, cache, cache, P(batch_ax, None), P(batch_ax, None), P(batch_ax, axis_name)),
    out_specs=rep,
    check_vma=False,
  )
  ints = (jnp.asarray(x, jnp.int32) for x in (q_lo, q_hi, k_idx))
  return sharded(q, k_cache, v_cache, *ints)
