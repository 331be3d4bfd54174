"""Staged context extension: stage configs, V2PE stride sets, and a 2-stage run end to end."""

import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from lcv.config import MeshConfig
from lcv.parallel import mesh as mesh_lib
from lcv.train import checkpoint as checkpoint_lib
from lcv.train import stages
from lcv.train import state as state_lib
from lcv.train import task as task_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name: str, arg: str = ""):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_presets_follow_lwm_and_longva():
  lwm = _config("extend_lwm")
  assert [(s.seq_len, s.theta) for s in lwm.stages] == [
    (32_768, 1e6), (131_072, 1e7), (262_144, 1e7), (524_288, 2.5e7), (1_048_576, 5e7),
  ]  # fmt: skip
  longva = _config("extend_longva")
  assert [(s.seq_len, s.theta) for s in longva.stages] == [(224_000, 1e9)]


def test_stage_config_overrides_length_rope_batch_and_mesh():
  ext = _config("extend_lwm", "preset=tiny,positions=v2pe")
  stage = ext.stages[1]
  cfg = stages.stage_config(ext.base, stage)
  assert cfg.train.data.seq_len == 512 and cfg.train.data.batch_size == 4
  assert cfg.model.decoder.rope.theta == stage.theta and cfg.model.decoder.rope.v2pe_random
  assert cfg.model.decoder.attention_impl == "ring" and cfg.mesh.context == 2
  assert cfg.train.optimizer.lr == stage.lr and cfg.train.steps == stage.steps


def test_bad_stages_are_clear_errors():
  with pytest.raises(ValueError, match="tokens_per_batch=1000 must be a multiple of self.seq_len"):
    stages.Stage("x", 256, 1e4, 1, 1e-3, 1000)
  with pytest.raises(ValueError, match="V2PE stride 0.3"):
    stages.Stage("x", 256, 1e4, 1, 1e-3, 256, v2pe_deltas=(1.0, 0.3))
  ext = _config("extend_lwm", "preset=tiny")  # 1-D positions
  bad = dataclasses.replace(ext.stages[0], v2pe_deltas=(1.0, 0.5))
  with pytest.raises(ValueError, match="sets v2pe_deltas but the model uses '1d'"):
    stages.stage_config(ext.base, bad)


def test_v2pe_strides_come_from_the_stage_set():
  rows = np.array([[0, 0], [1, 5], [2, 9]])
  d = task_lib._v2pe_deltas(rows, 6, 0, (1.0, 1 / 16))
  assert d.shape == (3, 6) and set(np.unique(d)) <= {1.0, 1 / 16}
  np.testing.assert_array_equal(d, task_lib._v2pe_deltas(rows, 6, 0, (1.0, 1 / 16)))


def test_eval_grid_scales_with_the_stage():
  assert stages._grid(1024, 4, 1, 256) == (256, 1024, 256)
  assert stages._grid(256, 4, 1, 256) == (256, 256, 64)
  assert stages._grid(1024, 2, 4, 8, unit=4) == (512, 1024, 512)


@pytest.mark.slow
def test_two_stages_restore_and_evaluate(tmp_path):
  ext = _config("extend_lwm", "preset=tiny,steps=1,eval_points=1,depth_step=1.0")
  ext = dataclasses.replace(ext, stages=ext.stages[:2])
  rows = stages.run(ext, str(tmp_path), progress=False)

  assert [r["stage"] for r in rows] == ["256", "512"] and [r["context"] for r in rows] == [1, 2]
  for r in rows:
    assert (
      0.0 <= r["text_niah"] <= 1.0 and 0.0 <= r["vniah"] <= 1.0 and np.isfinite(r["final_loss"])
    )
  for name in ("summary.md", "summary.json", "summary.png"):
    assert os.path.getsize(tmp_path / name) > 0
  assert "| 512 | 512 |" in (tmp_path / "summary.md").read_text()
  with open(tmp_path / "1_512" / "vniah" / "all_accuracies.json") as f:
    assert {r["Num. Frame"] for r in json.load(f)} == {128}  # 512 tokens / 4 per frame
  assert os.path.exists(tmp_path / "1_512" / "text_niah" / "heatmap.png")

  # Stage 2 began from stage 1's final parameters, resharded onto its context-2 mesh.
  def params(k, stage, step):
    cfg = stages.stage_config(ext.base, stage)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    task = stages.make_task(cfg, stage)
    setup = state_lib.setup(task.model_fn, cfg.train.optimizer, cfg.train.steps, mesh, task.rules)
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / f"{k}_{stage.name}"), async_save=False)
    _, state, _ = ckpt.restore(setup.abstract, step=step)
    ckpt.close()
    return state

  end1 = params(0, ext.stages[0], 1)
  start2 = params(1, ext.stages[1], 0)
  assert int(start2["step"]) == 0
  for a, b in zip(jax.tree.leaves(end1["params"]), jax.tree.leaves(start2["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert MeshConfig().context == 1  # the base mesh is untouched by stage overrides
