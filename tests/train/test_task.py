"""The VLM task end to end on the tiny config: host inputs (V2PE strides, zig-zag), loss falls."""

import dataclasses
import importlib.util
import os

import jax
import numpy as np
import pytest

from lcv.config import MeshConfig
from lcv.data import pipeline
from lcv.parallel import context
from lcv.parallel import mesh as mesh_lib
from lcv.train import loop
from lcv.train import task as task_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(arg=""):
  spec = importlib.util.spec_from_file_location("train_tiny", f"{ROOT}/configs/train_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_inputs_are_deterministic_and_zigzag_is_the_natural_batch_reordered():
  run = _config("seq_len=256")
  data = pipeline.Pipeline(run.train.data, run.model.frame_tokens)
  host = next(data)
  data.close()
  plain = task_lib.make_inputs_fn(run.model, run.train, MeshConfig(context=1))(host)
  again = task_lib.make_inputs_fn(run.model, run.train, MeshConfig(context=1))(host)
  zig = task_lib.make_inputs_fn(run.model, run.train, MeshConfig(context=2))(host)
  np.testing.assert_array_equal(plain["positions"].ticks, again["positions"].ticks)
  # V2PE with random strides: some visual positions are fractional.
  assert np.any(plain["positions"].ticks % 256)
  per_token = {k: v for k, v in plain.items() if k != "pixels"}
  expected = context.to_order(per_token, 2, "zigzag")
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves({k: zig[k] for k in per_token})):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(zig["pixels"], host["frames"])


def test_bad_configs_are_clear_errors():
  run = _config()
  bad = dataclasses.replace(run.train, data=dataclasses.replace(run.train.data, image_size=32))
  with pytest.raises(ValueError, match="data.image_size=32 must equal"):
    task_lib.vlm_task(run.model, bad)
  odd = dataclasses.replace(run.train, data=dataclasses.replace(run.train.data, seq_len=510))
  with pytest.raises(ValueError, match="seq_len=510 must be a multiple of 4"):
    task_lib.vlm_task(run.model, odd, MeshConfig(context=2))


def test_tiny_vlm_loss_falls(tmp_path):
  run = _config("steps=10,seq_len=256")
  opt = dataclasses.replace(run.train.optimizer, warmup_steps=2)
  train = dataclasses.replace(run.train, workdir=str(tmp_path), checkpoint_every=0, optimizer=opt)
  # Two devices keep the rows sharded while sparing the 2-core CI the 8-device emulation.
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=1), devices=jax.devices()[:2])
  history = loop.train(task_lib.vlm_task(run.model, train), train, mesh, progress=False)
  losses = [r["loss"] for r in history]
  assert np.isfinite(losses).all() and np.mean(losses[-3:]) < losses[0] - 0.5, losses
