"""Compare an lcv import with `transformers` on the same random input (CPU, float32).

    python scripts/check_parity.py --hf-dir ~/models/Qwen2-0.5B

Loads the local checkpoint twice, with transformers (torch) and with
`lcv.models.checkpoints.load_hf`, runs random token ids (language models), random pixels (vision
towers) or both (LLaVA layouts: vision tower + projector spliced at image-token slots, then the
language model), and prints the max abs difference of the logits or features. The LAST line of
output is that number; the exit status is 1 when it exceeds --tol (default 1e-4).
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from lcv import masks
from lcv.models import checkpoints
from lcv.positions import as_positions


def _lcv_logits(decoder, embeds, positions):
  b, s = embeds.shape[:2]
  mask = masks.token_mask(np.ones((b, s), np.int32), -np.ones((b, s), np.int32), False)
  at = np.broadcast_to(np.arange(s), (b, s))
  out = decoder(jnp.asarray(embeds), as_positions(positions), mask, logits_at=at)
  return np.asarray(out)


def _hf_features(tower, cfg, pixels, torch):
  """Features as lcv defines them, computed with the transformers tower."""
  with torch.no_grad():
    out = tower(torch.tensor(pixels), output_hidden_states=True, interpolate_pos_encoding=True)
    h = out.hidden_states[cfg.feature_layer]
    if cfg.post_norm:
      h = (
        tower.vision_model.post_layernorm(h)
        if hasattr(tower, "vision_model")
        else (tower.post_layernorm(h))
      )
  h = h.numpy()
  return h[:, 1:] if cfg.class_token and not cfg.keep_class_token else h


def compare(hf_dir: str, batch: int = 2, seq_len: int = 16, seed: int = 0) -> dict[str, float]:
  """Max abs differences between transformers and lcv, keyed by what was compared."""
  import torch
  import transformers

  arch = checkpoints.architecture(checkpoints.read_hf_config(hf_dir))
  kind = checkpoints.SUPPORTED[arch]
  if not hasattr(transformers, arch):
    raise ValueError(
      f"transformers has no {arch} class (original LLaVA code layout); check parity on the "
      "Hugging Face format of the model (e.g. LlavaOnevisionForConditionalGeneration)"
    )
  hf = getattr(transformers, arch).from_pretrained(hf_dir, dtype=torch.float32).eval()
  overrides = {"dtype": "float32", "param_dtype": "float32"}
  cfg, model = checkpoints.load_hf(hf_dir, **overrides)
  rs = np.random.RandomState(seed)
  diffs = {}

  if kind == "vision":
    size = cfg.image_size // cfg.patch * cfg.patch
    px = rs.randn(batch, cfg.channels, size, size).astype(np.float32)
    want = _hf_features(hf, cfg, px, torch)
    got = np.asarray(model(jnp.asarray(px.transpose(0, 2, 3, 1))))
    diffs["features"] = float(np.abs(got - want).max())
    return diffs

  dec_cfg = cfg if kind == "decoder" else cfg.decoder
  ids = rs.randint(0, dec_cfg.vocab_size, (batch, seq_len))
  pos = np.broadcast_to(np.arange(seq_len), (batch, seq_len)).astype(np.int32)
  if kind == "decoder":
    with torch.no_grad():
      want = hf(torch.tensor(ids)).logits.numpy()
    diffs["logits"] = float(
      np.abs(_lcv_logits(model, model.embed(jnp.asarray(ids)), pos) - want).max()
    )
    return diffs

  # LLaVA layouts: one image per row, its tokens spliced in after the first text token.
  vis = cfg.vision
  size = vis.image_size // vis.patch * vis.patch
  px = rs.randn(batch, vis.channels, size, size).astype(np.float32)
  feats_want = _hf_features(hf.model.vision_tower, vis, px, torch)
  with torch.no_grad():
    proj_want = hf.model.multi_modal_projector(torch.tensor(feats_want))
  feats = model["vision"](jnp.asarray(px.transpose(0, 2, 3, 1)))
  proj = model["projector"](feats)
  diffs["features"] = float(np.abs(np.asarray(feats) - feats_want).max())
  diffs["projected"] = float(np.abs(np.asarray(proj) - proj_want.numpy()).max())
  n_img = proj.shape[1]
  total = seq_len + n_img
  ids = rs.randint(0, dec_cfg.vocab_size, (batch, total))
  slots = np.zeros((batch, total), bool)
  slots[:, 1 : 1 + n_img] = True
  with torch.no_grad():
    embeds = hf.get_input_embeddings()(torch.tensor(ids))
    embeds[torch.tensor(slots)] = proj_want.reshape(-1, proj_want.shape[-1])
    want = hf(inputs_embeds=embeds).logits.numpy()
  x = model["decoder"].embed(jnp.asarray(ids))
  rows, cols = np.nonzero(slots)
  x = x.at[rows, cols].set(proj.reshape(-1, proj.shape[-1]))
  pos = np.broadcast_to(np.arange(total), (batch, total)).astype(np.int32)
  diffs["logits"] = float(np.abs(_lcv_logits(model["decoder"], x, pos) - want).max())
  return diffs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hf-dir", required=True)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq-len", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tol", type=float, default=1e-4)
  args = parser.parse_args(argv)
  diffs = compare(args.hf_dir, args.batch, args.seq_len, args.seed)
  for name, value in diffs.items():
    print(f"max abs diff {name}: {value:.3e}")
  worst = max(diffs.values())
  print(f"{worst:.6e}")
  return 0 if worst <= args.tol else 1


if __name__ == "__main__":
  sys.exit(main())
