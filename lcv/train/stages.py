"""Staged context extension: train at S_0, then restore and continue at S_1 > S_0, ... (LWM).

LWM (arXiv 2402.08268, section 3) grows the context 32K -> 128K -> 256K -> 512K -> 1M, each stage
initialised from the previous one and run with a larger RoPE theta (1e6 -> 1e7 -> 1e7 -> 2.5e7 ->
5e7); LongVA (arXiv 2406.16852) extends Qwen2 to 224K in one stage with theta 1e9. A stage here is
a frozen `Stage` (length, theta or scaling, V2PE stride set, steps, lr, tokens per batch, context
size) applied on top of one base `RunConfig`; `Extension` is the whole recipe:

    ext = configs.extend_lwm.get_config("")
    rows = run(ext, "runs/lwm")          # <workdir>/<k>_<name>/ per stage, summary.{md,json,png}

Each stage k > 0 starts from stage k-1's last checkpoint: the parameters (and non-parameter model
state) are restored onto stage k's mesh (orbax reshards when the context size changes), the step
and the optimizer state start fresh (the schedule and batch shape change), and the result is
written as step 0 of stage k's run directory, so `lcv.train.loop.train` simply resumes from it. A
restarted extension therefore resumes mid-stage exactly, and finished stages are skipped.

After every stage, text NIAH and V-NIAH (`lcv.eval`) run on a grid up to the stage's length; the
summary table, its JSON and plots (loss over all steps; accuracy vs length per stage) go to the
extension's workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcv.config import RopeScaling, RunConfig, TextNIAHConfig, VNIAHConfig
from lcv.data import pipeline as pipeline_lib
from lcv.data import tokenizer as tokenizer_lib
from lcv.parallel import mesh as mesh_lib
from lcv.train import checkpoint as checkpoint_lib
from lcv.train import loop
from lcv.train import state as state_lib
from lcv.train import task as task_lib

V2PE_DELTAS = task_lib.V2PE_DELTAS


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of context extension.

  name: directory suffix and table label.
  seq_len: S, tokens per packed row.
  theta: RoPE base; scaling: optional `RopeScaling` (YaRN, NTK, ...) on top of it.
  v2pe_deltas: strides each visual item draws from in training (V2PE); None keeps the base
    model's setting (a fixed `v2pe_delta`, or the full `V2PE_DELTAS` when `v2pe_random`).
  steps, lr, warmup_steps: the optimizer run of this stage (fresh AdamW state, LWM-style).
  tokens_per_batch: global tokens per step; the batch is tokens_per_batch // seq_len rows.
  context: context-parallel size (mesh `context` axis); the rest of the devices go to fsdp.
  """

  name: str
  seq_len: int
  theta: float
  steps: int
  lr: float
  tokens_per_batch: int
  context: int = 1
  scaling: RopeScaling | None = None
  v2pe_deltas: tuple[float, ...] | None = None
  warmup_steps: int = 0

  def __post_init__(self):
    if self.tokens_per_batch % self.seq_len:
      raise ValueError(
        f"Stage {self.name!r}: {self.tokens_per_batch=} must be a multiple of {self.seq_len=} "
        "(whole rows per batch)"
      )
    if self.steps < 1 or self.lr <= 0 or self.theta <= 0:
      raise ValueError(f"Stage {self.name!r}: need steps >= 1, lr > 0, theta > 0; got {self}")
    for d in self.v2pe_deltas or ():
      k = -np.log2(d)
      if not (0 <= k <= 8 and k == round(k)):
        raise ValueError(f"Stage {self.name!r}: V2PE stride {d} must be 1/2^k with 0 <= k <= 8")

  @property
  def batch_size(self) -> int:
    return self.tokens_per_batch // self.seq_len


