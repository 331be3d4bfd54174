"""TFDS: builders for our synthetic sets, and a reader for users' (video | images, text) datasets.

Needs the optional extra `data` (tensorflow-datasets); this module is imported only when
`data.source = "tfds"` or a builder is used. Reading goes through `tfds.data_source`, random access
over array_record files, so the pipeline's per-index shuffling and exact resume apply unchanged.

Features a dataset must have (one media feature, one answer feature):

  video    uint8 [F, H, W, 3]   frames of a clip        } exactly one of these three, or none
  images   uint8 [N, H, W, 3]   a set of images          } for text-only samples
  image    uint8 [H, W, 3]      one image                }
  answer   text                 the trained-on text (alias: "caption")
  prompt   text (optional)      the instruction / question, not trained on by default
  fps      float32 (optional)   the clip's frame rate, for `frame_sampling = "fps"`

Build our synthetic set once (no downloads) and train from it:

    python -c "from lcv.data import tfds; tfds.build_synthetic('/data/tfds')"
    python scripts/train.py ... --set data.source=tfds \
        --set data.tfds_name=lcv_synthetic_videos --set data.tfds_dir=/data/tfds
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from lcv.config import DataConfig
from lcv.data import synthetic

MEDIA_FEATURES = ("video", "images", "image")
ANSWER_FEATURES = ("answer", "caption")


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class Source:
  """Random access over a TFDS data source, yielding the pipeline's example dicts."""

  def __init__(self, data_source, name: str):
    features = set(data_source.dataset_info.features.keys())
    media = [f for f in MEDIA_FEATURES if f in features]
    answer = [f for f in ANSWER_FEATURES if f in features]
    if len(media) > 1 or not answer:
      raise ValueError(
        f"TFDS dataset {name!r} has features {sorted(features)}; it needs one text feature of "
        f"{ANSWER_FEATURES} and at most one media feature of {MEDIA_FEATURES} (see lcv.data.tfds)"
      )
    self.data_source, self.media = data_source, media[0] if media else None
    self.answer = answer[0]
    self.has_prompt, self.has_fps = "prompt" in features, "fps" in features

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict:
    record = self.data_source[int(index)]
    frames = None
    if self.media is not None:
      frames = np.asarray(record[self.media], np.uint8)
      if self.media == "image":
        frames = frames[None]
    out = {
      "frames": frames,
      "prompt": _text(record["prompt"]) if self.has_prompt else "",
      "answer": _text(record[self.answer]),
    }
    if self.has_fps:
      out["fps"] = float(record["fps"])
    return out


def source(cfg: DataConfig) -> Source:
  """The TFDS dataset `cfg.tfds_name` ("name" or "name:version"), split `cfg.split`."""
  if not cfg.tfds_name:
    raise ValueError("data.source='tfds' needs data.tfds_name (a prepared TFDS dataset)")
  try:
    ds = tfds.data_source(cfg.tfds_name, split=cfg.split, data_dir=cfg.tfds_dir)
  except Exception as e:  # TFDS raises several types for unknown / unprepared datasets
    raise ValueError(
      f"cannot open TFDS dataset {cfg.tfds_name!r} split {cfg.split!r} in {cfg.tfds_dir!r} "
      f"({type(e).__name__}: {e}); prepare it with file_format='array_record' first"
    ) from e
  return Source(ds, cfg.tfds_name)


class LcvSyntheticVideos(tfds.core.GeneratorBasedBuilder):
  """Procedural videos with captions / questions (`lcv.data.synthetic`), raw uint8 frames."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  IMAGE_SIZE = 32
  FRAMES = (2, 8)
  SPLITS = {"train": 20_000, "validation": 1_000}

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.IMAGE_SIZE
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "video": tfds.features.Tensor(shape=(None, s, s, 3), dtype=np.uint8),
          "prompt": tfds.features.Text(),
          "answer": tfds.features.Text(),
        }
      ),
      description=synthetic.__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    seeds = {"train": 0, "validation": 1}
    return {split: self._generate_examples(seeds[split], n) for split, n in self.SPLITS.items()}

  def _generate_examples(self, seed: int, n: int):
    for i in range(n):
      e = synthetic.example(seed, i, image_size=self.IMAGE_SIZE, frames=self.FRAMES)
      yield i, {"video": e["frames"], "prompt": e["prompt"], "answer": e["answer"]}


def build_synthetic(data_dir: str) -> tfds.core.DatasetBuilder:
  """Prepare `lcv_synthetic_videos` under `data_dir` as array_record files."""
  builder = LcvSyntheticVideos(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder
