"""Vision-tower outputs cached on disk, keyed by model and media content.

LongVA encodes its haystack and needles once, offline, and every (frames, depth, needle) case is a
concatenation of cached embeddings (vlm_methods.md section 1.7). We do the same: frames go through
the model's `encode_media` in fixed-size chunks (one compilation), and each chunk's output is stored
as `<root>/<model_key>/<sha256>.npy`, where the hash covers the frames' pixels and the
preprocessing. A longer haystack reuses the chunks of a shorter one, an interrupted encoding
resumes, and a different checkpoint (another `model_key`) never sees stale embeddings.

bfloat16 outputs are stored as their uint16 bit pattern (numpy has no bfloat16 .npy type).
"""

from __future__ import annotations

import hashlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from lcv.eval import haystack as haystack_lib


class EmbeddingCache:
  """Encodes uint8 frames with `encode_fn` once per (model_key, content); returns cached arrays.

  Args:
    root: cache directory (created on demand).
    model_key: names the encoder weights, e.g. a checkpoint path + step; part of every file path.
    encode_fn: pixels float32[1, F, P, P, 3] -> float[1, F * n_tok, D] (`VLM.encode_media`,
      jitted).
    image_size, mean, std: preprocessing (`haystack.to_pixels`).
    chunk: frames per `encode_fn` call; the last chunk is padded so every call has one shape.
  """

  def __init__(
    self, root: str, model_key: str, encode_fn, *, image_size: int, mean, std, chunk: int = 32
  ):
    if chunk < 1:
      raise ValueError(f"{chunk=} must be >= 1 frames per vision-tower call")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_key).strip("_") or "model"
    self.dir = os.path.join(root, slug)
    self.encode_fn = encode_fn
    self.image_size = image_size
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)
    self.chunk = chunk
    self.encoded = 0  # frames sent through the vision tower by this object (cache misses)

  def _digest(self, frames: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr((frames.shape, self.image_size, self.mean, self.std)).encode())
    h.update(np.ascontiguousarray(frames).tobytes())
    return h.hexdigest()

  def _load(self, digest: str):
    for suffix, view in ((".npy", None), (".bf16.npy", jnp.bfloat16)):
      path = os.path.join(self.dir, digest + suffix)
      if os.path.exists(path):
        array = np.load(path)
        return array if view is None else array.view(view)
    return None

  def _store(self, digest: str, array: np.ndarray) -> None:
    os.makedirs(self.dir, exist_ok=True)
    bf16 = array.dtype == jnp.bfloat16
    path = os.path.join(self.dir, digest + (".bf16.npy" if bf16 else ".npy"))
    tmp = path + f".tmp{os.getpid()}.npy"
    np.save(tmp, array.view(np.uint16) if bf16 else array)
    os.replace(tmp, path)

  def _encode(self, frames: np.ndarray) -> np.ndarray:
    n = len(frames)
    pixels = haystack_lib.to_pixels(frames, self.image_size, self.mean, self.std)
    if n < self.chunk:  # one shape for every call: pad with blank frames, drop their outputs
      pad = np.zeros((self.chunk - n, *pixels.shape[1:]), pixels.dtype)
      pixels = np.concatenate([pixels, pad])
    out = np.asarray(jax.device_get(self.encode_fn(jnp.asarray(pixels)[None])))
    if out.ndim != 3 or out.shape[1] % self.chunk:
      raise ValueError(
        f"encode_media returned shape {out.shape}; expected [1, {self.chunk} * n_tok, D]"
      )
    self.encoded += n
    return out[0].reshape(self.chunk, -1, out.shape[-1])[:n]

  def encode(self, frames) -> np.ndarray:
    """uint8[F, H, W, 3] -> embeddings [F, n_tok, D] (encoder dtype), from the cache if present."""
    frames = np.asarray(frames, np.uint8)
    if frames.ndim == 3:
      frames = frames[None]
    parts = []
    for start in range(0, len(frames), self.chunk):
      block = frames[start : start + self.chunk]
      digest = self._digest(block)
      cached = self._load(digest)
      if cached is None:
        cached = self._encode(block)
        self._store(digest, cached)
      parts.append(cached)
    return np.concatenate(parts)
