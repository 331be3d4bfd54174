"""Text needle-in-a-haystack (LWM / LongVA style) for imported or trained models.

    python scripts/eval_text_niah.py --hf_dir /models/Qwen2-7B-Instruct-224K \\
        --set text_niah.haystack=pg19.txt text_niah.max_tokens=131072 text_niah.distractors=3

Same model, tokenizer, mesh and --set handling as scripts/eval_vniah.py (the `text_niah`
section); results, heatmap and average go to text_niah.output_dir. See docs/eval.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import eval_vniah  # noqa: E402


def main(argv=None):
  from lcv.eval import text_niah

  args, configs, model, tokenizer, mesh, key = eval_vniah.build(argv, __doc__)
  cfg = configs["text_niah"]
  results = text_niah.run(
    cfg, model, tokenizer, mesh=mesh, progress=not args.no_progress, title=f"Text NIAH {key}"
  )
  print(f"text NIAH average {results.average():.3f} over {len(results.records)} cells; "
        f"{cfg.output_dir}/heatmap.png")  # fmt: skip


if __name__ == "__main__":
  sys.exit(main())
