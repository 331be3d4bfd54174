"""The flagship demo: train a small VLM on short videos, then find a needle in videos 64x longer.

    python scripts/demo.py                        # CPU: 8 emulated devices, a few minutes
    python scripts/demo.py --config configs/demo.py:preset=gpu
    python scripts/demo.py --config configs/demo.py:positions=1d --workdir runs/demo_1d

Training (configs/demo.py): every row is one short video of haystack frames (dark noise with a
dim grey square) with one needle frame, a coloured digit on a white card, inserted at a random
place, followed by the question and the digit as the answer (the only trained token). V2PE
positions with a random stride per video, a frame-block-causal mask, ring attention over the
mesh's `context` axis; a curriculum lengthens the videos over the first part of training.
Evaluation: V-NIAH (`lcv.eval.vniah`) on noise frames of another seed, needles at fixed depths,
frame counts `eval_scales` x the training length; the accuracy table is printed and the heatmap
saved as <workdir>/vniah/heatmap.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What digit is on the white card?"
# One hue per digit (the needle is visually distinct: a coloured digit on white).
HUES = (
  (220, 30, 30), (30, 140, 40), (30, 60, 220), (200, 150, 0), (160, 30, 200),
  (0, 150, 160), (230, 100, 0), (90, 90, 90), (150, 70, 20), (220, 40, 140),
)  # fmt: skip


def render_needle(digit: str, size: int = 96):
  """uint8[size, size, 3]: a large coloured digit on a white card."""
  import numpy as np
  from PIL import Image, ImageDraw, ImageFont

  image = Image.new("RGB", (size, size), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default(size=int(size * 0.8))
  left, top, right, bottom = draw.textbbox((0, 0), digit, font=font)
  x = (size - (right - left)) / 2 - left
  y = (size - (bottom - top)) / 2 - top
  draw.text((x, y), digit, font=font, fill=HUES[int(digit)])
  return np.asarray(image)


def noise_frames(num: int, size: int, seed: int):
  """uint8[num, size, size, 3] haystack: dark colour noise with a dim grey square, no digits."""
  import numpy as np

  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 70, (num, size, size, 3), dtype=np.uint8)
  for f in frames:
    side = int(rng.integers(size // 4, size // 2))
    y, x = rng.integers(0, size - side, 2)
    f[y : y + side, x : x + side] = rng.integers(60, 110)
  return frames


def needle_set(digits: str):
  from lcv.eval import needles as needles_lib

  q = needles_lib.question(QUESTION)
  return [needles_lib.Needle(f"digit{d}", render_needle(d), q, d) for d in digits]


class Videos:
  """Training rows: haystack frames (procedural movie, its own seed) + one needle, then the
  question and answer, laid out exactly as V-NIAH lays out a case (`lcv.eval.cases`)."""

  def __init__(self, demo, tokenizer, seed: int):
    import numpy as np

    from lcv.eval import cases, prompts
    from lcv.eval import haystack as haystack_lib

    self.demo, self.rng = demo, np.random.default_rng(seed)
    self.n_tok = demo.model.frame_tokens
    template = prompts.get_template("plain")
    needles = needle_set(demo.digits)
    self.pieces = [
      prompts.prompt_pieces(tokenizer, template, n.question, n.answer) for n in needles
    ]
    text = len(self.pieces[0].pre) + len(self.pieces[0].question) + len(self.pieces[0].post) + 1
    self.max_frames = (demo.seq_len - text) // self.n_tok - 1  # haystack frames; +1 needle
    if self.max_frames < demo.min_frames:
      raise ValueError(f"seq_len={demo.seq_len} leaves room for {self.max_frames} frames")
    to_uint8 = lambda f: np.round(
      haystack_lib.to_pixels(f, demo.image_size, (0, 0, 0), (1, 1, 1)) * 255
    ).astype(np.uint8)
    self.haystack = noise_frames(2048, demo.image_size, seed + 1)
    self.needles = to_uint8(np.stack([n.image for n in needles]))
    self.cases = cases

  def row(self, v2pe: bool, progress: float = 1.0):
    """(Sequence, uint8 frames [max_frames + 1, P, P, 3], V2PE stride or None); `progress` in
    [0, 1] is the fraction of training done (the curriculum lengthens videos with it)."""
    import numpy as np

    d = self.demo
    start, end = d.curriculum
    grown = min(1.0, max(0.0, (progress - start) / max(end - start, 1e-9)))
    longest = d.min_frames + round((self.max_frames - d.min_frames) * grown)
    n = int(self.rng.integers(d.min_frames, longest + 1))
    start = int(self.rng.integers(0, len(self.haystack) - n))
    k = int(self.rng.integers(len(self.needles)))
    at = int(self.rng.integers(0, n + 1))
    frames = np.insert(self.haystack[start : start + n], at, self.needles[k], axis=0)
    seq = self.cases.build_sequence(self.pieces[k], n + 1, self.n_tok, pad_multiple=d.seq_len)
    pad = np.zeros((self.max_frames + 1 - (n + 1), *frames.shape[1:]), np.uint8)
    delta = float(2.0 ** -self.rng.integers(0, 9)) if v2pe else None
    return seq, np.concatenate([frames, pad]), delta


def make_batch(videos, demo, inputs_for_delta, progress: float = 1.0):
  """Model batch of `demo.batch` rows (numpy; natural token order)."""
  import jax
  import numpy as np

  rows, pixels = [], []
  v2pe = demo.model.decoder.rope.positions == "v2pe"
  for _ in range(demo.batch):
    seq, frames, delta = videos.row(v2pe, progress)
    inputs = jax.tree.map(np.asarray, inputs_for_delta(delta)(seq))
    targets = np.zeros((1, demo.seq_len), np.int32)
    weights = np.zeros((1, demo.seq_len), np.float32)
    at = seq.logits_at()
    targets[0, at] = seq.answer
    weights[0, at] = 1.0
    rows.append({**inputs, "targets": targets, "weights": weights})
    pixels.append(frames)
  batch = jax.tree.map(lambda *xs: np.concatenate(xs), *rows)
  return batch, np.stack(pixels)


def train(demo, mesh, tokenizer, *, log=print):
  """Train from scratch; returns (model, history)."""
  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding

  from lcv.config import DataConfig, TrainConfig
  from lcv.data import feeding
  from lcv.eval import scoring
  from lcv.models import vlm as vlm_lib
  from lcv.parallel import context as context_lib
  from lcv.parallel import rules as rules_lib
  from lcv.train import state as state_lib
  from lcv.train import step as step_lib
  from lcv.train import task as task_lib

  cfg = demo.model
  train_cfg = TrainConfig(
    steps=demo.steps,
    data=DataConfig(image_size=demo.image_size, pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3),
    optimizer=demo.optimizer,
  )
  model_fn = lambda: vlm_lib.VLM(cfg, rngs=nnx.Rngs(demo.seed))
  loss_fn = task_lib.make_loss_fn(cfg, train_cfg, chunk=demo.seq_len)
  setup = state_lib.setup(model_fn, demo.optimizer, demo.steps, mesh, rules_lib.RULES, demo.seed)
  state = state_lib.create(model_fn, setup, demo.seed)
  step_fn = step_lib.make_train_step(setup.graphdef, setup.tx, loss_fn, schedules=setup.schedules)
  with state_lib.scope(mesh, rules_lib.RULES):
    jitted = step_lib.jit_train_step(step_fn, setup)
  videos = Videos(demo, tokenizer, demo.seed)
  inputs_for_delta = lambda delta: scoring.layout_inputs(cfg, delta)
  context = mesh.shape["context"]
  tokens_spec = NamedSharding(mesh, feeding.spec(mesh, 2, seq_dim=1))
  pixels_spec = NamedSharding(mesh, feeding.spec(mesh, 5, seq_dim=None))
  history, pending, t_start = [], [], time.perf_counter()
  host = jax.local_devices(backend="cpu")[0]
  for step in range(1, demo.steps + 1):
    # The rows' layout math (positions, mask intervals) is a few hundred small eager ops: on the
    # host CPU and outside the mesh they cost ~0.1 s a step; on an accelerator, or sharded over
    # the mesh, each is a launch and the loop became host-bound (the GPU preset: ~0.7 s a step
    # for ~2 ms of kernels).
    with jax.default_device(host):
      batch, pixels = make_batch(videos, demo, inputs_for_delta, (step - 1) / demo.steps)
      if context > 1:
        batch = context_lib.to_order(batch, context, "zigzag")
    batch = jax.tree.map(lambda x: jax.device_put(np.asarray(x), tokens_spec), batch)
    batch["pixels"] = jax.device_put(pixels, pixels_spec)
    # Dispatch is asynchronous: the host builds the next batch while this step runs. Metrics
    # are fetched only when logged, so the loop never waits on the device in between.
    with state_lib.scope(mesh, rules_lib.RULES):
      state, m = jitted(state, batch)
    pending.append((step, m))
    if step % 25 == 0 or step in (1, demo.steps):
      for i, mi in jax.device_get(pending):
        history.append({"step": i, "loss": float(mi["loss"]),
                        "accuracy": float(mi["aux/correct"])})  # fmt: skip
      pending = []
      recent = history[-25:]
      log(
        f"step {step:4d}  loss {np.mean([h['loss'] for h in recent]):.3f}  train acc "
        f"{np.mean([h['accuracy'] for h in recent]):.2f}  "
        f"({time.perf_counter() - t_start:.0f} s)"
      )
  return state_lib.merge(setup.graphdef, state), history


def evaluate(demo, model, mesh, tokenizer, workdir: str, *, progress=False):
  """V-NIAH at every scale; returns the records."""
  from PIL import Image

  from lcv.config import VNIAHConfig
  from lcv.eval import needles as needles_lib
  from lcv.eval import vniah

  needle_path = os.path.join(workdir, "needles", "needles.json")
  needles_lib.save_needles(needle_set(demo.eval_digits), needle_path)
  n_tok = demo.model.frame_tokens
  text = len(tokenizer.encode(needles_lib.question(QUESTION))) + 2
  # The haystack: unseen noise frames (another seed than training), as a frame directory.
  most = max((s * demo.seq_len - text) // n_tok - 1 for s in demo.eval_scales)
  hay_dir = os.path.join(workdir, "haystack")
  if not os.path.isdir(hay_dir) or len(os.listdir(hay_dir)) < most:
    os.makedirs(hay_dir, exist_ok=True)
    for i, frame in enumerate(noise_frames(most, demo.image_size, demo.seed + 1000)):
      Image.fromarray(frame).save(os.path.join(hay_dir, f"{i:06d}.png"))
  v2pe = demo.model.decoder.rope.positions == "v2pe"
  records = None
  for scale in demo.eval_scales:
    frames = (scale * demo.seq_len - text) // n_tok - 1
    step = demo.depths[1] - demo.depths[0] if len(demo.depths) > 1 else 1.0
    cfg = VNIAHConfig(
      haystack=hay_dir,
      needles=needle_path,
      min_frames=frames,
      max_frames=frames,
      frame_step=1,
      depth_step=step,
      image_size=demo.image_size,
      image_mean=(0.5,) * 3,
      image_std=(0.5,) * 3,
      prompt_template="plain",
      pad_multiple=64,
      v2pe_delta=demo.eval_delta if v2pe else None,
      encode_batch=64,
      cache_dir=os.path.join(workdir, "cache"),
      output_dir=os.path.join(workdir, "vniah"),
    )
    records = vniah.run(cfg, model, tokenizer, model_key="demo", mesh=mesh, progress=progress)
  return records.records


def accuracy_table(records, seq_len: int) -> str:
  """Markdown: rows = depth, columns = frames (and x training length), plus the column mean."""
  import numpy as np

  frames = sorted({r["Num. Frame"] for r in records})
  depths = sorted({r["Frame Depth"] for r in records})
  score = {(r["Num. Frame"], r["Frame Depth"]): r["Score"] for r in records}
  tokens = {r["Num. Frame"]: r["tokens"] for r in records}
  head = "| depth | " + " | ".join(f"{f} fr ({tokens[f] / seq_len:.0f}x)" for f in frames) + " |"
  lines = [head, "|---|" + "---|" * len(frames)]
  for d in depths:
    lines.append(f"| {d:g}% | " + " | ".join(f"{score[f, d]:.2f}" for f in frames) + " |")
  means = [np.mean([score[f, d] for d in depths]) for f in frames]
  lines.append("| mean | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
  return "\n".join(lines)


def load_demo(spec: str):
  """'configs/demo.py[:arg]' -> its get_config(arg) (registered as a module: it defines a
  dataclass)."""
  import importlib.util

  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found (expected configs/demo.py[:arg])")
  module_spec = importlib.util.spec_from_file_location("lcv_demo_config", path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[module_spec.name] = module
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
  parser.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
  parser.add_argument("--devices", type=int, default=8, help="emulated CPU devices")
  parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
  args = parser.parse_args(argv)

  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
  import jax

  jax.config.update("jax_num_cpu_devices", args.devices)  # CPU only; GPUs are counted as they are
  sys.path.insert(0, ROOT)
  from lcv.data import tokenizer as tokenizer_lib
  from lcv.parallel import mesh as mesh_lib

  demo = load_demo(args.config)
  if args.steps is not None:
    demo = dataclasses.replace(demo, steps=args.steps)
  workdir = args.workdir or tempfile.mkdtemp(prefix="lcv_demo_")
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(dataclasses.replace(demo.mesh, data=1, fsdp=1, tensor=1),
                            jax.devices()[: demo.mesh.context])  # fmt: skip
  tok = tokenizer_lib.load("bytes")
  r = demo.model.decoder.rope
  print(
    f"training {demo.steps} steps x {demo.batch} videos of <= {demo.seq_len} tokens on "
    f"{mesh.shape['context']} device(s){' (ring attention)' if mesh.shape['context'] > 1 else ''}, "
    f"positions={r.positions}, "
    f"frame_bidirectional={demo.model.frame_bidirectional}",
    flush=True,
  )
  t0 = time.perf_counter()
  model, history = train(demo, mesh, tok, log=lambda s: print(s, flush=True))
  train_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  records = evaluate(demo, model, mesh, tok, workdir)
  eval_s = time.perf_counter() - t0
  table = accuracy_table(records, demo.seq_len)
  print(f"\nV-NIAH accuracy (chance 0.10; training videos <= {demo.seq_len} tokens):")
  print(table)
  summary = {
    "positions": r.positions,
    "frame_bidirectional": demo.model.frame_bidirectional,
    "steps": demo.steps,
    "train_s": train_s,
    "eval_s": eval_s,
    "final_train_accuracy": sum(h["accuracy"] for h in history[-25:]) / min(25, len(history)),
    "records": records,
  }
  with open(os.path.join(workdir, "demo.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"train {train_s:.0f} s, V-NIAH {eval_s:.0f} s; heatmap: {workdir}/vniah/heatmap.png")
  return summary


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
