"""Prompt templates and LongVA's placement of the prompt pieces around the frames.

LongVA builds every V-NIAH input from embeddings in this order (vlm_methods.md section 1.4):

    preprompt | frames (num_frames + 1) x tokens_per_frame | question | postprompt | answer

with no <image> token, no image start/end markers and no separators between frames. Text pieces
are tokenised separately (a tokenizer-added leading BOS is dropped, LongVA's `safe_tokenize`);
for Llama-3 LongVA optionally splits the "\\n\\n" token into two "\\n" tokens in the pre- and
postprompt (`--replace_double_newline`). The template strings below are LongVA's, verbatim;
"plain" (no chat wrapping) is ours, for base and toy models.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Llama-3 ids of "\n\n" and "\n" (LongVA's replace_double_newline).
LLAMA3_DOUBLE_NEWLINE, LLAMA3_NEWLINE = 271, 198


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """Text before the frames and after the question (ending where the answer starts).

  stop: the end-of-turn text that ends greedy generation (ours; LongVA's scorer never generates).
  """

  preprompt: str
  postprompt: str
  stop: str = ""


TEMPLATES = {
  "qwen2": PromptTemplate(
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    "<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|>",
  ),
  "llama3": PromptTemplate(
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language "
    "and vision assistant. You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n",
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|eot_id|>",
  ),
  "vicuna": PromptTemplate(
    "<s>A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions. USER:",
    "ASSISTANT:",
    "</s>",
  ),
  "mistral": PromptTemplate("<s>[INST]", " [/INST]", "</s>"),
  "yi": PromptTemplate(
    "<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n",
    "<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|>",
  ),
  "plain": PromptTemplate("", "\n", "\n"),
}


def get_template(name: str) -> PromptTemplate:
  if name not in TEMPLATES:
    raise ValueError(f"prompt_template={name!r} is not one of {sorted(TEMPLATES)}")
  return TEMPLATES[name]


def text_ids(tokenizer, text: str) -> np.ndarray:
  """Token ids of `text` without a tokenizer-added leading BOS (LongVA's safe_tokenize): int32[n].

  `tokenizer` has `encode(str) -> list[int]` and optionally `bos_id` (`lcv.data.tokenizer`).
  """
  ids = list(tokenizer.encode(text))
  if ids and _adds_bos(tokenizer):
    ids = ids[1:]
  return np.asarray(ids, np.int32)


def _adds_bos(tokenizer) -> bool:
  """Whether `encode` prepends BOS to plain text (literal "<s>" in a template stays)."""
  bos = getattr(tokenizer, "bos_id", None)
  probe = list(tokenizer.encode("a"))
  return bos is not None and len(probe) > 1 and probe[0] == bos


def split_double_newline(ids, double: int = LLAMA3_DOUBLE_NEWLINE, single: int = LLAMA3_NEWLINE):
  """Replace every `double` id by two `single` ids (LongVA's replace_double_newline)."""
  out = []
  for i in np.asarray(ids).tolist():
    out.extend([single, single] if i == double else [i])
  return np.asarray(out, np.int32)


@dataclasses.dataclass(frozen=True)
class PromptPieces:
  """Token ids of the text pieces of one needle, int32[n] each."""

  pre: np.ndarray
  question: np.ndarray
  post: np.ndarray
  answer: np.ndarray


def prompt_pieces(
  tokenizer,
  template: PromptTemplate,
  question: str,
  answer: str,
  *,
  replace_double_newline: bool = False,
) -> PromptPieces:
  """Tokenise the four text pieces separately, as LongVA embeds them separately."""
  pre = text_ids(tokenizer, template.preprompt)
  post = text_ids(tokenizer, template.postprompt)
  if replace_double_newline:
    pre, post = split_double_newline(pre), split_double_newline(post)
  answer_ids = text_ids(tokenizer, answer)
  if answer_ids.size == 0:
    raise ValueError(f"{answer=} tokenises to no ids")
  return PromptPieces(pre, text_ids(tokenizer, question), post, answer_ids)


def stop_ids(tokenizer, template: PromptTemplate) -> tuple[int, ...]:
  """Ids that end generation: the tokenizer's EOS and the template's stop text if it is one id."""
  ids = {int(i) for i in [getattr(tokenizer, "eos_id", None)] if i is not None}
  stop = text_ids(tokenizer, template.stop) if template.stop else np.zeros(0, np.int32)
  if stop.size == 1:
    ids.add(int(stop[0]))
  return tuple(sorted(ids))


def decode(tokenizer, ids) -> str:
  """Text of ids, skipping ids beyond the tokenizer's vocabulary (a model's padded vocab rows)."""
  size = getattr(tokenizer, "vocab_size", None)
  return tokenizer.decode([int(i) for i in ids if size is None or int(i) < size])
