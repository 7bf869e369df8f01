"""Training metrics: metrics.jsonl, TensorBoard event files and a console line.

Only process 0 writes. Values are plain floats by the time they get here;
the trainer decides when to pull them off the device.

A resumed run redoes the steps after its checkpoint. So that readers see one
record per step, the writer first cuts both logs back to the restored step:
metrics.jsonl is rewritten without later records (and without a line torn
by a kill), and so is every TensorBoard event file (each rewrite is atomic,
so a crash leaves the old or the new file, never half of one). The new run
then appends to metrics.jsonl and writes a fresh event file, as TensorBoard
writers do.

A workdir on object storage (gs://) cannot be appended to, and TensorBoard's
writer reaches gs:// only through tf.io.gfile, which this project does not
use for storage. So the logs are kept in a local staging folder (first
filled with the workdir's logs, to be cut back) and uploaded through
lit_navit.fs, each changed file whole: at `sync()` (the trainer calls it at
each checkpoint), every SYNC_SECONDS of writes and at `close()`.
"""

import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from lit_navit import fs

JSONL = 'metrics.jsonl'
TENSORBOARD = 'tensorboard'
EVENTS_PATTERN = 'events.out.tfevents.*'
SYNC_SECONDS = 60


class MetricsWriter:
  """Appends one JSON object per record and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    """`resume_step`: the step training restarts from; later records go."""
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    # TF only writes summaries here; keep it off any accelerator JAX uses.
    tf.config.set_visible_devices([], 'GPU')
    self._tf = tf
    self._workdir = workdir
    self._staging = None
    self._uploaded = {}  # staged file -> (size, mtime) when last uploaded
    local = workdir
    if fs.is_remote(workdir):
      self._staging = local = tempfile.mkdtemp(prefix='lit_navit-metrics-')
      self._download_logs()
    jsonl_path = os.path.join(local, JSONL)
    tb_dir = os.path.join(local, TENSORBOARD)
    truncate_jsonl(jsonl_path, resume_step)
    for path in fs.glob(os.path.join(tb_dir, EVENTS_PATTERN)):
      truncate_events(path, resume_step)
    self._jsonl = open(jsonl_path, 'a', encoding='utf-8')
    self._tb = tf.summary.create_file_writer(tb_dir)
    self._last_sync = time.monotonic()

  def _download_logs(self) -> None:
    remote = [fs.join(self._workdir, JSONL)] + fs.glob(
        fs.join(self._workdir, TENSORBOARD, EVENTS_PATTERN))
    for path in remote:
      if not fs.isfile(path):
        continue
      relative = path[len(self._workdir.rstrip('/')) + 1:]
      local = os.path.join(self._staging, relative)
      os.makedirs(os.path.dirname(local), exist_ok=True)
      fs.download(path, local)
      self._uploaded[local] = _signature(local)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {'step': step, **{k: _plain(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    with self._tb.as_default(step=step):
      for key, value in record.items():
        if key != 'step' and isinstance(value, (int, float)):
          self._tf.summary.scalar(key, value)
    if self._staging and time.monotonic() - self._last_sync > SYNC_SECONDS:
      self.sync()

  def sync(self) -> None:
    """Flushes both logs and, for a gs:// workdir, uploads what changed."""
    if not self.enabled:
      return
    self._jsonl.flush()
    self._tb.flush()
    self._last_sync = time.monotonic()
    if not self._staging:
      return
    staged = [os.path.join(self._staging, JSONL)] + fs.glob(
        os.path.join(self._staging, TENSORBOARD, EVENTS_PATTERN))
    for local in staged:
      signature = _signature(local)
      if self._uploaded.get(local) != signature:
        relative = os.path.relpath(local, self._staging)
        fs.upload(local, fs.join(self._workdir, *relative.split(os.sep)))
        self._uploaded[local] = signature

  def close(self) -> None:
    if self._jsonl:
      try:
        self.sync()
      finally:
        self._jsonl.close()
        self._tb.close()
        if self._staging:
          shutil.rmtree(self._staging, ignore_errors=True)


