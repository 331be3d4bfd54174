"""Tokenizers: a built-in byte-level one for synthetic data, or a local Hugging Face directory.

Both expose the same small surface: `encode(str) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
and the special ids `pad_id`, `bos_id`, `eos_id`. Visual tokens have no ids of their own: packing
marks their slots with `modality = 1` and the model embeds media there (`visual_slot`).
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids: 0 pad, 1 bos, 2 eos; vocab 259."""

  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  offset: int = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self.offset

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizer.json` from a local directory, through the `tokenizers` package (no downloads)."""

  def __init__(self, path: str):
    try:
      import tokenizers
    except ImportError as e:
      raise ImportError(
        f"tokenizer={path!r} needs the `tokenizers` package: pip install 'lcv[data]', "
        "or use tokenizer='bytes'"
      ) from e
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
      raise FileNotFoundError(
        f"tokenizer={path!r}: no tokenizer.json there; pass a local Hugging Face tokenizer "
        "directory or tokenizer='bytes'"
      )
    self._tok = tokenizers.Tokenizer.from_file(file)
    vocab = self._tok.get_vocab()

    def find(*names):
      return next((vocab[n] for n in names if n in vocab), None)

    self.eos_id = find("<|endoftext|>", "</s>", "<eos>", "<|im_end|>")
    self.bos_id = find("<s>", "<bos>", "<|begin_of_text|>")
    self.pad_id = find("<pad>", "<|pad|>")
    if self.eos_id is None:
      raise ValueError(f"tokenizer={path!r} has no recognised end-of-text token")
    self.bos_id = self.eos_id if self.bos_id is None else self.bos_id
    self.pad_id = self.eos_id if self.pad_id is None else self.pad_id

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def load(name: str):
  """ "bytes" -> `ByteTokenizer`; anything else is a local tokenizer directory or file."""
  return ByteTokenizer() if name == "bytes" else HFTokenizer(name)
