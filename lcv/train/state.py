"""Train state, created directly sharded.

The model is traced abstractly (`nnx.eval_shape` under the mesh and the logical-axis rules, so every
parameter carries its NamedSharding), then materialised by one jitted init whose outputs land in
those shardings: no host ever holds a full unsharded copy. The state is a plain pytree

    {"step": int32[], "params": nnx.State (Param), "rest": nnx.State (other variables),
     "opt_state": optax state, "rng": uint32[2]}

and the graphdef is kept aside, so steps are pure functions of (state, batch) (the functional
`nnx.split` / `jax.jit` / `nnx.merge` loop of the flax performance guide).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lcv.config import OptimizerConfig
from lcv.train import optim


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run needs besides the state arrays: the graphdef, the optimizer, the abstract state
  (ShapeDtypeStructs carrying the target shardings; the restore target), the lr schedules, and
  the frozen-parameter mask (bools like params)."""

  graphdef: nnx.GraphDef
  tx: object
  abstract: dict
  schedules: dict
  mesh: jax.sharding.Mesh
  rules: tuple
  frozen: object = None


def scope(mesh, rules):
  """Context under which modules are built: the mesh and the logical-axis rules."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nnx.logical_axis_rules(rules))
  return stack


def _init(model_fn, tx, seed):
  model = model_fn()
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "rest": rest,
    "opt_state": tx.init(params),
    "rng": jax.random.key_data(jax.random.key(seed)),
  }


def _shardings(abstract, mesh):
  """NamedShardings of an abstract state; leaves without one (optimizer counters) replicate."""

  def one(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding):
      return NamedSharding(mesh, s.spec)
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract)


def _like_params(tree, params, params_sh, mesh):
  """Shardings for optimizer state: a leaf whose path ends with a parameter's path and has its
  shape (Adam's mu / nu, ...) takes that parameter's sharding; counters and the rest replicate.

  `jax.eval_shape` reports no shardings for the optimizer's zeros, and XLA does not propagate
  them either (they do not depend on the parameters), so they are matched by path.
  """
  keyed = {
    jax.tree_util.keystr(path): (x.shape, sh)
    for (path, x), sh in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(params_sh), strict=True
    )
  }

  def one(path, x):
    name = jax.tree_util.keystr(path)
    best = max(
      (k for k, (shape, _) in keyed.items() if name.endswith(k) and shape == x.shape),
      key=len,
      default=None,
    )
    return keyed[best][1] if best is not None else NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def setup(
  model_fn: Callable[[], nnx.Module],
  opt_cfg: OptimizerConfig,
  steps: int,
  mesh,
  rules,
  seed: int = 0,
) -> Setup:
  """Trace the model and optimizer abstractly; nothing is allocated."""
  with scope(mesh, rules):
    abstract_model = nnx.eval_shape(model_fn)
    graphdef, params, _ = nnx.split(abstract_model, nnx.Param, ...)
    tx, schedules = optim.make(opt_cfg, steps, params)
    frozen = optim.frozen(params, opt_cfg)
    abstract = jax.eval_shape(lambda: _init(model_fn, tx, seed))
  # The abstract *model* carries each parameter's NamedSharding (from its logical axes and the
  # rules); `jax.eval_shape` of the whole init does not, so take them from the model.
  _, _, rest = nnx.split(abstract_model, nnx.Param, ...)
  params_sh = _shardings(params, mesh)
  shardings = {
    **_shardings(abstract, mesh),
    "params": params_sh,
    "rest": _shardings(rest, mesh),
    "opt_state": _like_params(abstract["opt_state"], params, params_sh, mesh),
  }
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )
  return Setup(graphdef, tx, abstract, schedules, mesh, tuple(rules), frozen)


def create(model_fn: Callable[[], nnx.Module], s: Setup, seed: int = 0) -> dict:
  """Materialise the state of `s` with every leaf born in its sharding."""
  shardings = jax.tree.map(lambda x: x.sharding, s.abstract)
  with scope(s.mesh, s.rules):
    return jax.jit(lambda: _init(model_fn, s.tx, seed), out_shardings=shardings)()


def merge(graphdef, state: dict) -> nnx.Module:
  """The module of a state (inside a jitted step: a traced, zero-copy view)."""
  return nnx.merge(graphdef, state["params"], state["rest"])


def num_params(state: dict) -> int:
  """Number of parameters (frozen ones included)."""
  return sum(int(x.size) for x in jax.tree.leaves(state["params"]))
