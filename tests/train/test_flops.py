"""FLOP accounting and MFU: peak table, mask-density attention, the VLM step's count."""

import numpy as np
import pytest

from lcv import masks
from lcv.config import DecoderConfig, ProjectorConfig, VisionConfig, VLMConfig
from lcv.models import decoder as decoder_lib
from lcv.train import flops, task


def test_peak_table():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("cpu") is None
  assert flops.mfu(1e12, 1.0, "cpu", 8) is None
  assert flops.mfu(989e12, 2.0, "NVIDIA H100", 1) == pytest.approx(0.5)


def test_attended_pairs_counts_the_mask():
  seg = np.array([[1, 1, 1, 2, 2, 0]])
  frame = np.array([[-1, 0, 0, -1, -1, -1]])
  lo, hi = masks.intervals(seg, frame, True)
  dense = np.asarray(masks.dense(seg, frame, True)).sum()
  assert flops.attended_pairs(lo, hi, masks.key_indices(1, 6)) == dense


def test_dense_stack_matches_the_decoder_formula():
  cfg = DecoderConfig.variant("tiny")
  shape = flops.Shape(
    layers=cfg.num_layers, embed=cfg.embed_dim, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim, mlp=cfg.mlp_dim, vocab=cfg.vocab_size,
  )  # fmt: skip
  s = 128
  ours = flops.train_flops(shape, s, s * s * 0.5)
  theirs = decoder_lib.flops_per_token(cfg, s, mask_density=0.5) * s
  assert ours == pytest.approx(theirs)


def test_frozen_tower_costs_a_forward_only():
  vision = VisionConfig.variant("tiny", patch=7, class_token=False)
  cfg = VLMConfig(
    decoder=DecoderConfig.variant("tiny"),
    vision=vision,
    projector=ProjectorConfig(in_dim=vision.width, out_dim=64),
  )
  trained = task.vision_flops_per_frame(cfg)
  frozen = task.vision_flops_per_frame(cfg, tower_trainable=False)
  assert 0.3 * trained < frozen < trained
