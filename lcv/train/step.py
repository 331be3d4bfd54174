"""Pure train and eval steps: (state, batch) -> (state, metrics), for `jax.jit` with donation.

The loss is a function `loss_fn(model, batch) -> (sum_loss, sum_weight, aux)`: the weighted sum of
per-token cross-entropies (LWM-style per-token weights from packing, plus z-loss) and the weight
total, so that gradient accumulation over micro-batches gives exactly the full-batch mean:
grad = sum_a grad(sum_loss_a) / sum_a sum_weight_a. Accumulation runs in float32 whatever the
compute dtype; master weights are float32 (the model's param_dtype).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lcv.train import state as state_lib

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, jax.Array, dict]]


def _micro(batch, accum: int):
  """Split rows into `accum` micro-batches, strided (micro a = rows a, a + accum, ...) so that every
  device keeps an equal share of each micro-batch."""

  def split(path, x):
    x = jnp.asarray(x)
    # M-RoPE positions [3, B, S] carry rows on axis 1.
    axis = 1 if x.ndim == 3 and "positions" in jax.tree_util.keystr(path) else 0
    x = jnp.moveaxis(x, axis, 0)
    b = x.shape[0]
    x = jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)
    return jnp.moveaxis(x, 1, axis + 1)

  return jax.tree_util.tree_map_with_path(split, batch)


def make_train_step(
  graphdef, tx, loss_fn: LossFn, *, grad_accum: int = 1, schedules=None, frozen=None
):
  """A pure `train_step(state, batch) -> (state, metrics)`.

  Args:
    graphdef: the model graphdef (`state.Setup.graphdef`).
    tx: the optax transform.
    loss_fn: see the module docstring.
    grad_accum: micro-batches per step (rows must divide by it).
    schedules: {group: schedule} for the logged learning rate.
    frozen: optional bools like params (`state.Setup.frozen`); frozen weights are held constant
      under `stop_gradient`, so autodiff prunes their backward pass (a frozen vision tower costs
      its forward only) besides the optimizer not updating them.
  """
  schedules = schedules or {}

  def grads_of(params, rest, batch):
    def f(p):
      if frozen is not None:
        p = jax.tree.map(lambda m, x: jax.lax.stop_gradient(x) if m else x, frozen, p)
      model = nnx.merge(graphdef, p, rest)
      sum_loss, sum_weight, aux = loss_fn(model, batch)
      return sum_loss.astype(jnp.float32), (sum_weight.astype(jnp.float32), aux)

    return jax.value_and_grad(f, has_aux=True)(params)

  def train_step(state, batch):
    params, rest = state["params"], state["rest"]
    if grad_accum == 1:
      (sum_loss, (sum_weight, aux)), grads = grads_of(params, rest, batch)
    else:
      micro = _micro(batch, grad_accum)
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

      def body(carry, mb):
        g_acc, l_acc, w_acc = carry
        (l, (w, aux)), g = grads_of(params, rest, mb)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, l_acc + l, w_acc + w), aux

      (grads, sum_loss, sum_weight), auxs = jax.lax.scan(
        body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro
      )
      aux = jax.tree.map(lambda x: jnp.sum(x, 0), auxs)
    denom = jnp.maximum(sum_weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    step = state["step"]
    metrics = {
      "loss": sum_loss / denom,
      "weight": sum_weight,
      "grad_norm": optax.global_norm(grads),
      **{f"aux/{k}": v / denom for k, v in aux.items()},
      **{f"lr/{k}": fn(step) for k, fn in schedules.items()},
    }
    new = {**state, "step": step + 1, "params": params, "opt_state": opt_state}
    return new, metrics

  return train_step


def make_eval_step(graphdef, loss_fn: LossFn):
  """A pure `eval_step(state, batch) -> {"loss", "weight"}` (no update)."""

  def eval_step(state, batch):
    model = state_lib.merge(graphdef, state)
    sum_loss, sum_weight, _ = loss_fn(model, batch)
    return {"loss": sum_loss / jnp.maximum(sum_weight, 1.0), "weight": sum_weight}

  return eval_step


def jit_train_step(train_step, s: state_lib.Setup):
  """jit with the state donated and pinned to its shardings."""
  shardings = jax.tree.map(lambda x: x.sharding, s.abstract)
  return jax.jit(
    train_step, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=(0,)
  )
