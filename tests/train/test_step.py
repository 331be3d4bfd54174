"""The pure train step: gradient accumulation equals the full batch; donated, sharded state;
frozen groups stay constant."""

import dataclasses

import jax
import numpy as np

from lcv.config import MeshConfig
from lcv.data import feeding, pipeline
from lcv.parallel import mesh as mesh_lib
from lcv.train import state as state_lib
from lcv.train import step as step_lib
from tests.train import run_tiny, tiny_task


def test_grad_accumulation_matches_full_batch(tmp_path):
  cfg = run_tiny.config(str(tmp_path), 4)
  opt = dataclasses.replace(cfg.optimizer, warmup_steps=0)  # a non-zero first learning rate
  task = tiny_task.task()
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2), devices=jax.devices()[:4])
  setup = state_lib.setup(task.model_fn, opt, cfg.steps, mesh, task.rules)
  data = pipeline.Pipeline(cfg.data, task.tokens_per_frame)
  host = next(data)
  data.close()
  batch = feeding.to_device(task.inputs_fn(host), mesh, list(range(8)), 8)
  out = {}
  for accum in (1, 2):
    state = state_lib.create(task.model_fn, setup)
    fn = step_lib.make_train_step(setup.graphdef, setup.tx, task.loss_fn, grad_accum=accum)
    with state_lib.scope(mesh, task.rules):
      new, metrics = step_lib.jit_train_step(fn, setup)(state, batch)
    assert state["step"].is_deleted()  # donated
    out[accum] = (new, metrics)
  (a, ma), (b, mb) = out[1], out[2]
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
  np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-5)
  before = jax.tree.leaves(state_lib.create(task.model_fn, setup)["params"])
  assert not np.allclose(np.asarray(before[0]), np.asarray(jax.tree.leaves(a["params"])[0]))
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  kernel = a["params"]["head"].value
  assert kernel.sharding.spec == setup.abstract["params"]["head"].value.sharding.spec


def test_frozen_group_is_constant_and_others_train(tmp_path):
  cfg = run_tiny.config(str(tmp_path), 4)
  opt = dataclasses.replace(cfg.optimizer, warmup_steps=0, groups=((r"^(embed|patch)/", 0.0),))
  task = tiny_task.task()
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2), devices=jax.devices()[:4])
  setup = state_lib.setup(task.model_fn, opt, cfg.steps, mesh, task.rules)
  data = pipeline.Pipeline(cfg.data, task.tokens_per_frame)
  host = next(data)
  data.close()
  batch = feeding.to_device(task.inputs_fn(host), mesh, list(range(8)), 8)
  state = state_lib.create(task.model_fn, setup)
  before = jax.tree.map(np.asarray, state["params"])
  fn = step_lib.make_train_step(setup.graphdef, setup.tx, task.loss_fn, frozen=setup.frozen)
  with state_lib.scope(mesh, task.rules):
    new, _ = step_lib.jit_train_step(fn, setup)(state, batch)
  for name in ("embed", "patch"):
    np.testing.assert_array_equal(np.asarray(new["params"][name].value), before[name].value)
  assert not np.array_equal(np.asarray(new["params"]["head"].value), before["head"].value)
