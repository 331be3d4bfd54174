"""Mesh construction and validation; the logical-axis rules and their checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from lcv.config import MeshConfig
from lcv.parallel import mesh as mesh_lib
from lcv.parallel import rules


def test_make_mesh_fills_the_minus_one_with_auto_axes():
  mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=-1, context=2, tensor=2))
  assert mesh.axis_names == ("data", "fsdp", "context", "tensor")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  # Inner axes are adjacent devices: a context ring stays on neighbouring (fastest) links.
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  np.testing.assert_array_equal(ids[0, 0].reshape(-1), [0, 1, 2, 3])


@pytest.mark.parametrize(
  "cfg, match",
  [
    (MeshConfig(data=3, fsdp=-1), r"fill fsdp=-1: 8 devices per slice is not a multiple of .* 3"),
    (MeshConfig(data=2, fsdp=2, context=1, tensor=1), r"needs 4 devices per slice but there are 8"),
    (MeshConfig(data=-1, fsdp=-1), r"at most one mesh axis may be -1"),
    (MeshConfig(fsdp=0), r"positive"),
    (MeshConfig(dcn_data=3), r"cannot be split into dcn_data \* dcn_fsdp = 3"),
    (MeshConfig(dcn_fsdp=2), r"dcn_data \* dcn_fsdp = 2 but the devices span 1 processes"),
    (MeshConfig(context=4, ulysses=3, context_parallel="hybrid"), r"ulysses=3 must be a positive"),
    (MeshConfig(context_parallel="tree"), r"context_parallel='tree'"),
  ],
)
def test_mesh_validation_errors(cfg, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.make_mesh(cfg)


def test_initialize_distributed_single_process_and_partial_args(monkeypatch):
  for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert mesh_lib.initialize_distributed() is False
  with pytest.raises(ValueError, match="give all of"):
    mesh_lib.initialize_distributed(coordinator="10.0.0.1:1234")
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert mesh_lib._cluster_env() == "slurm"


def test_rules_table_and_specs():
  table = dict(rules.RULES)
  assert table["embed"] == ("fsdp", "context") and table["length"] == "context"
  assert rules.logical_to_spec(("batch", "length", "act_embed")) == P(
    ("data", "fsdp"), "context", None
  )
  # Axes missing from the mesh are dropped.
  ctx = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("context",))
  assert rules.logical_to_spec(("batch", "length", "act_heads"), ctx) == P(None, "context", None)
  with pytest.raises(ValueError, match=r"logical axis 'embedding' has no rule"):
    rules.logical_to_spec(("embedding",))
  with pytest.raises(ValueError, match=r"mesh axis 'tensor' would shard both 'heads' and 'mlp'"):
    rules.logical_to_spec(("heads", "mlp"))


def test_divisibility_check_names_the_fix():
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, context=2, tensor=1))
  rules.check_divisible((8, 64, 16), ("batch", "length", "act_embed"), mesh)
  with pytest.raises(ValueError, match=r"'batch' of size 6 .* multiple of 4 \(pad by 2\)"):
    rules.check_divisible((6, 64, 16), ("batch", "length", "act_embed"), mesh)


def test_constrain_is_a_noop_without_mesh_and_shards_under_one():
  x = jnp.ones((4, 16, 8))
  names = ("batch", "length", "act_embed")
  assert rules.constrain(x, names) is x
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=1, context=4, tensor=1))
  with jax.set_mesh(mesh):
    y = jax.jit(lambda a: rules.constrain(a * 2, names))(x)
  want = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "context", None))
  assert y.sharding.is_equivalent_to(want, y.ndim)
  assert y.addressable_shards[0].data.shape == (2, 4, 8)


def test_use_rules_shards_nnx_init():
  mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=2, context=2, tensor=2))
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.w = nnx.Param(init(rngs.params(), (16, 32)))

  with jax.set_mesh(mesh), rules.use_rules():
    model = nnx.eval_shape(lambda: Mlp(nnx.Rngs(0)))
    spec = nnx.get_partition_spec(nnx.state(model))["w"].value
  assert spec == P(("fsdp", "context"), "tensor")
