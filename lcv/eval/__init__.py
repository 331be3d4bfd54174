"""Long-context evaluation: V-NIAH (LongVA's visual needle-in-a-haystack) and text NIAH.

`vniah.run` / `text_niah.run` drive a grid of haystack lengths x needle depths through any model
with encode_media / embed / decode(logits_at=...) (`scoring.EvalModel`); see docs/eval.md.
Nothing in the library imports this package; scripts/eval_*.py do.
"""
