"""Where the device time of a profiled step goes: kernel time by kind and the top kernels.

    python scripts/bench_train.py --seq 32768 --profile runs/prof      # writes the trace
    python scripts/profile_summary.py runs/prof/32768 --steps 2

Reads the Perfetto JSON (`perfetto_trace.json.gz`) that `jax.profiler.trace(...,
create_perfetto_trace=True)` writes (the newest under the given directory), keeps the complete
events of the device processes (name matching --device, e.g. "/device:GPU:0"), and sums their
durations by kernel name and by kind (the first pattern of `KINDS` that matches the name). Kernel
time is busy time on the device's streams; "span" is first start to last end, so span minus busy
is time the device sat idle (host-bound launches, synchronisation). Prints a table; --json prints
one JSON object instead.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

# (kind, pattern on the kernel name); first match wins, so specific patterns come first.
KINDS = (
  ("attention (lcv Pallas)", r"lcv_flash|lcv_hopper|flash_hopper|_forward|_dkv|_dq\b|mosaic"),
  ("attention (cuDNN)", r"cudnn|fmha|flash_fwd|flash_bwd"),
  ("collective", r"nccl|all_reduce|all_gather|reduce_scatter|collective"),
  ("matmul", r"gemm|cublas|cutlass|nvjet|xmma|wgmma|matmul|dot"),
  ("copy / transpose", r"memcpy|memset|copy|transpose"),
  ("fusion (elementwise / reduce)", r"fusion|reduce|convert|add|multiply|select"),
)


def trace_file(path: str) -> str:
  """`path` itself or the newest perfetto_trace.json.gz below it."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
  if not found:
    raise FileNotFoundError(
      f"no perfetto_trace.json.gz under {path!r}; trace with "
      "jax.profiler.trace(dir, create_perfetto_trace=True) (bench_train.py --profile does)"
    )
  return max(found, key=os.path.getmtime)


def device_events(path: str, device: str, thread: str = "Stream") -> list[dict]:
  """Complete ('X') events of processes whose name contains `device`, on threads whose name
  contains `thread` when there are any (GPU traces also hold "XLA Ops" / "XLA Modules" lines
  that repeat the stream's kernels as HLO ops and modules; counting them would double the time).
  """
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  meta = lambda kind: {  # noqa: E731
    (e["pid"], e.get("tid")) if kind == "thread_name" else e["pid"]: e["args"]["name"]
    for e in events
    if e.get("ph") == "M" and e.get("name") == kind
  }
  processes, threads = meta("process_name"), meta("thread_name")
  pids = {pid for pid, name in processes.items() if device in name}
  if not pids:
    raise ValueError(
      f"no process named like {device=} in the trace; processes: {sorted(processes.values())}"
    )
  out = [e for e in events if e.get("ph") == "X" and e.get("pid") in pids]
  streams = {key for key, name in threads.items() if key[0] in pids and thread in name}
  return [e for e in out if (e["pid"], e.get("tid")) in streams] if streams else out


def kind_of(name: str) -> str:
  for kind, pattern in KINDS:
    if re.search(pattern, name, re.IGNORECASE):
      return kind
  return "other"


def summarize(events: list[dict], steps: int = 1, top: int = 15) -> dict:
  """Milliseconds per step: span, busy, by kind, and the `top` kernels."""
  if not events:
    raise ValueError("the trace holds no device events (was anything run inside the trace?)")
  start = min(e["ts"] for e in events)
  end = max(e["ts"] + e.get("dur", 0.0) for e in events)
  by_name, by_kind = collections.Counter(), collections.Counter()
  for e in events:
    by_name[e["name"]] += e.get("dur", 0.0)
    by_kind[kind_of(e["name"])] += e.get("dur", 0.0)
  ms = lambda us: us / 1e3 / steps  # noqa: E731
  busy = sum(by_kind.values())
  return {
    "span_ms": ms(end - start),
    "busy_ms": ms(busy),
    "kinds": {k: ms(v) for k, v in by_kind.most_common()},
    "top": [(n[:90], ms(v)) for n, v in by_name.most_common(top)],
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("path", help="trace directory (or the .json.gz itself)")
  parser.add_argument("--device", default="/device:", help="process-name substring")
  parser.add_argument("--steps", type=int, default=1, help="steps in the trace (per-step times)")
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  s = summarize(device_events(trace_file(args.path), args.device), args.steps, args.top)
  if args.json:
    print(json.dumps(s))
    return s
  busy = s["busy_ms"]
  print(f"per step: span {s['span_ms']:.1f} ms, kernels busy {busy:.1f} ms")
  for kind, t in s["kinds"].items():
    print(f"  {kind:<32} {t:9.1f} ms  {t / busy:6.1%}")
  print("top kernels:")
  for name, t in s["top"]:
    print(f"  {t:9.1f} ms  {name}")
  return s


if __name__ == "__main__":
  main()
