"""LongVA's insertion rule, V-NIAH-D placement and prompt assembly on hand-made cases."""

import numpy as np
import pytest

from lcv.data.tokenizer import ByteTokenizer
from lcv.eval import cases, prompts


def test_grid_matches_longva_defaults():
  assert cases.frame_counts(200, 3000, 200) == list(range(200, 3001, 200))
  assert len(cases.frame_counts(200, 3000, 200)) == 15
  d = cases.depths(0.2)
  assert len(d) == 6 and d[0] == 0.0 and d[-1] == 1.0
  assert d == [float(x) for x in np.arange(0, 1.2, 0.2)]  # bit-exact numpy values
  assert [cases.depth_label(x) for x in d] == [0, 20, 40, 60, 80, 100]
  with pytest.raises(ValueError, match="min_frames"):
    cases.frame_counts(0, 10, 1)


def test_insertion_index_is_int_of_depth_times_frames():
  # LongVA: query_frame_idx = int(depth * num_frames), depth from np.arange (0.6000000000000001).
  d = cases.depths(0.2)
  assert [cases.insertion_index(x, 200) for x in d] == [0, 40, 80, 120, 160, 200]
  assert [cases.insertion_index(x, 7) for x in d] == [0, 1, 2, 4, 5, 7]
  assert cases.insertion_index(0.29, 100) == 28  # int() truncates 28.999999999999996


def test_frame_order_inserts_needle_as_extra_frame():
  order = cases.frame_order(5, 2, needle_row=100)
  np.testing.assert_array_equal(order, [0, 1, 100, 2, 3, 4])
  np.testing.assert_array_equal(cases.frame_order(3, 0, 9), [9, 0, 1, 2])  # depth 0: first
  np.testing.assert_array_equal(cases.frame_order(3, 3, 9), [0, 1, 2, 9])  # depth 1: last
  both = cases.frame_order(6, 1, 100, distractor_at=4, distractor_row=200)
  np.testing.assert_array_equal(both, [0, 100, 1, 2, 3, 200, 4, 5])
  before = cases.frame_order(6, 5, 100, distractor_at=2, distractor_row=200)
  np.testing.assert_array_equal(before, [0, 1, 200, 2, 3, 4, 100, 5])


def test_distractor_rule():
  rng = np.random.default_rng(0)
  assert cases.distractor_index(50, 100, 200, rng) is None  # no room on either side
  assert cases.distractor_index(100, 1000, 200, rng) == 300  # too close to the start: after
  assert cases.distractor_index(900, 1000, 200, rng) == 700  # too close to the end: before
  sides = {cases.distractor_index(500, 1000, 200, rng) for _ in range(50)}
  assert sides == {300, 700}


class Words:
  """Whitespace tokenizer with a BOS it prepends, to check LongVA's BOS stripping."""

  bos_id, eos_id = 1, 2

  def __init__(self):
    self.vocab = {"<s>": 1, "</s>": 2}

  def encode(self, text):
    return [1] + [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]


def test_prompt_pieces_strip_added_bos_and_keep_literal_one():
  tok = Words()
  t = prompts.PromptTemplate("<s> USER:", "ASSISTANT:")
  p = prompts.prompt_pieces(tok, t, "what ?", "B")
  assert p.pre.tolist() == [1, tok.vocab["USER:"]]  # the literal <s> stays, the added one goes
  assert p.answer.tolist() == [tok.vocab["B"]]
  assert p.question.tolist() == [tok.vocab["what"], tok.vocab["?"]]


def test_replace_double_newline():
  ids = prompts.split_double_newline([5, 271, 6, 271])
  assert ids.tolist() == [5, 198, 198, 6, 198, 198]


def test_sequence_layout_pre_frames_question_post_answer():
  tok = ByteTokenizer()
  t = prompts.get_template("qwen2")
  p = prompts.prompt_pieces(tok, t, "\nQ?", "Yes")
  seq = cases.build_sequence(p, num_frames=3, tokens_per_frame=2, pad_multiple=16)
  pre, n_vis = len(p.pre), 6
  assert len(seq.tokens) % 16 == 0
  text = tok.decode(seq.tokens[seq.segment_ids == 1][seq.visual_slot[seq.segment_ids == 1] < 0])
  assert text == t.preprompt + "\nQ?" + t.postprompt + "Yes"
  np.testing.assert_array_equal(seq.visual_slot[pre : pre + n_vis], np.arange(n_vis))
  np.testing.assert_array_equal(seq.frame_ids[pre : pre + n_vis], [0, 0, 1, 1, 2, 2])
  assert (seq.visual_slot[:pre] == -1).all() and (seq.visual_slot[pre + n_vis :] == -1).all()
  start = pre + n_vis + len(p.question) + len(p.post)
  assert seq.answer_start == start and seq.length == start + 3
  np.testing.assert_array_equal(seq.tokens[start : start + 3], p.answer)
  # LongVA reads argmax at prompt_len - 1 ... prompt_len + A - 2.
  np.testing.assert_array_equal(seq.logits_at(), [start - 1, start, start + 1])
  np.testing.assert_array_equal(
    seq.logits_at(5), [start - 1, start, start + 1, start + 1, start + 1]
  )


def test_templates_are_longva_strings():
  assert prompts.TEMPLATES["qwen2"].preprompt == (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
  )
  assert prompts.TEMPLATES["mistral"].postprompt == " [/INST]"
  assert set(prompts.TEMPLATES) == {"qwen2", "llama3", "vicuna", "mistral", "yi", "plain"}
  with pytest.raises(ValueError, match="prompt_template"):
    prompts.get_template("chatml")
