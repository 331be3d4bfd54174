"""One training step of a ~1B VLM at 1M tokens, sequence-sharded over context = 4 GPUs.

    python scripts/bench_1m.py                      # 4 GPUs: 1,048,576 tokens, context 4
    python scripts/bench_1m.py --smoke              # CPU: tiny VLM, 4,096 tokens, context 4

Model: a Qwen2-0.5B-shaped decoder (494M) under a SigLIP-so400m-shaped tower (400M) at 448 px
(32 x 32 = 1024 patches, pooled 4 x 4 to 64 tokens per frame), trained from random weights. Each
row is one long sample: text, a `--frames`-frame video, text, filling `--seq_len` tokens; the
frame-block-causal mask and V2PE positions are on by default. Attention is ring attention over the
mesh's `context` axis (zig-zag order); layers are rematerialised (`--remat`).

Prints the memory estimate (`lcv.train.memory`), XLA's compiled memory analysis, then times
`--steps` steps after one warm-up: tokens/s and MFU (model FLOPs with the mask's real density over
the chips' peak, `lcv.train.flops`). Appends one JSON line to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time


def _config(args):
  from lcv.config import (
    DataConfig,
    DecoderConfig,
    MeshConfig,
    OptimizerConfig,
    ProjectorConfig,
    RopeConfig,
    RunConfig,
    TrainConfig,
    VisionConfig,
    VLMConfig,
  )

  rope = RopeConfig(theta=args.theta, positions=args.positions, v2pe_random=False)
  if args.smoke:
    vision = VisionConfig.variant("tiny", class_token=False, feature_layer=-1)
    decoder = DecoderConfig.variant(
      "tiny", rope=rope, remat=args.remat, attention_impl=args.attention
    )
    projector = ProjectorConfig(in_dim=vision.width, out_dim=decoder.embed_dim)
  else:
    vision = VisionConfig.variant(
      "siglip_so400m14_384", image_size=448, dtype="bfloat16", frame_chunk=16, remat=True
    )
    decoder = DecoderConfig.variant(
      "qwen2-0.5b", rope=rope, remat=args.remat, attention_impl=args.attention
    )
    projector = ProjectorConfig(in_dim=vision.width, out_dim=decoder.embed_dim, pool=4)
  model = VLMConfig(
    decoder=decoder,
    vision=vision,
    projector=projector,
    frame_bidirectional=args.frame_bidirectional,
  )
  data = DataConfig(
    seq_len=args.seq_len, batch_size=1, image_size=vision.image_size, frames_per_row=args.frames
  )
  train = TrainConfig(steps=args.steps + 1, data=data, optimizer=OptimizerConfig(warmup_steps=0))
  mesh = MeshConfig(data=1, fsdp=1, context=args.context, context_parallel=args.attention)
  return RunConfig(model=model, mesh=mesh, train=train)


def _model_flops(vlm_cfg, host) -> float:
  """Training FLOPs of the step: decoder (attention by the mask's allowed pairs) + tower.

  Pairs are counted in int64 on the host from the natural-order intervals (S^2 = 2^40 at 1M
  tokens does not fit the int32 arithmetic of a jitted density).
  """
  import numpy as np

  from lcv import masks
  from lcv.models import decoder as decoder_lib
  from lcv.train import task as task_lib

  lay = host["layout"]
  b, s = lay.segment_ids.shape
  bounds = masks.intervals(lay.segment_ids, lay.frame_ids, vlm_cfg.frame_bidirectional)
  lo, hi = (np.asarray(x, np.int64) for x in bounds)
  density = float(np.maximum(hi - lo + 1, 0).sum()) / (b * s * s)
  llm = decoder_lib.flops_per_token(vlm_cfg.decoder, s, mask_density=density) * b * s
  frames = host["frames"].shape[0] * host["frames"].shape[1]
  return llm + frames * task_lib.vision_flops_per_frame(vlm_cfg)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--smoke", action="store_true", help="tiny model on 4 emulated CPU devices")
  ap.add_argument("--seq_len", type=int, default=None, help="default 2^20 (smoke: 4096)")
  ap.add_argument(
    "--frames", type=int, default=None, help="video frames per row (default 256; smoke: 64)"
  )
  ap.add_argument("--context", type=int, default=4)
  ap.add_argument(
    "--attention", default="ring", choices=("ring", "ulysses", "hybrid", "all_gather")
  )
  ap.add_argument(
    "--remat",
    default="full",
    choices=("none", "full", "attention", "dots_saveable", "dots_attention", "offload"),
  )
  ap.add_argument("--positions", default="v2pe", choices=("1d", "v2pe", "tad"))
  ap.add_argument("--frame_bidirectional", type=int, default=1)
  ap.add_argument("--theta", type=float, default=5e7)
  ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
  ap.add_argument("--loss_chunk", type=int, default=2048)
  ap.add_argument("--out", default="benchmarks/results/bench_1m.jsonl")
  args = ap.parse_args(argv)
  if args.smoke:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.context}"
    )
  args.seq_len = args.seq_len or (4096 if args.smoke else 2**20)
  args.frames = args.frames or (64 if args.smoke else 256)
  args.frame_bidirectional = bool(args.frame_bidirectional)

  import jax
  import numpy as np

  if args.smoke:
    jax.config.update("jax_num_cpu_devices", args.context)
  from lcv.parallel import mesh as mesh_lib
  from lcv.train import flops as flops_lib
  from lcv.train import memory
  from lcv.train import state as state_lib
  from lcv.train import task as task_lib

  if len(jax.devices()) < args.context:
    raise SystemExit(f"--context {args.context} needs {args.context} devices; have {jax.devices()}")
  cfg = _config(args)
  devices = jax.devices()[: args.context]
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  task = task_lib.vlm_task(cfg.model, cfg.train, cfg.mesh, loss_chunk=args.loss_chunk)
  host = memory.example_host_batch(cfg.model, args.seq_len, 1, args.frames)

  est = memory.estimate(cfg, args.context, frames_per_row=args.frames, loss_chunk=args.loss_chunk)
  print(f"memory estimate per device ({args.seq_len:,} tokens, context {args.context}):")
  print(est.table(), flush=True)
  t0 = time.perf_counter()
  compiled, setup, batch = memory.compiled_step(task, cfg, mesh, host)
  compile_s = time.perf_counter() - t0
  measured = memory.analysis(compiled)
  print(f"compiled in {compile_s:.0f} s; XLA memory analysis per device:")
  for k, v in measured.items():
    print(f"  {k:<15} {memory.human(v)}")
  state = state_lib.create(task.model_fn, setup, cfg.train.seed)
  n_params = state_lib.num_params(state)
  flops = _model_flops(cfg.model, host)
  times, loss = [], None
  for i in range(args.steps + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    loss = float(jax.device_get(metrics["loss"]))
    if i:  # the first call pays for transfers and autotuning
      times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  kind = devices[0].device_kind
  mfu = flops_lib.mfu(flops, step_s, kind, len(devices))
  record = {
    "bench": "train_step_1m",
    "device": kind,
    "num_devices": len(devices),
    "jax": jax.__version__,
    "python": platform.python_version(),
    "seq_len": args.seq_len,
    "frames": args.frames,
    "tokens_per_frame": cfg.model.frame_tokens,
    "context": args.context,
    "attention": args.attention,
    "remat": args.remat,
    "positions": args.positions,
    "frame_bidirectional": args.frame_bidirectional,
    "params": n_params,
    "loss": loss,
    "step_s": step_s,
    "tokens_per_s": args.seq_len / step_s,
    "model_tflops_per_step": flops / 1e12,
    "mfu": mfu,
    "compile_s": compile_s,
    "memory_measured_gib": {k: v / memory.GiB for k, v in measured.items()},
    "memory_estimate_gib": {
      f.name: getattr(est, f.name) / memory.GiB for f in dataclasses.fields(est)
    }
    | {"total": est.total / memory.GiB},
  }
  print(json.dumps(record, indent=1))
  mfu_text = "n/a (no peak for this device)" if mfu is None else f"{mfu:.1%}"
  print(
    f"{n_params / 1e9:.2f}B params, {args.seq_len:,} tokens over {len(devices)} x {kind}: "
    f"{step_s:.2f} s/step, {args.seq_len / step_s:,.0f} tokens/s, MFU {mfu_text}"
  )
  if args.out and not args.smoke:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
      f.write(json.dumps(record) + "\n")
  return record


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
