"""Training-step benchmark of a ~1B VLM at long context on one accelerator: tokens/s and MFU.

    python scripts/bench_train.py                       # Qwen2-1.5B-shaped LLM + CLIP-L/14 tower
    python scripts/bench_train.py --seq 32768 --remat dots_attention   # the 32K MFU row
    python scripts/bench_train.py --seq 32768 --llm qwen2-0.5b --out benchmarks/results/train.jsonl
    python scripts/bench_train.py --smoke               # tiny sizes on CPU, checks the plumbing

Each row is one packed sequence of S tokens, mostly video (frames of 144 tokens: CLIP-L/14 at
336 px, 2 x 2 average-pooled as in LongVA) plus a caption, with the frame-block-causal mask and V2PE
positions. The vision tower is frozen (the long-context stage trains the projector and the LLM, as
LongVA / LWM do), so it costs its forward pass only and MFU counts it that way. Model FLOPs count
attention by the mask's real density (`lcv.train.flops`). Prints a table, then one JSON line per
sequence length (also appended to --out). Each row also times the tower's forward alone
(`tower_s`, the same jitted encode of the same frames), so the step splits into tower and LLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def configs(
  llm: str,
  seq_len: int,
  smoke: bool,
  remat: str = "full",
  vision_attention="auto",
  scan_layers: bool = False,
):
  from lcv.config import (
    DataConfig,
    DecoderConfig,
    MeshConfig,
    OptimizerConfig,
    ProjectorConfig,
    TrainConfig,
    VisionConfig,
    VLMConfig,
  )

  if smoke:
    vision = VisionConfig.variant("tiny", patch=7, class_token=False)
    decoder = DecoderConfig.variant("tiny", remat=remat, scan_layers=scan_layers)
    projector = ProjectorConfig(in_dim=vision.width, out_dim=decoder.embed_dim)
  else:
    vision = VisionConfig.variant(
      "clip_l14_336", dtype="bfloat16", frame_chunk=32, attention_impl=vision_attention
    )
    base = DecoderConfig.variant(llm)
    decoder = dataclasses.replace(base, remat=remat, dtype="bfloat16", scan_layers=scan_layers)
    projector = ProjectorConfig(
      in_dim=vision.width, out_dim=decoder.embed_dim, pool=2, dtype="bfloat16"
    )
  rope = dataclasses.replace(decoder.rope, positions="v2pe", v2pe_random=True)
  model = VLMConfig(
    decoder=dataclasses.replace(decoder, rope=rope),
    vision=vision,
    projector=projector,
    frame_bidirectional=True,
  )
  # One sample per row: as many frames as fit next to ~100 caption tokens.
  frames = max((seq_len - 128) // model.frame_tokens, 1)
  data = DataConfig(
    seq_len=seq_len,
    batch_size=1,
    image_size=vision.image_size,
    max_frames=frames,
    frames_per_row=frames,
    synthetic_frames=(frames, frames),
    synthetic_kinds=("colour", "object"),  # short questions: the row is nearly all video
    prefetch=0,
  )
  optimizer = OptimizerConfig(lr=1e-5, warmup_steps=0, groups=((r"^vision/", 0.0),))
  train = TrainConfig(steps=1000, data=data, optimizer=optimizer)
  return model, train, MeshConfig(data=1, fsdp=-1)


def bench(
  llm: str,
  seq_len: int,
  steps: int,
  smoke: bool,
  remat: str = "full",
  profile: str | None = None,
  vision_attention: str = "auto",
  loss_chunk: int = 2048,
  lm_head: str = "fused",
  scan_layers: bool = False,
) -> dict:
  import jax
  import numpy as np
  from flax import nnx

  from lcv.data import feeding, pipeline
  from lcv.models import decoder as decoder_lib
  from lcv.parallel import mesh as mesh_lib
  from lcv.train import flops as flops_lib
  from lcv.train import state as state_lib
  from lcv.train import step as step_lib
  from lcv.train import task as task_lib

  model_cfg, train_cfg, mesh_cfg = configs(
    llm, seq_len, smoke, remat, vision_attention, scan_layers
  )
  mesh = mesh_lib.make_mesh(mesh_cfg)
  task = task_lib.vlm_task(model_cfg, train_cfg, mesh_cfg, loss_chunk=loss_chunk, lm_head=lm_head)
  setup = state_lib.setup(task.model_fn, train_cfg.optimizer, train_cfg.steps, mesh, task.rules)
  state = state_lib.create(task.model_fn, setup)
  n_params = state_lib.num_params(state)
  fn = step_lib.make_train_step(
    setup.graphdef, setup.tx, task.loss_fn, schedules=setup.schedules, frozen=setup.frozen
  )
  with state_lib.scope(mesh, task.rules):
    jitted = step_lib.jit_train_step(fn, setup)
    # One host batch, reused: this times the step, not the host-side data generation.
    data = pipeline.Pipeline(train_cfg.data, task.tokens_per_frame)
    host = next(data)
    data.close()
    batch = feeding.to_device(task.inputs_fn(host), mesh, [0], 1)
    # Lowering and XLA's compile timed apart, each reported as it ends (a long compile shows its
    # phase: unstacked layers take minutes).
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch)
    lower_s = time.perf_counter() - t0
    print(f"S={seq_len}: lowered in {lower_s:.1f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    jitted = lowered.compile()
    compile_s = time.perf_counter() - t0
    print(f"S={seq_len}: compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
    state, m = jitted(state, batch)
    loss0 = float(m["loss"])
    state, m = jitted(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = jitted(state, batch)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t0) / steps
    tower = jax.jit(
      lambda params, rest, pixels: nnx.merge(setup.graphdef, params, rest).encode_media(pixels)
    )
    # float32 pixels, as the loss feeds the tower (its mean / std shift costs the same)
    pixels = batch["pixels"].astype(jax.numpy.float32) / 255.0
    jax.block_until_ready(tower(state["params"], state["rest"], pixels))
    t0 = time.perf_counter()
    for _ in range(steps):
      out = tower(state["params"], state["rest"], pixels)
    jax.block_until_ready(out)
    tower_s = (time.perf_counter() - t0) / steps
    if profile:
      # Two more steps under the profiler (Perfetto JSON too: `scripts/profile_summary.py`).
      with jax.profiler.trace(profile, create_perfetto_trace=True):
        for _ in range(2):
          state, m = jitted(state, batch)
        jax.block_until_ready(state)
  device = jax.devices()[0]
  flops = task.flops_fn(host)
  mfu = flops_lib.mfu(flops, step_s, device.device_kind, jax.device_count())
  stats = device.memory_stats() or {}
  density = flops_lib.attended_pairs(*(np.asarray(x) for x in batch["mask"])) / seq_len**2
  return {
    "bench": "train_step",
    "device": device.device_kind,
    "devices": jax.device_count(),
    "llm": "tiny" if smoke else llm,
    "vision": "tiny" if smoke else "clip_l14_336 (frozen)",
    "params": n_params,
    "decoder_params": decoder_lib.param_count(model_cfg.decoder),
    "seq_len": seq_len,
    "frames": int(train_cfg.data.frames_per_row),
    "mask_density": round(density, 4),
    "step_s": step_s,
    "tower_s": tower_s,
    "vision_attention": vision_attention,
    "loss_chunk": loss_chunk,
    "lm_head": lm_head,
    "scan_layers": scan_layers,
    "lower_s": lower_s,
    "compile_s": compile_s,
    "tokens_per_s": seq_len / step_s,
    "model_tflops_per_step": flops / 1e12,
    "mfu": mfu,
    "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
    "loss": loss0,
    "remat": remat,
    "jax": jax.__version__,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq", default=None, help="comma-separated S (default 8192,32768,131072)")
  parser.add_argument(
    "--llm", default="qwen2-1.5b", help="decoder variant: qwen2-0.5b | qwen2-1.5b"
  )
  parser.add_argument("--steps", type=int, default=5, help="timed steps after two warm-up steps")
  parser.add_argument("--smoke", action="store_true", help="tiny model and sequences, for CPU")
  parser.add_argument(
    "--remat",
    default="full",
    choices=("none", "full", "attention", "dots_saveable", "dots_attention", "offload"),
    help="policy",
  )
  parser.add_argument(
    "--vision_attention", default="auto", help="the tower's attention impl: auto | cudnn | xla ..."
  )
  parser.add_argument(
    "--loss_chunk", type=int, default=2048, help="tokens per step of the chunked LM-head loss"
  )
  parser.add_argument(
    "--lm_head",
    default="fused",
    choices=("fused", "recompute"),
    help="the LM-head loss schedule (lcv.train.task.make_loss_fn)",
  )
  parser.add_argument(
    "--scan",
    action="store_true",
    help="decoder layers stacked and run by lax.scan (DecoderConfig.scan_layers=True); the "
    "default, unstacked layers, steps ~3%% faster at 32K and compiles ~2x longer",
  )
  parser.add_argument("--out", default=None, help="append JSON lines here")
  parser.add_argument("--profile", default=None, help="trace two extra steps into this dir")
  args = parser.parse_args(argv)
  sys.path.insert(0, ROOT)
  default = "256,512" if args.smoke else "8192,32768,131072"
  seqs = [int(s) for s in (args.seq or default).split(",")]
  rows = [
    bench(
      args.llm,
      s,
      args.steps,
      args.smoke,
      args.remat,
      args.profile and f"{args.profile}/{s}",
      args.vision_attention,
      args.loss_chunk,
      args.lm_head,
      args.scan,
    )
    for s in seqs
  ]
  print(
    f"{'S':>8} {'frames':>6} {'step s':>8} {'tower s':>8} {'tokens/s':>10} {'TFLOP/step':>10} "
    f"{'MFU':>6}"
  )
  for r in rows:
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    print(
      f"{r['seq_len']:>8} {r['frames']:>6} {r['step_s']:>8.3f} {r['tower_s']:>8.3f} "
      f"{r['tokens_per_s']:>10.0f} "
      f"{r['model_tflops_per_step']:>10.1f} {mfu:>6}"
    )
  for r in rows:
    print(json.dumps(r))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  return rows


if __name__ == "__main__":
  main()
