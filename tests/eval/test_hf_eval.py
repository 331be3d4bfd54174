"""scripts/eval_vniah.py on a Hugging Face LLaVA-layout directory (LongVA's release format)."""

import json

import pytest

from tests.eval import test_scripts


def test_eval_vniah_from_hugging_face_llava_dir(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=320, max_position_embeddings=4096)  # fmt: skip
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=28, patch_size=14)  # fmt: skip
  cfg = transformers.LlavaConfig(
    vision_config=transformers.CLIPVisionConfig(**vision),
    text_config=transformers.Qwen2Config(**text),
    image_token_index=300,
    image_seq_length=4,
  )
  hf_dir = tmp_path / "hf"
  transformers.LlavaForConditionalGeneration(cfg).eval().save_pretrained(hf_dir)
  ev = test_scripts.load_script("eval_vniah")
  out = tmp_path / "out"
  ev.main([
    "--hf_dir", str(hf_dir), "--pool", "1", "--tokenizer", "bytes", "--devices", "1",
    "--no_progress", "--set", "vniah.min_frames=2", "vniah.max_frames=2", "vniah.depth_step=1.0",
    "vniah.image_size=28", "vniah.prompt_template=qwen2", "vniah.pad_multiple=256",
    "vniah.encode_batch=4", f"vniah.cache_dir={tmp_path / 'cache'}", f"vniah.output_dir={out}",
  ])  # fmt: skip
  records = json.loads((out / "all_accuracies.json").read_text())
  assert [(r["Num. Frame"], r["Frame Depth"]) for r in records] == [(2, 0.0), (2, 100.0)]
  assert all(len(r["scores"]) == 5 and len(r["predictions"]) == 5 for r in records)
