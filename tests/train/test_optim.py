"""Optimizer: schedules, freezing by regex (no state, no update), per-group learning rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcv.config import OptimizerConfig
from lcv.train import optim

PARAMS = {
  "vision": {"kernel": jnp.ones((4, 4))},
  "projector": {"kernel": jnp.ones((4, 4))},
  "llm": {"kernel": jnp.ones((4, 4)), "norm": {"scale": jnp.ones((4,))}},
}


def _step(cfg, params=PARAMS):
  tx, _ = optim.make(cfg, 100, params)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_schedule_warmup_then_decay():
  cfg = OptimizerConfig(lr=1.0, warmup_steps=10, end_lr_ratio=0.1, schedule="cosine")
  s = optim.schedule(cfg, 110)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0) and float(s(110)) == pytest.approx(0.1)
  lin = optim.schedule(OptimizerConfig(lr=1.0, warmup_steps=0, schedule="linear"), 100)
  assert float(lin(50)) == pytest.approx(0.55)
  with pytest.raises(ValueError, match="schedule='step'"):
    optim.schedule(OptimizerConfig(schedule="step"), 10)


def test_freeze_and_group_rates():
  cfg = OptimizerConfig(
    lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=0.0,
    groups=((r"^vision/", 0.0), (r"^projector/", 10.0)),
  )  # fmt: skip
  new, state = _step(cfg)
  np.testing.assert_array_equal(new["vision"]["kernel"], PARAMS["vision"]["kernel"])
  d_proj = 1 - float(new["projector"]["kernel"][0, 0])
  d_llm = 1 - float(new["llm"]["kernel"][0, 0])
  assert d_llm == pytest.approx(0.1, rel=1e-3) and d_proj == pytest.approx(1.0, rel=1e-3)
  # Frozen weights hold no Adam moments.
  moments = [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (4, 4)]
  assert len(moments) == 2 * 2  # mu and nu for projector and llm kernels only


def test_clipping_ignores_frozen_gradients():
  cfg = OptimizerConfig(
    lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=1e-3,
    groups=((r"^vision/", 0.0),),
  )  # fmt: skip
  tx, _ = optim.make(cfg, 10, PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  grads["vision"]["kernel"] = grads["vision"]["kernel"] * 1e6
  state = tx.init(PARAMS)
  _, state = tx.update(grads, state, PARAMS)
  # Adam normalises magnitudes away; check the clipped gradient via the first moment instead.
  mu = [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (4, 4)][0]
  norm_without_vision = np.sqrt(16 * 2 + 4)
  assert float(mu[0, 0]) == pytest.approx(0.1 * 1e-3 / norm_without_vision, rel=1e-3)


def test_no_decay_for_norm_scales():
  cfg = OptimizerConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, clip_norm=0)
  params = {"kernel": jnp.ones((2,)), "norm": {"scale": jnp.ones((2,))}}
  tx, _ = optim.make(cfg, 10, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(updates["kernel"][0]) == pytest.approx(-0.05)
  assert float(updates["norm"]["scale"][0]) == 0.0


def test_negative_multiplier_is_rejected():
  with pytest.raises(ValueError, match="use 0 to freeze"):
    optim.make(OptimizerConfig(groups=(("x", -1.0),)), 10, PARAMS)
