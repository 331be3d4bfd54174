"""The one table from logical axis names (used by model code) to mesh axes (used only here).

Model code names the axes of every weight and activation logically ("embed", "heads", "length");
this table decides where they live on the mesh (`data`, `fsdp`, `context`, `tensor`;
`lcv.parallel.mesh`). Changing the parallel layout means changing this table, not the model.

Weights are sharded over ("fsdp", "context") on the embedding axis: the context axis holds a
sequence shard of every activation but would otherwise replicate the weights, so it doubles as an
FSDP axis (LWM `("fsdp", "sp")`, MaxText `context` in its FSDP rules). Activations keep the
residual stream sequence-sharded: "length" -> "context" with the model dim unsharded, avoiding
LWM's per-layer all-gather of the sequence in its MLP constraint (notes: ring anchors §2.4).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None

RULES: tuple[tuple[str, MeshAxes], ...] = (
  # Weights.
  ("embed", ("fsdp", "context")),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("vocab", "tensor"),
  ("head_dim", None),
  ("layers", None),
  ("norm", None),
  ("vision_embed", ("fsdp", "context")),
  ("patches", None),
  # Activations.
  ("batch", ("data", "fsdp")),
  # The vision tower's images (video frames folded into its batch): spread over the context axis
  # too, so context devices encode different frames instead of all of them each.
  ("frames", ("data", "fsdp", "context")),
  ("length", "context"),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
)

_TABLE = dict(RULES)


def _mesh_axes(name: str | None, rules) -> tuple[str, ...]:
  if name is None:
    return ()
  table = _TABLE if rules is None else dict(rules)
  if name not in table:
    raise ValueError(f"logical axis {name!r} has no rule; known names: {sorted(table)}")
  axes = table[name]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], mesh=None, rules=None) -> P:
  """PartitionSpec for an array whose axes have these logical names.

  Args:
    names: one logical name (or None = replicated) per array axis.
    mesh: if given, mesh axes it lacks are dropped (so a context-only mesh works too).
    rules: a rules table like `RULES` (default `RULES`).

  Returns:
    jax.sharding.PartitionSpec with one entry per axis.
  """
  present = None if mesh is None else set(mesh.axis_names)
  spec, used = [], {}
  for name in names:
    axes = tuple(a for a in _mesh_axes(name, rules) if present is None or a in present)
    for a in axes:
      if a in used:
        raise ValueError(
          f"mesh axis {a!r} would shard both {used[a]!r} and {name!r} in {tuple(names)}; "
          "one mesh axis can shard one array axis only"
        )
      used[a] = name
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def check_divisible(shape: Sequence[int], names: Sequence[str | None], mesh, rules=None) -> None:
  """Raise a clear error unless every dim divides by the size of the mesh axes it maps to."""
  if len(shape) != len(names):
    raise ValueError(f"{tuple(shape)=} and {tuple(names)=} must have the same length")
  spec = logical_to_spec(names, mesh, rules)
  for dim, name, axes in zip(shape, names, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    size = math.prod(mesh.shape[a] for a in axes)
    if dim % size:
      raise ValueError(
        f"axis {name!r} of size {dim} is sharded over mesh axes {axes} of total size {size}; "
        f"make it a multiple of {size} (pad by {-dim % size}) or change the mesh"
      )


def shards(name: str, rules=None) -> int:
  """How many ways the ambient mesh splits an array axis named `name` (1 without a mesh)."""
  mesh = _ambient_mesh()
  if mesh is None:
    return 1
  return math.prod(mesh.shape[a] for a in _mesh_axes(name, rules) if a in mesh.axis_names)


def _ambient_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[str | None], rules=None) -> jax.Array:
  """with_sharding_constraint(x) through the rules against the ambient mesh (`jax.set_mesh`).

  A no-op when no mesh is set (single-device tests, eager debugging).
  """
  mesh = _ambient_mesh()
  if mesh is None:
    return x
  if x.ndim != len(names):
    raise ValueError(f"{x.shape=} has {x.ndim} axes but {len(names)} names were given: {names}")
  check_divisible(x.shape, names, mesh, rules)
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh, rules))


@contextlib.contextmanager
def use_rules(rules=RULES):
  """Context for sharded NNX init: `nnx.with_partitioning(init, ("embed", "mlp"))` resolves here."""
  with nnx.logical_axis_rules(rules):
    yield
