"""The flagship demo (scripts/demo.py, configs/demo.py): presets and knobs, and a short run of the
real training loop (ring attention over the 8 emulated devices) and V-NIAH evaluation."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from tests.eval.test_scripts import ROOT, load_script


def test_presets_and_knobs():
  demo = load_script("demo")
  path = os.path.join(ROOT, "configs", "demo.py")
  cpu, gpu = demo.load_demo(path), demo.load_demo(f"{path}:preset=gpu")
  assert (cpu.mesh.context, cpu.seq_len, cpu.model.decoder.attention_impl) == (8, 256, "ring")
  assert (gpu.mesh.context, gpu.seq_len, gpu.model.decoder.attention_impl) == (1, 512, "auto")
  assert cpu.model.decoder.logn_scale_len == gpu.model.decoder.logn_scale_len == 64
  off = demo.load_demo(f"{path}:logn=0,positions=tad,steps=7")
  assert (off.model.decoder.logn_scale_len, off.model.decoder.rope.positions, off.steps) == (
    0, "tad", 7
  )  # fmt: skip
  with pytest.raises(ValueError, match="unknown knob"):
    demo.load_demo(f"{path}:logm=3")
  with pytest.raises(ValueError, match="preset="):
    demo.load_demo(f"{path}:preset=tpu")


def test_short_run_trains_and_evaluates(tmp_path):
  demo = load_script("demo")
  from lcv.data import tokenizer as tokenizer_lib
  from lcv.parallel import mesh as mesh_lib

  cfg = demo.load_demo(os.path.join(ROOT, "configs", "demo.py"))
  cfg = dataclasses.replace(cfg, steps=4, batch=8, eval_scales=(1,), depths=(0.0, 1.0))
  mesh = mesh_lib.make_mesh(
    dataclasses.replace(cfg.mesh, data=1, fsdp=1, tensor=1), jax.devices()[: cfg.mesh.context]
  )
  tok = tokenizer_lib.load("bytes")
  model, history = demo.train(cfg, mesh, tok, log=lambda s: None)
  # Metrics are fetched in batches (every 25 steps and at the end): none may be lost.
  assert [h["step"] for h in history] == [1, 2, 3, 4]
  assert all(np.isfinite(h["loss"]) and 0 <= h["accuracy"] <= 1 for h in history)
  records = demo.evaluate(cfg, model, mesh, tok, str(tmp_path))
  assert {r["Frame Depth"] for r in records} == {0.0, 100.0}
  assert all(len(r["predictions"]) == len(cfg.eval_digits) for r in records)
  table = demo.accuracy_table(records, cfg.seq_len)
  assert table.count("\n") == 4 and "(1x)" in table
  assert os.path.exists(tmp_path / "vniah" / "heatmap.png")
