"""Training metrics: metrics.jsonl, TensorBoard event files and a console line.

Only process 0 writes. Values are plain floats by the time they get here;
the trainer decides when to pull them off the device.

A resumed run redoes the steps after its checkpoint. So that readers see one
record per step, the writer first cuts both logs back to the restored step:
metrics.jsonl is rewritten without later records (and without a line torn
by a kill), and so is every TensorBoard event file (each write goes to a
temporary file that is then renamed over the old one, so a crash leaves the
old or the new file, never half of one). The new run then appends to
metrics.jsonl and writes a fresh event file, as TensorBoard writers do.
"""

import glob
import json
import math
import os
import sys
import time

import numpy as np


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
    jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    tb_dir = os.path.join(workdir, 'tensorboard')
    truncate_jsonl(jsonl_path, resume_step)
    for path in glob.glob(os.path.join(tb_dir, 'events.out.tfevents.*')):
      truncate_events(path, resume_step)
    self._jsonl = open(jsonl_path, 'a', encoding='utf-8')
    self._tb = tf.summary.create_file_writer(tb_dir)

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

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._tb.flush()
      self._tb.close()


def _replace_atomically(path: str, write) -> None:
  """write(file) to a temporary file, then rename it over `path`."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the records of metrics.jsonl up to `last_step` (and drops a torn
  last line); leaves the file alone when nothing is to go."""
  if not os.path.exists(path):
    return
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')
  keep = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= last_step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # torn by a kill mid-write, or not a record
  if len(keep) < len([line for line in lines if line.strip()]):
    _replace_atomically(path, lambda f: f.write(b''.join(line + b'\n' for line in keep)))


def truncate_events(path: str, last_step: int) -> None:
  """Keeps the events of one TensorBoard file up to `last_step` (a record
  torn by a kill ends the file); leaves it alone when nothing is to go."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  keep, dropped = [], False
  for raw in event_file_loader.RawEventFileLoader(path).Load():
    if event_pb2.Event.FromString(raw).step <= last_step:
      keep.append(raw)
    else:
      dropped = True
  if not dropped and _record_bytes(keep) == os.path.getsize(path):
    return
  from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top

  def write(f):
    writer = record_writer.RecordWriter(f)
    for raw in keep:
      writer.write(raw)
  _replace_atomically(path, write)


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

  def report(self, step: int) -> dict:
    seconds = max(time.perf_counter() - self._t0, 1e-9)
    steps = max(self._steps, 1)
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
           f"{m.get('images_per_s', 0):.1f} img/s", f"pad {m.get('padding_fraction', 0):.1%}"]
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
