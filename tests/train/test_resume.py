"""Exact resumption: SIGKILL mid-run + restart == uninterrupted; SIGTERM saves before exiting (on
one host of two as well: both stop at the same step);
2 processes x 4 devices == 1 process x 8 devices. Each run is a fresh Python process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lcv.config import MeshConfig
from lcv.parallel import mesh as mesh_lib
from lcv.train import loop
from lcv.train import metrics as metrics_lib
from tests.train import run_tiny, tiny_task

# Each run is a fresh process (~20-40 s of start-up and compile on 2 cores).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8


def _spawn(workdir, *args):
  env = {**os.environ, "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "tests.train.run_tiny", str(workdir), "--steps", str(STEPS), *args]
  return subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _losses(output: str) -> dict[int, float]:
  line = next(l for l in output.splitlines() if l.startswith("LOSSES "))
  return {int(s): loss for s, loss in json.loads(line[7:])}


def _wait_for_step(workdir, step: int, proc, timeout=240):
  """Block until metrics.jsonl shows `step` (the run is mid-way) or the process ends."""
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout and proc.poll() is None:
    if os.path.exists(path) and any(r["step"] >= step for r in metrics_lib.read(path)):
      return
    time.sleep(0.05)
  raise AssertionError(f"run did not reach step {step}: {proc.poll()=}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Uninterrupted losses, in this process (8 emulated devices, mesh data=2 x fsdp=4)."""
  workdir = tmp_path_factory.mktemp("reference")
  cfg = run_tiny.config(str(workdir), STEPS)
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=4))
  history = loop.train(tiny_task.task(), cfg, mesh, progress=False)
  return {r["step"]: r["loss"] for r in history}


def test_sigkill_then_resume_matches_uninterrupted(reference, tmp_path):
  proc = _spawn(tmp_path, "--step_sleep", "0.4")
  _wait_for_step(tmp_path, 5, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = {r["step"] for r in metrics_lib.read(os.path.join(tmp_path, "metrics.jsonl"))}
  assert max(done) < STEPS, "the kill must land mid-run"
  resumed = _spawn(tmp_path)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  assert "resumed from" in out
  losses = _losses(out)
  assert min(losses) > 1 and max(losses) == STEPS
  for step, loss in losses.items():
    assert loss == reference[step], (step, loss, reference[step])


def test_sigterm_saves_before_exit(tmp_path):
  proc = _spawn(tmp_path, "--step_sleep", "0.4", "--checkpoint_every", "100")
  _wait_for_step(tmp_path, 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert "SIGTERM: saved step" in out and saved, out
  assert 3 <= max(saved) < STEPS, saved


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _spawn_two_hosts(workdir, *args):
  """Two processes x 4 CPU devices joined by `jax.distributed` on a local coordinator."""
  port = _free_port()
  return [
    _spawn(
      workdir,
      "--devices", "4",
      "--coordinator", f"localhost:{port}",
      "--num_processes", "2",
      "--process_id", str(i),
      *args,
    )
    for i in range(2)
  ]  # fmt: skip


def test_two_processes_match_one(reference, tmp_path):
  procs = _spawn_two_hosts(tmp_path)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  for out in outs:
    for step, loss in _losses(out).items():
      # Same batches and math; only the cross-process reduction order may differ.
      assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_sigterm_on_one_host_stops_both_at_the_same_step(tmp_path):
  """Preemption reaches one host of two: both agree (an allgather of the flag), save the same
  step together and exit cleanly, so no host is left waiting in a collective."""
  procs = _spawn_two_hosts(tmp_path, "--step_sleep", "0.4", "--checkpoint_every", "100")
  _wait_for_step(tmp_path, 3, procs[0])
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=180)[0] for p in procs]
  steps = []
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
    line = next((ln for ln in out.splitlines() if ln.startswith("SIGTERM: saved step")), None)
    assert line is not None, out
    steps.append(int(line.split()[3]))
  assert steps[0] == steps[1] and 3 <= steps[0] < STEPS, steps
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert max(saved) == steps[0], saved
