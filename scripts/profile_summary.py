"""Where the device time of a profiled step goes: kernel time by kind and the top kernels.

    python scripts/bench_train.py --seq 32768 --profile runs/prof      # writes the trace
    python scripts/profile_summary.py runs/prof/32768 --steps 2

Reads the Perfetto JSON (`perfetto_trace.json.gz`) that `jax.profiler.trace(...,
create_perfetto_trace=True)` writes (the newest under the given directory), keeps the complete
events of the device processes (name matching --device, e.g. "/device:GPU:0"), and sums their
durations by kernel name and by kind (the first pattern of `KINDS` that matches the name). Kernel
time is busy time on the device's streams; "span" is first start to last end, so span minus busy
is time the device sat idle (host-bound launches, synchronisation). Prints a table; --json prints
one JSON object instead. Device copies ("MemcpyD2D" in the kernel list) are also grouped by the
HLO instruction that issued them and their size, from the events' `hlo_op` / `memcpy_details`.

With --hlo, kernel time is also attributed to the source lines that made it: XLA's optimised HLO
(dumped by `XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`) gives each HLO instruction
its `op_name` and source line; the trace's "XLA Ops" line times each instruction. Rows are (pass,
source line, primitive), "bwd" where the op_name holds `transpose(` (autodiff's backward).
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
  """Milliseconds per step: span, busy, by kind, and the `top` kernels (name, ms, launches)."""
  if not events:
    raise ValueError("the trace holds no device events (was anything run inside the trace?)")
  start = min(e["ts"] for e in events)
  end = max(e["ts"] + e.get("dur", 0.0) for e in events)
  by_name, by_kind, calls = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    by_name[e["name"]] += e.get("dur", 0.0)
    calls[e["name"]] += 1
    by_kind[kind_of(e["name"])] += e.get("dur", 0.0)
  ms = lambda us: us / 1e3 / steps  # noqa: E731
  busy = sum(by_kind.values())
  return {
    "span_ms": ms(end - start),
    "busy_ms": ms(busy),
    "kinds": {k: ms(v) for k, v in by_kind.most_common()},
    "top": [(n[:90], ms(v), calls[n] / steps) for n, v in by_name.most_common(top)],
  }


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_OPCODE = re.compile(r"=\s*(?:\([^=]*?\)|\S+)\s+([\w\-]+)\(")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_TABLE_ROW = re.compile(r'^(\d+)\s+(?:"(.*)"|\{(.*)\})\s*$')


def _parse_module(lines) -> dict[str, dict[str, str]]:
  """{instruction: metadata} of one HLO module's text, `stack_frame_id` resolved to `source`
  (the innermost frame's file:line function) through the module's FileNames / FunctionNames /
  FileLocations / StackFrames tables (newer XLA); older dumps carry source_file / source_line."""
  tables, table, out = collections.defaultdict(dict), None, {}
  for line in lines:
    head = line.strip()
    if head in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      table = head
      continue
    row = _TABLE_ROW.match(head) if table else None
    if row:
      value = row.group(2)
      if value is None:
        value = {k: v for k, v in _FIELD.findall(row.group(3))}
      tables[table][row.group(1)] = value
      continue
    table = None if head else table
    m = _INSTRUCTION.match(line)
    if m and m.group(1) not in out:
      meta = {k: v.strip('"') for k, v in _FIELD.findall(m.group(2))}
      opcode, target = _OPCODE.search(line), _TARGET.search(line)
      meta["what"] = " ".join(
        x for x in (m.group(1), opcode and opcode.group(1), target and target.group(1)) if x
      )
      out[m.group(1)] = meta
  for meta in out.values():
    frame = tables["StackFrames"].get(meta.get("stack_frame_id", ""))
    loc = frame and tables["FileLocations"].get(frame.get("file_location_id", ""))
    if loc:
      file = tables["FileNames"].get(loc.get("file_name_id", ""), "?")
      func = tables["FunctionNames"].get(loc.get("function_name_id", ""), "?")
      meta["source"] = f"{os.path.basename(file)}:{loc.get('line', '?')} {func}"
    elif "source_file" in meta:
      meta["source"] = f"{os.path.basename(meta['source_file'])}:{meta.get('source_line', '?')}"
  return out


def hlo_metadata(path: str) -> dict[str, dict[str, str]]:
  """{instruction name: its metadata fields (+ "source")} of every optimised-HLO text file under
  `path` (or the file itself): `*after_optimizations.txt` of an XLA dump."""
  files = (
    [path]
    if os.path.isfile(path)
    else glob.glob(os.path.join(path, "**", "*after_optimizations.txt"), recursive=True)
  )
  if not files:
    raise FileNotFoundError(
      f"no *after_optimizations.txt under {path!r}; dump with "
      'XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"'
    )
  out = {}
  for name in sorted(files, key=os.path.getsize):  # the biggest module (the step) wins a clash
    with open(name) as f:
      out.update(_parse_module(f))
  return out


def source_of(meta: dict[str, str] | None) -> str:
  """'fwd|bwd file:line function primitive' of one instruction ('?' where it has no metadata)."""
  if not meta:
    return "? (no metadata)"
  op = meta.get("op_name", "")
  step = "bwd" if "transpose(" in op else "fwd"
  return f"{step} {meta.get('source', '?')} {op.rsplit('/', 1)[-1][:40]}"


def leaves(events: list[dict]) -> list[dict]:
  """The events that contain no other event of their thread (the "XLA Ops" line nests a loop's
  body ops inside the loop op; only the innermost carry the time once)."""
  out, ordered = [], sorted(events, key=lambda e: (e.get("tid"), e["ts"], -e.get("dur", 0.0)))
  for e, nxt in zip(ordered, ordered[1:] + [None]):
    inner = nxt and nxt.get("tid") == e.get("tid") and nxt["ts"] < e["ts"] + e.get("dur", 0.0)
    if not inner:
      out.append(e)
  return out


def by_source(op_events: list[dict], metadata: dict, steps: int = 1, top: int = 25) -> list:
  """[(source row, kind, ms per step)] of the `top` rows: the "XLA Ops" line's innermost events
  (named by their HLO instruction) matched to the optimised HLO's metadata."""
  acc = collections.Counter()
  for e in leaves(op_events):
    op = re.split(r"[\s=]", e["name"].lstrip("%"), maxsplit=1)[0]
    hlo_op = (e.get("args") or {}).get("hlo_op", "")
    # Kernels run inside a command buffer are named for their fusion, "." turned into "_"
    # (loop_add_fusion.19 -> loop_add_fusion_19); others carry their instruction as hlo_op.
    names = (op, re.sub(r"_(\d+)$", r".\1", op), hlo_op)
    meta = next((metadata[n] for n in names if n in metadata), None)
    acc[(source_of(meta), kind_of(meta["what"] if meta else op))] += e.get("dur", 0.0)
  return [(row, kind, us / 1e3 / steps) for (row, kind), us in acc.most_common(top)]


def copies(events: list[dict], steps: int = 1, top: int = 10) -> list:
  """[(HLO op, bytes per copy, ms per step, copies per step)] of the device's memcpy events, by
  the instruction that issued them (their `hlo_op` arg; a command buffer's copies carry the buffer's
  name) and size: the copies a profile lists only as "MemcpyD2D"."""
  acc, calls = collections.Counter(), collections.Counter()
  for e in events:
    if not e["name"].startswith("Memcpy"):
      continue
    args = e.get("args") or {}
    size = re.search(r"size:(\d+)", args.get("memcpy_details", ""))
    key = (args.get("hlo_op", "?"), int(size.group(1)) if size else -1)
    acc[key] += e.get("dur", 0.0)
    calls[key] += 1
  return [(op, size, us / 1e3 / steps, calls[op, size] / steps) for (op, size), us in
          acc.most_common(top)]  # fmt: skip


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("path", help="trace directory (or the .json.gz itself)")
  parser.add_argument("--device", default="/device:", help="process-name substring")
  parser.add_argument("--steps", type=int, default=1, help="steps in the trace (per-step times)")
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--hlo", default=None, help="XLA dump dir: attribute time to source lines")
  args = parser.parse_args(argv)
  events = device_events(trace_file(args.path), args.device)
  s = summarize(events, args.steps, args.top)
  if args.hlo:
    ops = device_events(trace_file(args.path), args.device, thread="XLA Ops")
    s["sources"] = by_source(ops, hlo_metadata(args.hlo), args.steps, args.top)
  s["copies"] = copies(events, args.steps, args.top)
  if args.json:
    print(json.dumps(s))
    return s
  busy = s["busy_ms"]
  print(f"per step: span {s['span_ms']:.1f} ms, kernels busy {busy:.1f} ms")
  for kind, t in s["kinds"].items():
    print(f"  {kind:<32} {t:9.1f} ms  {t / busy:6.1%}")
  print("top kernels:")
  for name, t, n in s["top"]:
    print(f"  {t:9.1f} ms  {n:6g} x  {name}")
  if s["copies"]:
    print("device copies (issuing HLO op, size):")
    for op, size, t, n in s["copies"]:
      print(f"  {t:9.1f} ms  {n:6g} x  {size / 2**20:9.2f} MiB  {op}")
  if "sources" in s:
    print("by source (pass, file:line, primitive):")
    for row, kind, t in s["sources"]:
      print(f"  {t:9.1f} ms  {kind.split(' ')[0]:<10} {row}")
  return s


if __name__ == "__main__":
  main()