@dataclasses.dataclass(frozen=True)
class Extension:
  """A staged extension recipe: a base run, its stages, and the per-stage evaluation.

  base: model, optimizer and data settings shared by all stages (the stage overrides length,
    theta / scaling, V2PE strides, steps, lr, batch and context size).
  text_niah / vniah: evaluation templates, or None to skip. Each stage evaluates `eval_points`
    lengths, multiples of seq_len * eval_beyond / eval_points up to seq_len * eval_beyond
    (eval_beyond = 1: up to the training length), none shorter than the template's min_tokens /
    min_frames; the rest of the template (depths, samples, needles, prompt) is kept.
  """

  base: RunConfig
  stages: tuple[Stage, ...]
  text_niah: TextNIAHConfig | None = None
  vniah: VNIAHConfig | None = None
  eval_points: int = 4
  eval_beyond: int = 1

  def __post_init__(self):
    if not self.stages:
      raise ValueError("Extension needs at least one Stage")
    names = [s.name for s in self.stages]
    if len(set(names)) != len(names):
      raise ValueError(f"stage names must be unique; got {names}")


def stage_config(base: RunConfig, stage: Stage) -> RunConfig:
  """The `RunConfig` of `stage`: base with the stage's length, RoPE, batch, steps, lr and mesh."""
  r = base.model.decoder.rope
  rope = dataclasses.replace(r, theta=stage.theta, scaling=stage.scaling or r.scaling)
  if stage.v2pe_deltas is not None:
    if r.positions != "v2pe":
      raise ValueError(
        f"Stage {stage.name!r} sets v2pe_deltas but the model uses {r.positions!r} positions"
      )
    rope = dataclasses.replace(rope, v2pe_random=len(stage.v2pe_deltas) > 1)
    if len(stage.v2pe_deltas) == 1:
      rope = dataclasses.replace(rope, v2pe_delta=stage.v2pe_deltas[0])
  impl = base.model.decoder.attention_impl
  if stage.context > 1 and impl not in ("ring", "ulysses", "hybrid", "all_gather"):
    impl = base.mesh.context_parallel
  decoder = dataclasses.replace(base.model.decoder, rope=rope, attention_impl=impl)
  data = dataclasses.replace(base.train.data, seq_len=stage.seq_len, batch_size=stage.batch_size)
  opt = dataclasses.replace(base.train.optimizer, lr=stage.lr, warmup_steps=stage.warmup_steps)
  train = dataclasses.replace(base.train, steps=stage.steps, data=data, optimizer=opt)
  mesh = dataclasses.replace(base.mesh, context=stage.context, fsdp=-1, data=1)
  return RunConfig(model=dataclasses.replace(base.model, decoder=decoder), mesh=mesh, train=train)


def make_task(cfg: RunConfig, stage: Stage) -> loop.Task:
  """The VLM task of a stage; with a V2PE stride set, the strides come from that set."""
  return task_lib.vlm_task(cfg.model, cfg.train, cfg.mesh, v2pe_deltas=stage.v2pe_deltas)


def seed_from_previous(prev_dir: str, stage_dir: str, cfg: RunConfig, task: loop.Task, mesh):
  """Write step 0 of `stage_dir` from the latest checkpoint of `prev_dir`: the previous stage's
  parameters resharded onto `mesh`, a fresh step, optimizer state and data cursors."""
  setup = state_lib.setup(task.model_fn, cfg.train.optimizer, cfg.train.steps, mesh, task.rules)
  prev = checkpoint_lib.Checkpointer(prev_dir, async_save=False)
  try:
    if prev.latest_step() is None:
      raise checkpoint_lib.CheckpointError(
        f"no checkpoint in {prev.directory}: the previous stage must finish before this one"
      )
    _, state, _ = prev.restore(setup.abstract)
  finally:
    prev.close()
  opt_shardings = jax.tree.map(lambda x: x.sharding, setup.abstract["opt_state"])
  with state_lib.scope(mesh, task.rules):
    opt_state = jax.jit(setup.tx.init, out_shardings=opt_shardings)(state["params"])
  step = jax.device_put(jnp.zeros((), jnp.int32), setup.abstract["step"].sharding)
  state = {**state, "step": step, "opt_state": opt_state}
  data = pipeline_lib.Pipeline(cfg.train.data, task.tokens_per_frame)
  try:
    data_state = pipeline_lib.global_state(data)
  finally:
    data.close()
  ckpt = checkpoint_lib.Checkpointer(stage_dir, async_save=False)
  try:
    ckpt.save(0, state, data_state, force=True)
  finally:
    ckpt.close()


