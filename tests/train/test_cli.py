"""scripts/train.py: config loading and --set overrides (no training here)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from scripts import train  # noqa: E402


def test_load_config_with_arg_and_overrides():
  cfg = train.load_config(os.path.join(ROOT, "configs", "train_tiny.py") + ":steps=7,context=2")
  assert cfg.train.steps == 7 and cfg.mesh.context == 2
  cfg = train.override(cfg, "train.optimizer.lr", 1)
  assert cfg.train.optimizer.lr == 1.0 and isinstance(cfg.train.optimizer.lr, float)
  cfg = train.override(cfg, "train.optimizer.groups", [["^vision/", 0.0]])
  assert cfg.train.optimizer.groups == (("^vision/", 0.0),)
  cfg = train.override(cfg, "train.data.source", train._parse_value("tfds"))
  assert cfg.train.data.source == "tfds"


def test_scan_knob_sets_the_decoder_layout():
  path = os.path.join(ROOT, "configs", "qwen2_1_5b.py")
  assert train.load_config(path).model.decoder.scan_layers
  cfg = train.load_config(path + ":remat=dots_attention,scan=false")
  assert not cfg.model.decoder.scan_layers and cfg.model.decoder.remat == "dots_attention"


def test_bad_overrides_and_paths_are_clear_errors():
  cfg = train.load_config(os.path.join(ROOT, "configs", "train_tiny.py"))
  with pytest.raises(ValueError, match="TrainConfig has no field 'step'"):
    train.override(cfg, "train.step", 3)
  with pytest.raises(FileNotFoundError, match="configs/NAME.py"):
    train.load_config("configs/nope.py")
  with pytest.raises(ValueError, match="unknown knob 'stepz'"):
    train.load_config(os.path.join(ROOT, "configs", "train_tiny.py") + ":stepz=3")
