"""The training input pipeline: source -> media -> tokens -> packed rows -> device arrays.

Determinism and exact resumption come from one rule: global row slot b of every batch (b < B) packs
its own sub-stream of the shuffled, repeated source (stream item j of slot b is source item
j * B + b), greedily and in order. A batch is therefore a pure function of B integer cursors, the
whole iterator state (`Pipeline.get_state`). Each host builds only the slots its devices hold, so
the global batch is the same for any number of hosts (a 2-host run sees exactly the batches of a
1-host run), and a state saved by N hosts restores on M.

The source is random access (the synthetic set, or a TFDS data source over array_record files,
`lcv.data.tfds`), reshuffled per epoch by index (`Stream`), so no position needs a replay. Core
dependencies only: grain and tensorflow-datasets are not needed for synthetic data.
"""

from __future__ import annotations

import queue
import threading

import jax
import numpy as np

from lcv.config import DataConfig
from lcv.data import media, packing, synthetic
from lcv.data import tokenizer as tokenizer_lib

# Positions are carried as int32 ticks of 1/256 (docs/internals.md), so at most 2^23 positions.
MAX_SEQ_LEN = 2**23


class Stream:
  """An endless, epoch-wise shuffled view of a random-access source: stream[j] for any j >= 0.

  Epoch e = j // len(source) visits the source in the order of a permutation drawn from
  (seed, e), so any position is computed directly, without replaying the stream.
  """

  def __init__(self, src, seed: int, shuffle: bool = True):
    self.src, self.seed, self.shuffle = src, seed, shuffle
    self.size = len(src)
    if self.size < 1:
      raise ValueError("the data source is empty; check data.source / tfds_name / split")
    self._perm: tuple[int, np.ndarray] | None = None

  def index(self, j: int) -> int:
    epoch, i = divmod(int(j), self.size)
    if not self.shuffle:
      return i
    if self._perm is None or self._perm[0] != epoch:
      self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size))
    return int(self._perm[1][i])

  def __getitem__(self, j: int):
    return self.src[self.index(j)]


def source(cfg: DataConfig) -> Stream:
  """The shuffled, endlessly repeated example stream of `cfg` (dicts with frames/prompt/answer)."""
  if cfg.source == "synthetic":
    src = synthetic.SyntheticSource(
      cfg.seed,
      cfg.synthetic_size,
      image_size=cfg.image_size,
      frames=cfg.synthetic_frames,
      kinds=cfg.synthetic_kinds,
    )
  elif cfg.source == "tfds":
    from lcv.data import tfds  # optional extra: tensorflow-datasets

    src = tfds.source(cfg)
  else:
    raise ValueError(f"data.source={cfg.source!r} must be 'synthetic' or 'tfds'")
  return Stream(src, cfg.seed, cfg.shuffle)


def preprocess(example: dict, cfg: DataConfig) -> dict:
  """Sample frames (uniform / fps) and resize-pad them to image_size; text passes through."""
  frames = example.get("frames")
  if frames is None or len(frames) == 0:
    frames = np.zeros((0, cfg.image_size, cfg.image_size, 3), np.uint8)
  else:
    frames = media.check_frames(frames)
    idx = media.sample_frames(
      len(frames),
      cfg.max_frames,
      mode=cfg.frame_sampling,
      fps=cfg.fps,
      source_fps=example.get("fps"),
    )
    frames = media.resize_pad(frames[idx], cfg.image_size)
  return {**example, "frames": frames}


