"""The optimizer: AdamW, warmup + cosine/linear decay, clipping, per-group rates and freezing.

Groups are regexes over "/"-joined parameter paths (big_vision's `config.schedule` idea), e.g.

    groups = ((r"^vision/", 0.0), (r"^projector/", 10.0))   # freeze the tower, fast projector

A multiplier of 0 freezes the group through `optax.set_to_zero`, so frozen weights get no Adam
moments (no memory) and no weight decay. Master weights stay float32 whatever the compute dtype.
"""

from __future__ import annotations

import re

import jax
import optax

from lcv.config import OptimizerConfig


def schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
  """Linear warmup to cfg.lr, then cosine / linear decay to cfg.lr * end_lr_ratio at `steps`."""
  if cfg.warmup_steps < 0 or steps < 1:
    raise ValueError(f"need warmup_steps={cfg.warmup_steps} >= 0 and {steps=} >= 1")
  end = cfg.lr * cfg.end_lr_ratio
  warmup = min(cfg.warmup_steps, steps)
  decay = max(steps - warmup, 1)
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.end_lr_ratio)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(cfg.lr, end, decay)
  elif cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"optimizer.schedule={cfg.schedule!r}: use 'cosine', 'linear' or 'constant'")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def path_str(path) -> str:
  """'a/b/0/kernel' from a jax key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def group_of(path: str, groups) -> int:
  """Index of the first group whose regex matches `path`, or len(groups) (the default group)."""
  for i, (pattern, _) in enumerate(groups):
    if re.search(pattern, path):
      return i
  return len(groups)


def labels(params, cfg: OptimizerConfig):
  """Pytree of group labels ("g0", "g1", ..., "default") matching `params`."""
  names = [f"g{i}" for i in range(len(cfg.groups))] + ["default"]
  return jax.tree_util.tree_map_with_path(
    lambda p, _: names[group_of(path_str(p), cfg.groups)], params
  )


def frozen(params, cfg: OptimizerConfig):
  """Pytree of bools matching `params`: True where the group's lr multiplier is 0."""
  mults = [m for _, m in cfg.groups] + [1.0]
  return jax.tree_util.tree_map_with_path(
    lambda p, _: mults[group_of(path_str(p), cfg.groups)] == 0, params
  )


def _decay_mask(params, pattern: str):
  return jax.tree_util.tree_map_with_path(
    lambda p, _: re.search(pattern, path_str(p)) is None, params
  )


def make(cfg: OptimizerConfig, steps: int, params) -> tuple[optax.GradientTransformation, dict]:
  """(optax transform over `params`, {group name: schedule}) for logging the learning rates.

  Args:
    cfg: optimizer config.
    steps: total optimizer steps (the decay horizon).
    params: the trainable parameter pytree (arrays or shape structs), for group and decay masks.
  """
  for pattern, mult in cfg.groups:
    re.compile(pattern)
    if mult < 0:
      raise ValueError(f"optimizer group {pattern!r} has lr multiplier {mult} < 0; use 0 to freeze")
  base = schedule(cfg, steps)
  names = [f"g{i}" for i in range(len(cfg.groups))] + ["default"]
  mults = [m for _, m in cfg.groups] + [1.0]
  transforms, schedules = {}, {}
  for name, mult in zip(names, mults):
    if mult == 0:
      transforms[name] = optax.set_to_zero()
      continue
    sched = (lambda s, m=mult: base(s) * m) if mult != 1 else base
    schedules[name] = sched
    transforms[name] = optax.adamw(
      sched,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=lambda p: _decay_mask(p, cfg.no_decay),
    )
  label_fn = lambda p: labels(p, cfg)
  # Frozen gradients are zeroed *before* clipping, so they do not shrink the others' global norm.
  freeze = {n: optax.set_to_zero() if m == 0 else optax.identity() for n, m in zip(names, mults)}
  chain = [optax.multi_transform(freeze, label_fn)]
  if cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(optax.multi_transform(transforms, label_fn))
  return optax.chain(*chain), schedules