def _signature(path: str):
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the records of metrics.jsonl up to `last_step` (and drops a torn
  last line); leaves the file alone when nothing is to go."""
  if not fs.exists(path):
    return
  lines = fs.read_bytes(path).split(b'\n')
  keep = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= last_step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # torn by a kill mid-write, or not a record
  if len(keep) < len([line for line in lines if line.strip()]):
    with fs.atomic_write(path) as f:
      f.write(b''.join(line + b'\n' for line in keep))


def truncate_events(path: str, last_step: int) -> None:
  """Keeps the events of one (local) TensorBoard file up to `last_step` (a
  record torn by a kill ends the file); leaves it alone when nothing is to go."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  keep, dropped = [], False
  for raw in event_file_loader.RawEventFileLoader(path).Load():
    if event_pb2.Event.FromString(raw).step <= last_step:
      keep.append(raw)
    else:
      dropped = True
  if not dropped and _record_bytes(keep) == fs.size(path):
    return
  from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
  with fs.atomic_write(path) as f:
    writer = record_writer.RecordWriter(f)
    for raw in keep:
      writer.write(raw)


def _record_bytes(records) -> int:
  # A TFRecord frame: 8-byte length, 4-byte CRC, data, 4-byte CRC.
  return sum(len(r) + 16 for r in records)


def _plain(value):
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item()
  return value


class Throughput:
  """Images/s, tokens/s, MFU and ETA over the steps since the last report."""

  def __init__(self, total_steps: int, peak_flops_per_s: float | None):
    self.total_steps = total_steps
    self.peak = peak_flops_per_s
    self._t0 = time.perf_counter()
    self._images = self._tokens = self._flops = self._steps = 0
    self._step_seconds = []

  def add(self, images: int, tokens: int, flops: float) -> None:
    self._images += images
    self._tokens += tokens
    self._flops += flops
    self._steps += 1

  def report(self, step: int, cut_short: bool = False) -> dict:
    """Rates since the last report. `cut_short`: the loop stopped (a
    signal) before its host work for the next step, so the time since the
    last report is only what the device had left of this step; the rates of
    the steps before are reported instead of a rate this short a time would
    inflate."""
    seconds = max(time.perf_counter() - self._t0, 1e-9)
    steps = max(self._steps, 1)
    if cut_short and self._step_seconds:
      seconds = max(seconds, float(np.median(self._step_seconds[-20:])) * steps)
    self._step_seconds.append(seconds / steps)
    recent = float(np.median(self._step_seconds[-20:]))
    out = {
        'images_per_s': self._images / seconds,
        'tokens_per_s': self._tokens / seconds,
        'gflops_per_s': self._flops / seconds / 1e9,
        'step_seconds': seconds / steps,
        'eta_seconds': recent * (self.total_steps - step),
    }
    if self.peak:
      out['mfu'] = self._flops / seconds / self.peak
    self._t0 = time.perf_counter()
    self._images = self._tokens = self._flops = self._steps = 0
    return out


def console_line(step: int, total: int, m: dict) -> str:
  eta = m.get('eta_seconds', math.nan)
  parts = [f'step {step}/{total}', f"loss {m['loss']:.4f}", f"lr {m.get('lr', 0):.2e}",
           f"{m.get('images_per_s', 0):.1f} img/s", f"pad {m.get('padding_fraction', 0):.1%}",
           f"text pad {m.get('text_padding_fraction', 0):.0%}"]
  if 'box_loss' in m:
    parts.insert(2, f"box {m['box_loss']:.4f}")
  if 'caption_loss' in m:
    parts.insert(2, f"caption {m['caption_loss']:.4f}")
  if 'mfu' in m:
    parts.append(f"mfu {m['mfu']:.1%}")
  parts.append(f'eta {eta / 60:.1f}m')
  return ' | '.join(parts)


def print_line(line: str) -> None:
  print(line, file=sys.stdout, flush=True)


def measure_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a float32 square matmul on the default device: the MFU ceiling."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    matmul(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * size ** 3 / float(np.median(times))
