"""The device mesh (`data`, `fsdp`, `context`, `tensor`) and multi-host start-up.

Axis order is outer-to-inner by link speed needed: `tensor` (a collective per matmul) innermost,
then `context` (a K/V hop per ring step, all-to-alls for Ulysses), then `fsdp` and `data` (one
gather / reduce per layer or step). `mesh_utils.create_device_mesh` maps the innermost axes onto
the fastest links: on TPU it follows the ICI torus; on GPU devices are ordered by process and
local id, so `tensor * context` <= GPUs per node keeps the ring on NVLink. Across slices or nodes
(`dcn_data`, `dcn_fsdp` > 1) `create_hybrid_device_mesh` puts only `data` / `fsdp` on the slow
network (DCN / InfiniBand); the context ring never crosses it.

All axes are `AxisType.Auto`: jax.make_mesh defaults to Explicit on jax >= 0.11, which would
change the semantics of logical-rule sharding (`lcv.parallel.rules`).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from lcv.config import MeshConfig
from lcv.parallel.ring_attention import STRATEGIES

AXES = ("data", "fsdp", "context", "tensor")


def resolve_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Axis sizes of one slice / node with the -1 filled in, validated against the device count."""
  dcn = {"data": cfg.dcn_data, "fsdp": cfg.dcn_fsdp}
  for name, size in dcn.items():
    if size < 1:
      raise ValueError(f"dcn_{name}={size} must be >= 1")
  slices = math.prod(dcn.values())
  if num_devices % slices:
    raise ValueError(
      f"{num_devices=} cannot be split into dcn_data * dcn_fsdp = {slices} slices / nodes"
    )
  per_slice = num_devices // slices
  sizes = {a: getattr(cfg, a) for a in AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if any(size < 1 and size != -1 for size in sizes.values()):
    raise ValueError(f"mesh sizes must be positive (or one -1); got {sizes}")
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1; got {sizes}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if per_slice % fixed:
      raise ValueError(
        f"cannot fill {free[0]}=-1: {per_slice} devices per slice is not a multiple of the other "
        f"axes' product {fixed} ({sizes})"
      )
    sizes[free[0]] = per_slice // fixed
  elif fixed != per_slice:
    raise ValueError(
      f"mesh {sizes} needs {fixed} devices per slice but there are {per_slice} "
      f"({num_devices} devices / {slices} slices); set one axis to -1 or change the sizes"
    )
  _check_strategy(cfg, sizes["context"])
  return sizes


def _check_strategy(cfg: MeshConfig, context: int) -> None:
  if cfg.context_parallel not in STRATEGIES:
    raise ValueError(f"context_parallel={cfg.context_parallel!r} must be one of {STRATEGIES}")
  if cfg.ulysses < 1 or context % cfg.ulysses:
    raise ValueError(
      f"ulysses={cfg.ulysses} must be a positive divisor of context={context} (hybrid groups)"
    )
  if cfg.load_balance not in ("zigzag", "striped", "none"):
    raise ValueError(f"load_balance={cfg.load_balance!r} must be 'zigzag', 'striped' or 'none'")


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  """Build the 4-axis mesh ("data", "fsdp", "context", "tensor"), all AxisType.Auto.

  Args:
    cfg: axis sizes; one may be -1.
    devices: defaults to jax.devices().

  Returns:
    jax.sharding.Mesh. Use it with `jax.set_mesh(mesh)` (ambient) or pass it explicitly.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_shape(cfg, len(devices))
  ici = tuple(sizes[a] for a in AXES)
  dcn = (cfg.dcn_data, cfg.dcn_fsdp, 1, 1)
  if math.prod(dcn) > 1:
    # One granule per process on GPU (a node), per slice on TPU.
    by_process = devices[0].platform != "tpu"
    attr = "process_index" if by_process else "slice_index"
    granules = len({getattr(d, attr, 0) for d in devices})
    if granules != math.prod(dcn):
      raise ValueError(
        f"dcn_data * dcn_fsdp = {math.prod(dcn)} but the devices span {granules} "
        f"{'processes' if by_process else 'slices'}; set them to the number of nodes / slices"
      )
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
  elif devices[0].platform == "tpu":
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    # GPU / CPU: jax.devices() is ordered by (process, local id); a plain reshape keeps the
    # inner axes (tensor, then context) inside a node.
    grid = np.asarray(devices).reshape(ici)
  full = tuple(i * d for i, d in zip(ici, dcn))
  return Mesh(np.asarray(grid).reshape(full), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _cluster_env() -> str | None:
  """Name of the multi-process launcher visible in the environment, if any."""
  env = os.environ
  if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1 and "SLURM_JOB_ID" in env:
    return "slurm"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "openmpi"
  if (
    len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    or "MEGASCALE_COORDINATOR_ADDRESS" in env
  ):
    return "tpu"
  return None


def initialize_distributed(
  coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
  """Start JAX's multi-process runtime (`jax.distributed.initialize`) once; before any jax op.

  With no arguments, JAX auto-detects the cluster (SLURM, Open MPI, Cloud TPU pods); when no
  launcher is visible this is a single-process run and nothing is started. Give
  `coordinator="host:port"`, `num_processes` and `process_id` to start explicitly.

  Returns:
    True if a multi-process runtime is (now) running, False for a single-process run.
  """
  explicit = (coordinator, num_processes, process_id)
  if any(a is not None for a in explicit) and any(a is None for a in explicit):
    raise ValueError(
      f"give all of {coordinator=}, {num_processes=}, {process_id=} or none (auto-detect)"
    )
  if getattr(jax.distributed, "is_initialized", lambda: False)():
    return True
  if coordinator is None and _cluster_env() is None:
    return False
  jax.distributed.initialize(
    coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
  )
  return True
