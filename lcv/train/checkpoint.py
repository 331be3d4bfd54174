"""Orbax checkpoints: model, optimizer, RNG, step and the data-iterator state, together.

One `orbax.checkpoint.CheckpointManager` per run directory (`<workdir>/checkpoints/<step>/`) with
two items: "state" (the sharded train state, restored straight into the target shardings, so a
different mesh shape reshards on load) and "data" (the pipeline's JSON cursors). Saves are async
and atomic (orbax writes to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest); the newest `keep` are kept.

Failure is loud: a checkpoint that exists but cannot be read raises `CheckpointError` naming the
path and the way out; asking for a step that is not there raises too. A fresh start happens only
when the run directory holds no checkpoint at all, or when the caller asks (`fresh=True`).
"""

from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing or unreadable."""


class Checkpointer:
  """Save / restore train state + data state under `workdir/checkpoints`.

  Args:
    workdir: the run directory.
    keep: how many recent checkpoints to keep.
    async_save: write in a background thread (`wait` blocks until done).
    fresh: delete existing checkpoints first (an explicit request to start over).
  """

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, fresh: bool = False):
    if not workdir:
      raise ValueError(
        "train.workdir is empty; pass --workdir DIR (checkpoints and metrics go there)"
      )
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if fresh and jax.process_index() == 0 and os.path.isdir(self.directory):
      shutil.rmtree(self.directory)
    if fresh and jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("lcv_checkpoint_fresh")
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_state: dict, *, force: bool = False) -> bool:
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
    )
    return self.manager.save(step, args=args, force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def restore(self, abstract_state: dict, step: int | None = None) -> tuple[int, dict, dict]:
    """(step, state, data_state) of `step` (default: the latest), resharded to `abstract_state`'s
    shardings. Raises CheckpointError when the step is absent or unreadable."""
    steps = self.manager.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(
          f"no checkpoint in {self.directory}; train without --restore to start fresh"
        )
      step = max(steps)
    elif step not in steps:
      raise CheckpointError(
        f"checkpoint step {step} not found in {self.directory} (available: {sorted(steps)})"
      )
    path = os.path.join(self.directory, str(step))
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
    )
    try:
      out = self.manager.restore(step, args=args)
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
      raise CheckpointError(
        f"checkpoint {path} is corrupt or incompatible ({type(e).__name__}: {e}). Delete that "
        f"step directory to resume from an earlier one, or start over with --fresh"
      ) from e
    if out.data is None or "cursors" not in out.data:
      raise CheckpointError(
        f"checkpoint {path} has no data-iterator state; it cannot resume exactly"
      )
    return step, out.state, out.data

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
