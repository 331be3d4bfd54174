"""The train state is born sharded: parameters by their logical axes, Adam's moments like them."""

import jax
from jax.sharding import PartitionSpec as P

from lcv.config import MeshConfig, OptimizerConfig
from lcv.parallel import mesh as mesh_lib
from lcv.train import state as state_lib
from tests.train import tiny_task


def test_params_and_moments_are_sharded_like_the_rules_say():
  task = tiny_task.task()
  mesh = mesh_lib.make_mesh(MeshConfig(fsdp=4, tensor=2))
  setup = state_lib.setup(task.model_fn, OptimizerConfig(), 10, mesh, task.rules)
  want = P(("fsdp", "context"), "tensor")  # the MLP's ("embed", "mlp") weight
  assert setup.abstract["params"]["mlp"].value.sharding.spec == want
  moments = [
    x.sharding.spec
    for path, x in jax.tree_util.tree_flatten_with_path(setup.abstract["opt_state"])[0]
    if jax.tree_util.keystr(path).endswith("['mlp'].value")
  ]
  assert moments == [want, want]  # mu and nu
  state = state_lib.create(task.model_fn, setup)
  mlp = state["params"]["mlp"].value
  assert mlp.sharding.spec == want
  assert mlp.addressable_shards[0].data.shape == (mlp.shape[0] // 4, mlp.shape[1] // 2)