class Pipeline:
  """Iterator over host-local packed batches (dicts of numpy arrays, leading axis = local rows).

  Args:
    cfg: the data config.
    tokens_per_frame: visual tokens the model makes from one frame.
    slots: the global row slots this host builds (default: all B); see `host_slots`.
    transform: optional batch -> anything, applied in the prefetch thread (model-input building
      overlaps the device step); the iterator then yields its results.
  """

  def __init__(self, cfg: DataConfig, tokens_per_frame: int, slots=None, transform=None):
    if not 1 <= cfg.seq_len <= MAX_SEQ_LEN:
      raise ValueError(
        f"data.seq_len={cfg.seq_len} exceeds the exact positions' range {MAX_SEQ_LEN} (int32 "
        "ticks of 1/256); shorten the sequence or shard it over more rows"
      )
    if tokens_per_frame < 1:
      raise ValueError(f"{tokens_per_frame=} must be >= 1")
    self.cfg = cfg
    self.tokens_per_frame = tokens_per_frame
    self.transform = transform
    self.slots = list(range(cfg.batch_size)) if slots is None else [int(s) for s in slots]
    if any(not 0 <= s < cfg.batch_size for s in self.slots):
      raise ValueError(f"row slots {self.slots} must lie in [0, batch_size={cfg.batch_size})")
    self.tokenizer = tokenizer_lib.load(cfg.tokenizer)
    self._stream = source(cfg)
    self._packers = {
      s: packing.RowPacker(
        self._fetcher(s), cfg.seq_len, tokens_per_frame, cfg.image_size, cfg.frames_per_row
      )
      for s in self.slots
    }
    self._cursors = [0] * cfg.batch_size
    self._thread = None

  def _fetcher(self, slot: int):
    b = self.cfg.batch_size

    def fetch(j: int) -> packing.Sample:
      example = preprocess(self._stream[j * b + slot], self.cfg)
      return packing.tokenize(
        example,
        self.tokenizer,
        self.tokens_per_frame,
        answer_weight=self.cfg.answer_weight,
        prompt_weight=self.cfg.prompt_weight,
      )

    return fetch

  def _build(self, cursors: list[int]) -> tuple[dict, list[int]]:
    rows, ids, cursors = [], [], list(cursors)
    for s in self.slots:
      ids.append((s, cursors[s]))
      row, cursors[s] = self._packers[s].row(cursors[s])
      rows.append(row)
    batch = packing.stack(rows)
    # (slot, first stream index) names a row for good: per-row randomness (V2PE strides) is
    # seeded from it, so it too is independent of host count and exact on resume.
    batch["row_id"] = np.asarray(ids, np.int64)
    return (batch if self.transform is None else self.transform(batch)), cursors

  # Prefetch: a producer thread runs ahead by `cfg.prefetch` batches; each queued batch carries the
  # state *after* it, so the state we report is always that of the last batch handed out.
  def _produce(self, cursors, q, stop):
    try:
      while not stop.is_set():
        batch, cursors = self._build(cursors)
        while not stop.is_set():
          try:
            q.put((batch, cursors), timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # surfaced in __next__
      q.put((e, None))

  def _start(self):
    self._queue = queue.Queue(maxsize=max(self.cfg.prefetch, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(
      target=self._produce, args=(self._cursors, self._queue, self._stop), daemon=True
    )
    self._thread.start()

  def close(self):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.cfg.prefetch <= 0:
      batch, self._cursors = self._build(self._cursors)
      return batch
    if self._thread is None:
      self._start()
    batch, cursors = self._queue.get()
    if isinstance(batch, BaseException):
      self.close()
      raise batch
    self._cursors = cursors
    return batch

  def get_state(self) -> dict:
    """This host's view of the state: JSON-able {"cursors": [B ints]} (other hosts' slots stale;
    `global_state` merges them)."""
    return {"cursors": list(self._cursors), "slots": list(self.slots)}

  def set_state(self, state: dict):
    cursors = [int(c) for c in state["cursors"]]
    if len(cursors) != self.cfg.batch_size:
      raise ValueError(
        f"data state has {len(cursors)} row cursors but data.batch_size={self.cfg.batch_size}; "
        "resume with the batch size the checkpoint was written with"
      )
    self.close()
    self._cursors = cursors


def global_state(pipeline: Pipeline) -> dict:
  """The full iterator state, every host's slots merged (a collective: call on all hosts)."""
  cursors = np.asarray(pipeline._cursors, np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    mine = np.zeros_like(cursors)
    mine[pipeline.slots] = cursors[pipeline.slots]
    owned = np.zeros_like(cursors)
    owned[pipeline.slots] = 1
    mine = multihost_utils.process_allgather(mine)
    owned = multihost_utils.process_allgather(owned)
    cursors = (mine * owned).sum(0) // np.maximum(owned.sum(0), 1)
  return {"cursors": [int(c) for c in cursors]}
