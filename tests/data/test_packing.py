"""Masked packing on hand-made samples: segment ids, position reset, no labels across samples,
per-role weights, and the layout it hands to the mask."""

import numpy as np
import pytest

from lcv import masks, positions
from lcv.data import packing
from lcv.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
N_TOK, SIZE = 2, 8


def _example(n_frames, prompt="Q", answer="ab"):
  frames = np.full((n_frames, SIZE, SIZE, 3), 7, np.uint8)
  return {"frames": frames, "prompt": prompt, "answer": answer}


def _sample(n_frames, **kw):
  return packing.tokenize(
    _example(n_frames, **kw), TOK, N_TOK, answer_weight=1.0, prompt_weight=0.5
  )


def test_tokenize_layout_and_weights():
  s = _sample(2)
  # bos, 2 frames x 2 visual, "\nQ" (2), " ab" (3), eos
  assert len(s) == 1 + 4 + 2 + 3 + 1
  assert s.tokens[0] == TOK.bos_id and s.tokens[-1] == TOK.eos_id
  assert TOK.decode(s.tokens[5:]) == "\nQ ab"
  np.testing.assert_array_equal(s.weight, [0.5, 0, 0, 0, 0, 0.5, 0.5, 1, 1, 1, 1])


def test_pack_two_samples_no_cross_labels():
  a, b = _sample(1), _sample(0, answer="c")
  row = packing.stack([packing.pack([a, b], 24, N_TOK, SIZE)])
  lay = row["layout"]
  la, lb = len(a), len(b)
  np.testing.assert_array_equal(lay.segment_ids[0], [1] * la + [2] * lb + [0] * (24 - la - lb))
  np.testing.assert_array_equal(lay.frame_ids[0, :la], [-1, 0, 0] + [-1] * (la - 3))
  tokens, targets, weights = row["tokens"][0], row["targets"][0], row["weights"][0]
  # Inside a sample, targets are the next token; the last token of each sample predicts nothing.
  np.testing.assert_array_equal(targets[: la - 1], tokens[1:la])
  assert targets[la - 1] == 0 and weights[la - 1] == 0
  np.testing.assert_array_equal(targets[la : la + lb - 1], tokens[la + 1 : la + lb])
  assert weights[la + lb - 1] == 0 and not weights[la + lb :].any()
  # Targets that are visual slots carry no loss; the answer (and eos) carries weight 1.
  assert weights[0] == 0 and weights[1] == 0
  np.testing.assert_array_equal(weights[la - 4 : la - 1], [1, 1, 1])
  # Frames are laid out in order; the rest is zero padding.
  assert row["frames"].shape == (1, 24 // N_TOK, SIZE, SIZE, 3)
  assert row["frames"][0, 0].max() == 7 and row["frames"][0, 1:].max() == 0


def test_positions_restart_and_mask_stays_in_sample():
  a, b = _sample(1), _sample(2)
  row = packing.stack([packing.pack([a, b], 32, N_TOK, SIZE)])
  lay = row["layout"]
  pos = positions.to_float64(positions.one_d(lay.segment_ids))[0]
  np.testing.assert_array_equal(pos[: len(a)], np.arange(len(a)))
  np.testing.assert_array_equal(pos[len(a) : len(a) + len(b)], np.arange(len(b)))
  allow = np.asarray(masks.dense(lay.segment_ids, lay.frame_ids, True))[0]
  seg = lay.segment_ids[0]
  assert not allow[seg == 2][:, seg == 1].any() and not allow[seg == 1][:, seg == 2].any()


def test_row_packer_is_greedy_in_order_and_resumable():
  samples = [_sample(n % 3) for n in range(40)]
  packer = packing.RowPacker(lambda j: samples[j], 40, N_TOK, SIZE)
  cursor, rows = 0, []
  for _ in range(3):
    row, nxt = packer.row(cursor)
    used = sum(len(samples[j]) for j in range(cursor, nxt))
    assert used <= 40 < used + len(samples[nxt])
    assert (row["layout"].segment_ids > 0).sum() == used
    rows.append((cursor, row))
    cursor = nxt
  fresh = packing.RowPacker(lambda j: samples[j], 40, N_TOK, SIZE)
  again, _ = fresh.row(rows[1][0])
  np.testing.assert_array_equal(again["tokens"], rows[1][1]["tokens"])


def test_too_long_sample_and_wrong_frames_are_clear_errors():
  big = _sample(30)
  with pytest.raises(ValueError, match="raise data.seq_len"):
    packing.RowPacker(lambda j: big, 32, N_TOK, SIZE).row(0)
  odd = packing.tokenize(
    {"frames": np.zeros((1, 4, 4, 3), np.uint8), "prompt": "", "answer": ""}, TOK, N_TOK
  )
  with pytest.raises(ValueError, match="resize_pad"):
    packing.pack([odd], 32, N_TOK, SIZE)
