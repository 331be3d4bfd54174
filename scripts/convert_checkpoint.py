"""Convert a local Hugging Face checkpoint into an lcv checkpoint directory.

    python scripts/convert_checkpoint.py --hf-dir ~/models/LongVA-7B-hf --out ~/ckpt/longva

Writes OUT/lcv_config.json (the imported config), OUT/params (Orbax) and copies the tokenizer
files, so `lcv.models.checkpoints.load_converted(OUT)` and `lcv.data.tokenizer.load(OUT)` need
nothing else. Supported classes: `lcv.models.checkpoints.SUPPORTED`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax
import numpy as np
from flax import nnx

from lcv.models import checkpoints

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "generation_config.json",
  "chat_template.jinja",
)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hf-dir", required=True, help="local directory with config.json + weights")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--param-dtype", default="float32", help="stored parameter dtype")
  parser.add_argument("--dtype", default=None, help="compute dtype recorded in the config")
  args = parser.parse_args(argv)

  overrides = {"param_dtype": args.param_dtype}
  if args.dtype:
    overrides["dtype"] = args.dtype
  cfg, model = checkpoints.load_hf(args.hf_dir, **overrides)
  checkpoints.save_converted(args.out, cfg, model)
  copied = []
  for name in TOKENIZER_FILES:
    src = os.path.join(args.hf_dir, name)
    if os.path.exists(src):
      shutil.copy(src, os.path.join(args.out, name))
      copied.append(name)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  count = sum(int(np.prod(x.shape)) for x in leaves)
  print(f"{type(cfg).__name__}: {count:,} parameters; tokenizer files: {copied or 'none'}")
  print(f"wrote {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
