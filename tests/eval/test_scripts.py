"""scripts/eval_vniah.py and scripts/eval_text_niah.py: config handling and a checkpoint run."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

from lcv.config import VNIAHConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script(name):
  path = os.path.join(ROOT, "scripts", f"{name}.py")
  sys.path.insert(0, os.path.dirname(path))
  try:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.pop(0)
  return module


def test_overrides_and_find():
  ev = load_script("eval_vniah")
  cfgs = {"vniah": VNIAHConfig()}
  out = ev.apply_overrides(
    cfgs, ["vniah.max_frames=400", "vniah.distractor=true", "vniah.image_mean=0.5,0.5,0.5",
           "vniah.v2pe_delta=0.25", "vniah.haystack=movie.mp4"]
  )  # fmt: skip
  v = out["vniah"]
  assert (v.max_frames, v.distractor, v.image_mean, v.v2pe_delta, v.haystack) == (
    400, True, (0.5, 0.5, 0.5), 0.25, "movie.mp4"
  )  # fmt: skip
  with pytest.raises(ValueError, match="no field"):
    ev.apply_overrides(cfgs, ["vniah.frames=3"])
  with pytest.raises(ValueError, match="section.field=value"):
    ev.apply_overrides(cfgs, ["max_frames=3"])
  assert ev.find({"a": 1, "b": v}, VNIAHConfig) is v and ev.find(None, VNIAHConfig) is None


CONFIG = """
from lcv.config import *

def get_config(arg=""):
  return dict(
    model=VLMConfig(
      decoder=DecoderConfig.variant("tiny", attention_impl="xla"),
      vision=VisionConfig.variant("tiny"),
      projector=ProjectorConfig(in_dim=32, out_dim=64),
    ),
    train=TrainConfig(steps=10),
    mesh=MeshConfig(fsdp=-1),
    vniah=VNIAHConfig(min_frames=3, max_frames=3, frame_step=1, depth_step=1.0, image_size=28,
                      prompt_template="plain", pad_multiple=128, encode_batch=4,
                      cache_dir={cache!r}, output_dir={out!r}),
  )
"""


def test_eval_vniah_from_a_training_checkpoint(tmp_path):
  from flax import nnx

  from lcv.models import vlm
  from lcv.parallel import mesh as mesh_lib
  from lcv.parallel import rules
  from lcv.train import checkpoint, state

  ev = load_script("eval_vniah")
  config = tmp_path / "run.py"
  config.write_text(CONFIG.format(cache=str(tmp_path / "cache"), out=str(tmp_path / "out")))
  run = ev.load_config(str(config))
  mesh = mesh_lib.make_mesh(run["mesh"])
  setup = state.setup(
    lambda: vlm.VLM(run["model"], rngs=nnx.Rngs(0)), run["train"].optimizer, 10, mesh, rules.RULES
  )
  rng = np.random.default_rng(0)
  fill = lambda x: jax.device_put(  # random weights without the slow eager init
    (rng.normal(size=x.shape) * 0.2).astype(x.dtype)
    if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else np.zeros(x.shape, x.dtype),
    x.sharding,
  )  # fmt: skip
  train_state = jax.tree.map(fill, setup.abstract)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), async_save=False)
  ckpt.save(7, train_state, {"cursors": []}, force=True)
  ckpt.close()
  ev.main([
    "--config", str(config), "--checkpoint", str(tmp_path / "run"), "--tokenizer", "bytes",
    "--no_progress", "--devices", "2", "--set", "vniah.depth_step=0.5",
  ])  # fmt: skip
  records = json.loads((tmp_path / "out" / "all_accuracies.json").read_text())
  assert [r["Frame Depth"] for r in records] == [0.0, 50.0, 100.0]
  assert (tmp_path / "out" / "heatmap.png").exists()
  key = os.listdir(tmp_path / "cache")
  assert len(key) == 1 and key[0].endswith("7")  # the embedding cache is keyed by the step


def test_eval_text_niah_main(tmp_path, monkeypatch):
  from types import SimpleNamespace

  from lcv.config import TextNIAHConfig
  from lcv.data.tokenizer import ByteTokenizer
  from tests.eval import toy_models

  script = load_script("eval_text_niah")
  cfg = TextNIAHConfig(
    min_tokens=256, max_tokens=256, depth_step=1.0, num_samples=1, prompt_template="plain",
    pad_multiple=256, output_dir=str(tmp_path / "text"),
  )  # fmt: skip
  built = (SimpleNamespace(no_progress=True), {"text_niah": cfg}, toy_models.TextOracle(),
           ByteTokenizer(), None, "oracle")  # fmt: skip
  monkeypatch.setattr(script.eval_vniah, "build", lambda argv, doc: built)
  script.main([])
  text = json.loads((tmp_path / "text" / "all_accuracies.json").read_text())
  assert [(r["Context Length"], r["Depth"], r["Score"]) for r in text] == [
    (256, 0.0, 1.0), (256, 100.0, 1.0)
  ]  # fmt: skip
