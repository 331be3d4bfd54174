"""The input pipeline: deterministic, resumable from its state, host-count independent; media ops;
host-to-device feeding."""

import dataclasses

import numpy as np
import pytest

from lcv.config import DataConfig, MeshConfig
from lcv.data import feeding, media, pipeline, synthetic
from lcv.data.tokenizer import ByteTokenizer
from lcv.parallel import mesh as mesh_lib

CFG = DataConfig(seq_len=192, batch_size=4, image_size=16, synthetic_frames=(1, 3), prefetch=2)
N_TOK = 4


def _take(p, n):
  out = [next(p) for _ in range(n)]
  p.close()
  return out


def _same(a, b):
  for k in ("tokens", "targets", "weights", "frames", "row_id"):
    np.testing.assert_array_equal(a[k], b[k])
  np.testing.assert_array_equal(a["layout"].segment_ids, b["layout"].segment_ids)


def test_deterministic_and_prefetch_free():
  a = _take(pipeline.Pipeline(CFG, N_TOK), 3)
  b = _take(pipeline.Pipeline(dataclasses.replace(CFG, prefetch=0), N_TOK), 3)
  for x, y in zip(a, b):
    _same(x, y)
  c = _take(pipeline.Pipeline(dataclasses.replace(CFG, seed=1), N_TOK), 1)
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_resume_from_state():
  p = pipeline.Pipeline(CFG, N_TOK)
  _take(p, 2)
  state = pipeline.global_state(p)
  expected = _take(p, 2)
  q = pipeline.Pipeline(CFG, N_TOK)
  q.set_state(state)
  for x, y in zip(expected, _take(q, 2)):
    _same(x, y)
  with pytest.raises(ValueError, match="batch_size=4"):
    q.set_state({"cursors": [0, 0]})


def test_host_slots_compose_the_global_batch():
  full = _take(pipeline.Pipeline(CFG, N_TOK), 2)
  lo = _take(pipeline.Pipeline(CFG, N_TOK, slots=[0, 1]), 2)
  hi = _take(pipeline.Pipeline(CFG, N_TOK, slots=[2, 3]), 2)
  for f, a, b in zip(full, lo, hi):
    np.testing.assert_array_equal(f["tokens"], np.concatenate([a["tokens"], b["tokens"]]))


def test_seq_len_out_of_position_range():
  with pytest.raises(ValueError, match="exact positions' range"):
    pipeline.Pipeline(dataclasses.replace(CFG, seq_len=2**24), N_TOK)


def test_synthetic_answers_read_the_frame():
  e = synthetic.example(3, 11, image_size=16, frames=(2, 2))
  assert e["frames"].shape == (2, 16, 16, 3) and e["frames"].dtype == np.uint8
  again = synthetic.example(3, 11, image_size=16, frames=(2, 2))
  np.testing.assert_array_equal(e["frames"], again["frames"])
  if e["kind"] != "caption":
    k = int(e["prompt"].split("frame ")[1].split("?")[0])
    assert e["answer"] in e["objects"][k]


def test_media_ops():
  np.testing.assert_array_equal(media.sample_frames(10, 4), [1, 3, 6, 8])
  np.testing.assert_array_equal(media.sample_frames(3, 4), [0, 1, 2])
  np.testing.assert_array_equal(
    media.sample_frames(90, 8, mode="fps", fps=1, source_fps=30), [0, 30, 60]
  )
  frames = np.arange(2 * 4 * 8 * 3, dtype=np.uint8).reshape(2, 4, 8, 3)
  out = media.resize_pad(frames, 16)
  assert out.shape == (2, 16, 16, 3) and not out[:, 8:].any()
  patches = media.patchify(out, 8)
  assert patches.shape == (2, 4, 8 * 8 * 3)
  np.testing.assert_array_equal(patches[0, 1].reshape(8, 8, 3), out[0, :8, 8:])
  with pytest.raises(ValueError, match=r"must be \[F, H, W, C\]"):
    media.check_frames(np.zeros((2, 3, 4, 5, 6), np.uint8))
  with pytest.raises(ValueError, match="multiple of patch=5"):
    media.patchify(out, 5)


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  assert tok.decode(tok.encode("frame 3: rot")) == "frame 3: rot"
  assert min(tok.encode("\x00")) >= 3 and tok.vocab_size == 259


def test_to_device_shards_rows_over_data_and_fsdp():
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=4))
  slots = feeding.host_slots(mesh, 8)
  assert slots == list(range(8))
  batch = {"tokens": np.arange(8 * 6, dtype=np.int32).reshape(8, 6)}
  out = feeding.to_device(batch, mesh, slots, 8)
  assert out["tokens"].sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(np.asarray(out["tokens"]), batch["tokens"])
  with pytest.raises(ValueError, match="multiple of data x fsdp = 8"):
    feeding.check_batch(12, mesh)
