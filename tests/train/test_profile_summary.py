"""scripts/profile_summary.py on a small hand-made Perfetto trace: only the device's stream
events count (not the "XLA Ops" line that repeats them), kinds by kernel name, per-step times."""

import gzip
import json

import pytest

from tests.eval.test_scripts import load_script


def _trace(path):
  meta = lambda kind, pid, name, tid=None: {  # noqa: E731
    "ph": "M", "name": kind, "pid": pid, **({"tid": tid} if tid is not None else {}),
    "args": {"name": name},
  }  # fmt: skip
  x = lambda pid, tid, name, ts, dur: dict(ph="X", pid=pid, tid=tid, name=name, ts=ts, dur=dur)  # noqa: E731
  events = [
    meta("process_name", 1, "/device:GPU:0"),
    meta("thread_name", 1, "Stream #14(Compute)", tid=14),
    meta("thread_name", 1, "XLA Ops", tid=2),
    meta("process_name", 7, "/host:CPU"),
    x(1, 14, "entry_mosaic_gpu_kernel", 0, 3000),
    x(1, 14, "nvjet_sm90_tst_128x160", 3000, 2000),
    x(1, 14, "loop_add_multiply_fusion", 5000, 1000),
    x(1, 14, "ncclDevKernel_AllReduce", 6000, 500),
    x(1, 14, "something_else", 7500, 500),
    x(1, 2, "fusion.1", 0, 8000),  # the same time again, as an HLO op line
    x(7, 1, "python", 0, 99999),
  ]
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_summary_counts_stream_kernels_by_kind(tmp_path):
  ps = load_script("profile_summary")
  run = tmp_path / "plugins" / "profile" / "run1"
  run.mkdir(parents=True)
  _trace(run / "perfetto_trace.json.gz")
  found = ps.trace_file(str(tmp_path))
  s = ps.summarize(ps.device_events(found, "/device:"), steps=2)
  assert s["busy_ms"] == pytest.approx(3.5) and s["span_ms"] == pytest.approx(4.0)
  assert s["kinds"] == pytest.approx(
    {"attention (lcv Pallas)": 1.5, "matmul": 1.0, "fusion (elementwise / reduce)": 0.5,
     "collective": 0.25, "other": 0.25}
  )  # fmt: skip
  assert s["top"][0] == ("entry_mosaic_gpu_kernel", pytest.approx(1.5), 0.5)
  with pytest.raises(ValueError, match="no process named"):
    ps.device_events(found, "/device:TPU")
  with pytest.raises(FileNotFoundError, match="perfetto_trace"):
    ps.trace_file(str(tmp_path / "plugins" / "nothing"))


_HLO = """HloModule jit_step, is_scheduled=true

FileNames
1 "/src/lcv/models/decoder.py"

FunctionNames
1 "mlp"

FileLocations
1 {file_name_id=1 function_name_id=1 line=42 end_line=42 column=6 end_column=20}

StackFrames
1 {file_location_id=1 parent_frame_id=1}

ENTRY %main.1 (x.1: bf16[8]) -> bf16[8] {
  %x.1 = bf16[8]{0} parameter(0), metadata={op_name="x"}
  %gemm.3 = bf16[8]{0} custom-call(%x.1), custom_call_target="__cublas$gemm", {META1}
  ROOT %loop_add_multiply_fusion.2 = bf16[8]{0} fusion(%gemm.3), kind=kLoop, calls=%f, {META2}
}
""".replace("{META1}", 'metadata={op_name="jit(step)/jvp(f)/dot_general" stack_frame_id=1}')
_HLO = _HLO.replace(
  "{META2}", 'metadata={op_name="jit(step)/transpose(jvp(f))/mul" stack_frame_id=1}'
)


def test_time_by_source_line(tmp_path):
  """--hlo: the "XLA Ops" line's innermost events (a loop op holding its body's ops counts once)
  matched to the optimised HLO's instructions, rows named by innermost stack frame and pass."""
  ps = load_script("profile_summary")
  (tmp_path / "module_0001.jit_step.sm_90_gpu_after_optimizations.txt").write_text(_HLO)
  meta = ps.hlo_metadata(str(tmp_path))
  assert meta["gemm.3"]["source"] == "decoder.py:42 mlp"
  assert meta["gemm.3"]["what"] == "gemm.3 custom-call __cublas$gemm"
  x = lambda name, ts, dur: dict(ph="X", tid=2, name=name, ts=ts, dur=dur)  # noqa: E731
  events = [
    x("while.7", 0, 4500),  # the loop: holds the three below
    x("gemm.3", 0, 3000),
    x("loop_add_multiply_fusion_2", 3000, 1000),  # a command buffer's kernel: "." -> "_"
    x("custom-call.9", 4000, 500),
  ]
  rows = ps.by_source(events, meta, steps=1)
  assert rows == [
    ("fwd decoder.py:42 mlp dot_general", "matmul", pytest.approx(3.0)),
    ("bwd decoder.py:42 mlp mul", "fusion (elementwise / reduce)", pytest.approx(1.0)),
    ("? (no metadata)", "other", pytest.approx(0.5)),
  ]
  with pytest.raises(FileNotFoundError, match="xla_dump_to"):
    ps.hlo_metadata(str(tmp_path / "none"))


def test_copies_by_issuing_op_and_size():
  ps = load_script("profile_summary")
  copy = lambda op, size, dur: {  # noqa: E731
    "ph": "X", "pid": 1, "tid": 14, "name": "MemcpyD2D", "ts": 0, "dur": dur,
    "args": {"hlo_op": op, "memcpy_details": f"kind_src:device kind_dst:device size:{size}"},
  }  # fmt: skip
  events = [copy("command_buffer_4", 2**20, 30), copy("command_buffer_4", 2**20, 10)]
  events += [copy("copy.7", 64, 4), {"ph": "X", "name": "gemm", "ts": 0, "dur": 99}]
  assert ps.copies(events, steps=2) == [
    ("command_buffer_4", 2**20, pytest.approx(0.02), 1.0),
    ("copy.7", 64, pytest.approx(0.002), 0.5),
  ]
