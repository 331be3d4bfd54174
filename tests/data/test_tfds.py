"""TFDS reader and builder (skipped without the optional tensorflow-datasets)."""

import numpy as np
import pytest

tfds_lib = pytest.importorskip("tensorflow_datasets")

from lcv.data import tfds  # noqa: E402


class _Info:
  def __init__(self, keys):
    self.features = dict.fromkeys(keys)


class _Fake:
  def __init__(self, records, keys):
    self.records, self.dataset_info = records, _Info(keys)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def test_reader_maps_features_and_rejects_missing_ones():
  rec = {"image": np.zeros((4, 4, 3), np.uint8), "caption": b"a red circle"}
  src = tfds.Source(_Fake([rec], ["image", "caption"]), "fake")
  out = src[0]
  assert out["frames"].shape == (1, 4, 4, 3) and out["answer"] == "a red circle"
  with pytest.raises(ValueError, match="needs one text feature"):
    tfds.Source(_Fake([rec], ["image", "label"]), "fake")


def test_build_synthetic_round_trip(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds.LcvSyntheticVideos, "SPLITS", {"train": 4, "validation": 2})
  tfds.build_synthetic(str(tmp_path))
  from lcv.config import DataConfig

  src = tfds.source(DataConfig(tfds_name="lcv_synthetic_videos", tfds_dir=str(tmp_path)))
  assert len(src) == 4 and src[0]["frames"].dtype == np.uint8


def test_pipeline_reads_the_built_set(tmp_path, monkeypatch):
  from lcv.config import DataConfig
  from lcv.data import pipeline

  monkeypatch.setattr(tfds.LcvSyntheticVideos, "SPLITS", {"train": 6, "validation": 2})
  tfds.build_synthetic(str(tmp_path))
  cfg = DataConfig(
    source="tfds",
    tfds_name="lcv_synthetic_videos",
    tfds_dir=str(tmp_path),
    seq_len=512,
    batch_size=2,
    image_size=16,  # 32 px frames resized to 16
    max_frames=3,
    prefetch=0,
  )
  batch = next(pipeline.Pipeline(cfg, tokens_per_frame=4))
  assert batch["frames"].shape[2:] == (16, 16, 3) and batch["frames"].any()
  assert (batch["layout"].frame_ids.max(axis=1) <= 2).all()  # at most max_frames per sample
  with pytest.raises(ValueError, match="cannot open TFDS dataset 'nope'"):
    tfds.source(DataConfig(source="tfds", tfds_name="nope", tfds_dir=str(tmp_path)))
