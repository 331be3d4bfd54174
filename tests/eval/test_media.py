"""Needle sets, haystack sources, preprocessing and the heatmap's table."""

import numpy as np
import pytest
from PIL import Image

from lcv.eval import haystack, needles, plots


def test_builtin_needles_follow_longva_format():
  ns = needles.builtin_needles(64)
  assert len(ns) == 5 and len({n.name for n in ns}) == 5
  for n in ns:
    assert n.image.shape == (64, 64, 3) and n.image.dtype == np.uint8
    assert n.distractor.shape == n.image.shape and not np.array_equal(n.distractor, n.image)
    assert n.question.startswith("\n")
    assert n.question.endswith((needles.MC_SUFFIX, needles.OPEN_SUFFIX))
  mc = [n for n in ns if n.question.endswith(needles.MC_SUFFIX)]
  assert len(mc) == 2 and all(n.answer in "ABCD" for n in mc)
  assert all(np.array_equal(a.image, b.image) for a, b in zip(ns, needles.builtin_needles(64)))


def test_needle_json_round_trip(tmp_path):
  ns = needles.builtin_needles(32)
  path = str(tmp_path / "set" / "needles.json")
  needles.save_needles(ns, path)
  back = needles.load_needles(path)
  assert [(n.name, n.question, n.answer) for n in back] == [
    (n.name, n.question, n.answer) for n in ns
  ]
  assert all(np.array_equal(a.image, b.image) for a, b in zip(ns, back))
  (tmp_path / "bad.json").write_text('[{"image": "x.png"}]')
  with pytest.raises(ValueError, match="lacks"):
    needles.load_needles(str(tmp_path / "bad.json"))


def test_synthetic_haystack_is_deterministic_and_prefix_stable():
  a = haystack.synthetic_frames(10, size=24, seed=3)
  b = haystack.synthetic_frames(4, size=24, seed=3)
  assert a.shape == (10, 24, 24, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a[:4], b)
  assert not np.array_equal(a[0], a[8])  # another scene
  assert np.abs(a[0].astype(int) - a[1]).mean() < np.abs(a[0].astype(int) - a[8]).mean()


def test_directory_haystack_and_errors(tmp_path):
  for i in range(3):
    Image.fromarray(np.full((8, 12, 3), 40 * i, np.uint8)).save(tmp_path / f"f{i:03d}.png")
  frames = haystack.load_haystack(str(tmp_path), 2)
  assert frames.shape == (2, 8, 12, 3) and frames[1, 0, 0, 0] == 40
  with pytest.raises(ValueError, match="fewer than max_frames"):
    haystack.load_haystack(str(tmp_path), 5)
  with pytest.raises(FileNotFoundError, match="synthetic"):
    haystack.load_haystack(str(tmp_path / "missing.mp4"), 5)


def test_to_pixels_pads_to_square_with_mean_colour():
  frame = np.full((4, 8, 3), 255, np.uint8)
  mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
  pixels = haystack.to_pixels(frame[None], 8, mean, std)
  assert pixels.shape == (1, 8, 8, 3) and pixels.dtype == np.float32
  np.testing.assert_allclose(pixels[0, 4, 4], 1.0, atol=1e-6)  # white content
  np.testing.assert_allclose(pixels[0, 0, 0], 0.0, atol=0.01)  # mean-colour padding


def test_heatmap_table_and_ticks(tmp_path):
  records = [
    {"Num. Frame": n, "Frame Depth": d, "Score": s}
    for n, d, s in [(200, 0, 1.0), (1200, 0, 0.0), (200, 50, 0.5), (200, 50, 1.0)]
  ]
  xs, ys, scores = plots.grid(records, "Num. Frame", "Frame Depth")
  assert xs == [200, 1200] and ys == [0, 50]
  np.testing.assert_array_equal(scores[0], [1.0, 0.0])
  assert scores[1, 0] == 0.75 and np.isnan(scores[1, 1])
  assert [plots.thousands(x) for x in (200, 1200, 3000)] == ["200", "1.2K", "3.0K"]
  plots.heatmap(records, str(tmp_path / "h.png"))
  assert Image.open(tmp_path / "h.png").size == (1750, 800)


def test_video_haystack_is_sampled_at_one_fps(tmp_path):
  """A 4 fps clip whose frames encode their own index: 1 fps keeps frames 0, 4, 8, ..."""
  av = pytest.importorskip("av")  # the `data` extra
  path = str(tmp_path / "clip.mp4")
  with av.open(path, mode="w") as out:
    stream = out.add_stream("mpeg4", rate=4)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    for k in range(20):
      img = np.full((32, 32, 3), 10 * k, np.uint8)  # frame k is flat grey 10k
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  frames = haystack.video_frames(path, max_frames=4, fps=1.0)
  assert frames.shape == (4, 32, 32, 3)
  np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), [0, 40, 80, 120], atol=4)
  assert haystack.load_haystack(path, 3).shape[0] == 3
