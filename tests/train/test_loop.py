"""The training loop in-process: loss falls, restore reshards, failures are loud."""

import glob
import os

import jax
import numpy as np
import pytest

from lcv.config import MeshConfig
from lcv.parallel import mesh as mesh_lib
from lcv.train import checkpoint as checkpoint_lib
from lcv.train import loop
from lcv.train import state as state_lib
from tests.train import run_tiny, tiny_task


def _mesh(data, fsdp):
  # Four of the eight emulated devices: sharded, but cheaper on a 2-core machine.
  return mesh_lib.make_mesh(MeshConfig(data=data, fsdp=fsdp), devices=jax.devices()[:4])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  cfg = run_tiny.config(str(workdir), 16, checkpoint_every=8)
  history = loop.train(tiny_task.task(), cfg, _mesh(2, 2), progress=False)
  return workdir, cfg, history


def test_loss_falls_and_metrics_logged(trained):
  workdir, _, history = trained
  losses = [r["loss"] for r in history]
  assert len(losses) == 16 and np.mean(losses[-3:]) < losses[0] - 0.1, losses
  assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in history if "mfu" in r)
  assert os.path.exists(workdir / "metrics.jsonl")
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [8, 16]


def test_restore_reshards_onto_another_mesh(trained):
  workdir, cfg, _ = trained
  task = tiny_task.task()
  mesh = _mesh(1, 4)
  setup = state_lib.setup(task.model_fn, cfg.optimizer, cfg.steps, mesh, task.rules)
  ckpt = checkpoint_lib.Checkpointer(str(workdir), async_save=False)
  step, state, data_state = ckpt.restore(setup.abstract)
  ckpt.close()
  assert step == 16 and len(data_state["cursors"]) == cfg.data.batch_size
  kernel = state["params"]["embed"].value
  assert kernel.sharding.mesh.shape == mesh.shape
  assert kernel.sharding.spec == setup.abstract["params"]["embed"].value.sharding.spec
  # Same values as on the original 2 x 2 mesh.
  old_setup = state_lib.setup(task.model_fn, cfg.optimizer, cfg.steps, _mesh(2, 2), task.rules)
  ckpt = checkpoint_lib.Checkpointer(str(workdir), async_save=False)
  _, old, _ = ckpt.restore(old_setup.abstract)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(old)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_step_is_a_clear_error(trained):
  workdir, cfg, _ = trained
  task = tiny_task.task()
  setup = state_lib.setup(task.model_fn, cfg.optimizer, cfg.steps, _mesh(2, 2), task.rules)
  ckpt = checkpoint_lib.Checkpointer(str(workdir), async_save=False)
  with pytest.raises(checkpoint_lib.CheckpointError, match="step 5 not found"):
    ckpt.restore(setup.abstract, step=5)
  ckpt.close()


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  cfg = run_tiny.config(str(tmp_path), 2, checkpoint_every=2)
  task = tiny_task.task()
  loop.train(task, cfg, _mesh(2, 2), progress=False)
  for f in glob.glob(str(tmp_path / "checkpoints" / "2" / "state" / "**" / "*"), recursive=True):
    if os.path.isfile(f) and "metadata" not in os.path.basename(f):
      with open(f, "wb") as fh:
        fh.write(b"garbage")
  longer = run_tiny.config(str(tmp_path), 4, checkpoint_every=2)
  with pytest.raises(checkpoint_lib.CheckpointError, match="corrupt or incompatible.*--fresh"):
    loop.train(task, longer, _mesh(2, 2), progress=False)
  # Asked explicitly, a fresh start works.
  history = loop.train(task, longer, _mesh(2, 2), progress=False, fresh=True)
  assert [r["step"] for r in history] == [1, 2, 3, 4]


def test_nan_stops_with_last_good_checkpoint_kept(tmp_path):
  base = tiny_task.task()

  def poisoned(host):
    out = base.inputs_fn(host)
    if host["row_id"][0, 1] > 20:  # a later batch: from then on the loss is NaN
      out["weights"] = out["weights"] * np.nan
    return out

  task = loop.Task(**{**base.__dict__, "inputs_fn": poisoned})
  cfg = run_tiny.config(str(tmp_path), 40, checkpoint_every=1)
  with pytest.raises(FloatingPointError, match="loss is nan at step (\\d+).*last good checkpoint"):
    loop.train(task, cfg, _mesh(2, 2), progress=False)
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps and steps[-1] < 40


def test_batch_not_divisible_by_mesh_is_a_clear_error(tmp_path):
  cfg = run_tiny.config(str(tmp_path), 2)
  cfg = cfg.__class__(**{**cfg.__dict__, "data": cfg.data.__class__(batch_size=6)})
  with pytest.raises(ValueError, match="batch_size=6 must be a multiple of data x fsdp = 4"):
    loop.train(tiny_task.task(), cfg, _mesh(2, 2), progress=False)


def test_profiler_trace_on_request(tmp_path):
  cfg = run_tiny.config(str(tmp_path), 3, checkpoint_every=0)
  cfg = cfg.__class__(**{**cfg.__dict__, "profile_steps": (1, 2)})
  loop.train(tiny_task.task(), cfg, _mesh(2, 2), progress=False)
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces, os.listdir(tmp_path)