def restore_model(stage_dir: str, cfg: RunConfig, task: loop.Task, mesh):
  """(model, step) of the latest checkpoint of a stage, on `mesh`."""
  setup = state_lib.setup(task.model_fn, cfg.train.optimizer, cfg.train.steps, mesh, task.rules)
  ckpt = checkpoint_lib.Checkpointer(stage_dir, async_save=False)
  try:
    step, state, _ = ckpt.restore(setup.abstract)
  finally:
    ckpt.close()
  return state_lib.merge(setup.graphdef, state), step


def _grid(seq_len: int, points: int, beyond: int, floor: int, unit: int = 1):
  """(min, max, step) of an evaluation grid: multiples of (seq_len * beyond / points) up to
  seq_len * beyond, none below `floor`, in units of `unit` tokens (1 for text, tokens per frame
  for V-NIAH frames)."""
  top = max(1, seq_len * beyond // unit)
  step = max(1, top // points)
  hi = step * points
  lo = min(hi, max(step, -(-floor // step) * step))
  return lo, hi, step


def evaluate(ext: Extension, cfg: RunConfig, stage: Stage, model, key: str, out: str, mesh):
  """Text NIAH and V-NIAH of one stage's model; {"text_niah": avg, "vniah": avg, ...}."""
  from lcv.eval import text_niah, vniah

  tok = tokenizer_lib.load(cfg.train.data.tokenizer)
  pad = 2 * stage.context
  row: dict = {}
  if ext.text_niah is not None:
    floor = ext.text_niah.min_tokens
    lo, hi, step = _grid(stage.seq_len, ext.eval_points, ext.eval_beyond, floor)
    t_cfg = dataclasses.replace(
      ext.text_niah,
      min_tokens=lo,
      max_tokens=hi,
      length_step=step,
      pad_multiple=_round_up(ext.text_niah.pad_multiple, pad),
    )
    res = text_niah.run(
      t_cfg, model, tok, mesh=mesh, output_dir=os.path.join(out, "text_niah"), progress=False,
      title=f"Text NIAH {stage.name}",
    )  # fmt: skip
    row["text_niah"] = res.average()
    row["text_niah_by_length"] = _by_x(res.records, "Context Length")
  if ext.vniah is not None:
    n_tok = cfg.model.frame_tokens
    floor = ext.vniah.min_frames
    lo, hi, step = _grid(stage.seq_len, ext.eval_points, ext.eval_beyond, floor, n_tok)
    v_cfg = dataclasses.replace(
      ext.vniah,
      min_frames=lo,
      max_frames=hi,
      frame_step=step,
      image_size=cfg.model.vision.image_size,
      pad_multiple=_round_up(ext.vniah.pad_multiple, pad),
      cache_dir=os.path.join(out, "vniah_cache"),
    )
    res = vniah.run(
      v_cfg, model, tok, model_key=key, mesh=mesh, output_dir=os.path.join(out, "vniah"),
      progress=False,
    )  # fmt: skip
    row["vniah"] = res.average()
    row["vniah_by_frames"] = _by_x(res.records, "Num. Frame")
  return row


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _by_x(records, x_key: str) -> dict[str, float]:
  xs = sorted({r[x_key] for r in records})
  return {str(x): float(np.mean([r["Score"] for r in records if r[x_key] == x])) for x in xs}


def run(ext: Extension, workdir: str, *, progress: bool = True) -> list[dict]:
  """Train and evaluate every stage in order (resuming where a previous call stopped); write
  `summary.md`, `summary.json` and `summary.png` into `workdir`. Returns the table rows."""
  os.makedirs(workdir, exist_ok=True)
  rows, prev_dir = [], None
  for k, stage in enumerate(ext.stages):
    cfg = stage_config(ext.base, stage)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    task = make_task(cfg, stage)
    stage_dir = os.path.join(workdir, f"{k}_{stage.name}")
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    if prev_dir is not None and not _has_checkpoint(ckpt_dir):
      seed_from_previous(prev_dir, stage_dir, cfg, task, mesh)
    t0 = time.perf_counter()
    history = loop.train(task, cfg.train, mesh, workdir=stage_dir, progress=progress)
    train_s = time.perf_counter() - t0
    history = _save_history(stage_dir, history)
    # Evaluation cases are single rows: batch 1 over the stage's context devices only.
    eval_mesh = mesh_lib.make_mesh(
      dataclasses.replace(cfg.mesh, data=1, fsdp=1, tensor=1),
      jax.devices()[: stage.context],
    )
    model, step = restore_model(stage_dir, cfg, task, eval_mesh)
    t0 = time.perf_counter()
    with state_lib.scope(eval_mesh, task.rules):
      scores = evaluate(ext, cfg, stage, model, f"{stage_dir}@{step}", stage_dir, eval_mesh)
    row = {
      "stage": stage.name,
      "seq_len": stage.seq_len,
      "theta": stage.theta,
      "scaling": stage.scaling.kind if stage.scaling else "none",
      "context": stage.context,
      "batch": stage.batch_size,
      "steps": step,
      "first_loss": history[0]["loss"] if history else float("nan"),
      "final_loss": history[-1]["loss"] if history else float("nan"),
      "tokens_per_s": float(np.median([r["tokens_per_s"] for r in history])) if history else 0.0,
      "train_s": train_s,
      "eval_s": time.perf_counter() - t0,
      **scores,
    }
    rows.append(row)
    prev_dir = stage_dir
    write_summary(rows, workdir, [_load_history(os.path.join(workdir, f"{i}_{s.name}"))
                                  for i, s in enumerate(ext.stages[: k + 1])])  # fmt: skip
  return rows


def _has_checkpoint(ckpt_dir: str) -> bool:
  return os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))


def _save_history(stage_dir: str, new: list[dict]) -> list[dict]:
  """Merge this call's step records into the stage's history.json (a resumed stage appends)."""
  old = [h for h in _load_history(stage_dir) if not new or h["step"] < new[0]["step"]]
  history = old + new
  with open(os.path.join(stage_dir, "history.json"), "w") as f:
    json.dump(history, f)
  return history


def _load_history(stage_dir: str) -> list[dict]:
  path = os.path.join(stage_dir, "history.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


COLUMNS = (
  ("stage", "{}"),
  ("seq_len", "{:,}"),
  ("theta", "{:.3g}"),
  ("scaling", "{}"),
  ("context", "{}"),
  ("batch", "{}"),
  ("steps", "{}"),
  ("first_loss", "{:.3f}"),
  ("final_loss", "{:.3f}"),
  ("tokens_per_s", "{:,.0f}"),
  ("text_niah", "{:.2f}"),
  ("vniah", "{:.2f}"),
)


def table(rows: list[dict]) -> str:
  """The summary rows as a Markdown table."""
  cols = [(c, f) for c, f in COLUMNS if any(c in r for r in rows)]
  lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(f.format(r[c]) if c in r else "-" for c, f in cols) + " |")
  return "\n".join(lines)


def write_summary(rows: list[dict], workdir: str, histories: list[list[dict]]) -> None:
  """summary.md (table), summary.json (rows) and summary.png (loss; accuracy vs length)."""
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(table(rows) + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(rows, f, indent=2)
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  offset = 0
  for row, hist in zip(rows, histories):
    steps = [offset + h["step"] for h in hist]
    axes[0].plot(steps, [h["loss"] for h in hist], label=f"{row['stage']} ({row['seq_len']:,})")
    offset += max((h["step"] for h in hist), default=0)
  axes[0].set(xlabel="step (all stages)", ylabel="train loss", title="Loss")
  for ax, key, unit, title in (
    (axes[1], "text_niah_by_length", "tokens", "Text NIAH"),
    (axes[2], "vniah_by_frames", "frames", "V-NIAH"),
  ):
    for row in rows:
      if key in row:
        xs = [int(x) for x in row[key]]
        ax.plot(xs, list(row[key].values()), marker="o", label=row["stage"])
    ax.set(xlabel=f"length ({unit})", ylabel="accuracy", title=title, ylim=(-0.05, 1.05))
  for ax in axes:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "summary.png"))
  plt.close(fig)
