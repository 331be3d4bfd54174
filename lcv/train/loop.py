"""The training loop: data -> sharded state -> jitted step -> metrics, checkpoints, preemption.

    history = loop.train(task, train_cfg, mesh, workdir="runs/x")

Everything model-specific arrives in a `Task` (`lcv.train.task.vlm_task` builds the VLM one), so
the loop is the same for any module. Behaviour on the way out:
  * a non-finite loss stops the run with `FloatingPointError`; the checkpoint of the last good
    step stays the latest (the bad step is never saved);
  * SIGTERM (pod / cluster preemption) saves a checkpoint at the current step, then returns;
  * a run restarted on the same workdir resumes from the latest checkpoint, bit-exactly: the model,
    optimizer, RNG and step come from orbax, the data cursors from the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from lcv.config import TrainConfig
from lcv.data import feeding
from lcv.data import pipeline as pipeline_lib
from lcv.train import checkpoint as checkpoint_lib
from lcv.train import flops as flops_lib
from lcv.train import metrics as metrics_lib
from lcv.train import state as state_lib
from lcv.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Task:
  """The model-specific half of a run.

  model_fn: () -> nnx.Module, called under the mesh and rules (abstractly, then sharded).
  loss_fn: (module, batch) -> (sum_loss, sum_weight, aux); see `lcv.train.step`.
  inputs_fn: host packed batch (`lcv.data.pipeline`) -> the model's batch pytree (numpy).
  tokens_per_frame: visual tokens per frame (for packing).
  flops_fn: host packed batch -> training FLOPs of the step (for MFU), or None.
  rules: the logical-axis rules table.
  """

  model_fn: Callable[[], nnx.Module]
  loss_fn: step_lib.LossFn
  inputs_fn: Callable[[dict], dict]
  tokens_per_frame: int
  rules: tuple
  flops_fn: Callable[[dict], float] | None = None


class _Preemption:
  """Turns SIGTERM into a flag the loop polls (agreed across hosts before acting on it)."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    if _main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.flag = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.flag))))


def _main_thread() -> bool:
  import threading

  return threading.current_thread() is threading.main_thread()


def _progress(total: int, initial: int):
  if jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")


def train(
  task: Task,
  cfg: TrainConfig,
  mesh,
  *,
  workdir: str | None = None,
  fresh: bool = False,
  progress: bool = True,
) -> list[dict]:
  """Train until `cfg.steps` optimizer steps are done (resuming the workdir's latest checkpoint).

  Args:
    task: the model side (`Task`).
    cfg: the run config (data and optimizer included).
    mesh: the device mesh (`lcv.parallel.mesh.make_mesh`).
    workdir: run directory (default cfg.workdir): checkpoints/, metrics.jsonl, tb/, profile/.
    fresh: delete existing checkpoints and start over (otherwise the latest one is resumed).
    progress: show a progress bar on process 0.

  Returns:
    The metrics of every step run by this call (dicts of floats, step numbers 1-based).
  """
  workdir = workdir or cfg.workdir
  data_cfg = cfg.data
  feeding.check_batch(data_cfg.batch_size, mesh, cfg.grad_accum)
  setup = state_lib.setup(task.model_fn, cfg.optimizer, cfg.steps, mesh, task.rules, cfg.seed)
  ckpt = checkpoint_lib.Checkpointer(
    workdir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint, fresh=fresh
  )
  slots = feeding.host_slots(mesh, data_cfg.batch_size)
  # Model inputs and FLOPs are computed in the prefetch thread, overlapping the device step.
  prepare = lambda host: (task.inputs_fn(host), task.flops_fn(host) if task.flops_fn else None)
  data = pipeline_lib.Pipeline(data_cfg, task.tokens_per_frame, slots=slots, transform=prepare)
  if ckpt.latest_step() is not None:
    start, state, data_state = ckpt.restore(setup.abstract)
    data.set_state(data_state)
    print(f"resumed from {ckpt.directory}/{start}", flush=True)
    if start >= cfg.steps:
      print(f"step {start} >= train.steps={cfg.steps}: nothing to do (raise train.steps)")
  else:
    start = 0
    state = state_lib.create(task.model_fn, setup, cfg.seed)
    if jax.process_index() == 0:
      print(f"no checkpoint in {ckpt.directory}: starting from scratch", flush=True)

  train_step = step_lib.make_train_step(
    setup.graphdef,
    setup.tx,
    task.loss_fn,
    grad_accum=cfg.grad_accum,
    schedules=setup.schedules,
    frozen=setup.frozen,
  )
  with state_lib.scope(mesh, task.rules):
    jitted = step_lib.jit_train_step(train_step, setup)
  writer = metrics_lib.MetricWriter(workdir)
  device = jax.devices()[0]
  n_dev = jax.device_count()
  bar = _progress(cfg.steps, start) if progress else None
  history, last_saved = [], start
  profiling = False
  prof_start, prof_stop = cfg.profile_steps
  try:
    with _Preemption() as preempt, state_lib.scope(mesh, task.rules):
      step = start
      while step < cfg.steps:
        if prof_stop > prof_start and step == prof_start and jax.process_index() == 0:
          jax.profiler.start_trace(os.path.join(workdir, "profile"))
          profiling = True
        t0 = time.perf_counter()
        inputs, flops = next(data)
        batch = feeding.to_device(inputs, mesh, slots, data_cfg.batch_size)
        state, m = jitted(state, batch)
        m = jax.device_get(m)
        dt = time.perf_counter() - t0
        step += 1
        if profiling and step >= prof_stop:
          jax.profiler.stop_trace()
          profiling = False
        loss = float(m["loss"])
        if not np.isfinite(loss):
          ckpt.wait()
          raise FloatingPointError(
            f"loss is {loss} at step {step}; stopping. The last good checkpoint is step "
            f"{ckpt.latest_step()} in {ckpt.directory} (lower optimizer.lr, raise warmup_steps or "
            "inspect the data of this step)"
          )
        tokens = data_cfg.batch_size * data_cfg.seq_len
        record = {k: float(v) for k, v in m.items()}
        record.update(step=step, step_time=dt, tokens_per_s=tokens / dt)
        if flops is not None:
          record["mfu"] = flops_lib.mfu(flops, dt, device.device_kind, n_dev)
        history.append(record)
        if step % cfg.log_every == 0 or step == cfg.steps:
          writer.write(step, {k: v for k, v in record.items() if k != "step"})
        if bar is not None:
          lr = next((v for k, v in record.items() if k.startswith("lr/")), 0.0)
          mfu = record.get("mfu")
          bar.set_postfix(
            loss=f"{loss:.4f}",
            lr=f"{lr:.2e}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            mfu="n/a" if mfu is None else f"{mfu:.1%}",
            step_s=f"{dt:.2f}",
          )
          bar.update(1)
        if preempt.requested():
          ckpt.save(step, state, pipeline_lib.global_state(data), force=True)
          ckpt.wait()
          last_saved = step
          print(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting", flush=True)
          return history
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
          ckpt.save(step, state, pipeline_lib.global_state(data))
          last_saved = step
      if step != last_saved:
        ckpt.save(step, state, pipeline_lib.global_state(data), force=True)
    return history
  finally:
    if profiling:
      jax.profiler.stop_trace()
    if bar is not None:
      bar.close()
    data.close()
    writer.close()
    ckpt.close()
