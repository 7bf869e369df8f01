"""Time to the first training batch, and peak memory, against data set size.

Writes TFRecord data sets of tiny records (16 distinct small JPEGs, reused)
once into a cache folder, then, for each size, starts a fresh process that
builds the training input the way the trainer does and takes one batch. The
child's peak RSS comes from os.wait4 (ru_maxrss of that child alone).

  python benchmarks/bench_startup.py --sizes 1e5,1e6
  python benchmarks/bench_startup.py --sizes 1e5,1e6 --gcs     # emulator
  python benchmarks/bench_startup.py --sizes 1e5 --reader indexed
      # the random-access TFRecordSource, which indexes every record first

`streaming` should stay flat across sizes: it lists the files and reads
`cycle_length` of them up to a full shuffle buffer, whatever the size.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_CACHE = os.path.join(tempfile.gettempdir(), 'lit_navit_bench_startup')
_DISTINCT = 16


def shard_count(size: int) -> int:
  return min(1000, max(100, size // 10_000))


def framed_records() -> list:
  """_DISTINCT TFRecord-framed tf.train.Examples, written by TensorFlow."""
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  path = os.path.join(tempfile.mkdtemp(), 'one.tfrecord')
  framed = []
  for i in range(_DISTINCT):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), np.uint8)).save(
        buffer, format='JPEG', quality=80)
    example = tf.train.Example(features=tf.train.Features(feature={
        'jpg': tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[buffer.getvalue()])),
        'txt': tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[f'a small picture number {i}'.encode()])),
    }))
    with tf.io.TFRecordWriter(path) as writer:
      writer.write(example.SerializeToString())
    with open(path, 'rb') as f:
      framed.append(f.read())
  return framed


def write_dataset(size: int) -> str:
  """The folder of `size` records in `shard_count(size)` shards (cached)."""
  folder = os.path.join(_CACHE, f'{size}')
  done = os.path.join(folder, 'DONE')
  if os.path.exists(done):
    return folder
  os.makedirs(folder, exist_ok=True)
  framed = framed_records()
  shards = shard_count(size)
  start = time.perf_counter()
  for s in range(shards):
    first, stop = s * size // shards, (s + 1) * size // shards
    with open(os.path.join(folder, f'train-{s:05d}.tfrecord'), 'wb') as f:
      f.write(b''.join(framed[i % _DISTINCT] for i in range(first, stop)))
  with open(done, 'w') as f:
    f.write(f'{time.perf_counter() - start:.1f} s\n')
  return folder


def upload(folder: str, bucket: str) -> str:
  import fsspec  # pylint: disable=g-import-not-at-top
  gcs = fsspec.filesystem('gs')
  target = f'{bucket[5:]}/{os.path.basename(folder)}'
  names = sorted(n for n in os.listdir(folder) if n.endswith('.tfrecord'))
  gcs.put([os.path.join(folder, n) for n in names],
          [f'{target}/{n}' for n in names])
  return f'{bucket}/{os.path.basename(folder)}'


def child(path: str, reader_kind: str) -> None:
  """Runs in the fresh process: build the input, take one batch, report."""
  started = time.perf_counter()
  from lit_navit.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from lit_navit.data import readers  # pylint: disable=g-import-not-at-top
  from lit_navit.data import sources  # pylint: disable=g-import-not-at-top
  from lit_navit.data import text  # pylint: disable=g-import-not-at-top
  # TensorFlow's protobufs take seconds to import, whatever the data size.
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top,unused-import
  config = pipeline_lib.default_config()
  config.source.kind = 'tfrecord'
  config.source.path = f'{path}/train-*.tfrecord'
  config.update(tokens_per_row=256, images_per_row=8, patch_sizes=(8,),
                pack_buffer=64, workers=2)
  config.resolution.update(min=16, max=32)
  tokenizer = text.Tokenizer(config.tokenizer, config.text_len)
  imported = time.perf_counter()
  if reader_kind == 'streaming':
    source = readers.make_reader(config.source)
  else:
    source = sources.make_source(config.source)
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=8, seed=0) as pipe:
    batch = next(pipe)
  done = time.perf_counter()
  print(json.dumps({'import_s': imported - started,
                    'first_batch_s': done - imported,
                    'images': int(batch['valid'].sum())}))


def run_child(path: str, reader_kind: str, env: dict) -> dict:
  process = subprocess.Popen(
      [sys.executable, __file__, '--child', path, '--reader', reader_kind],
      stdout=subprocess.PIPE, env=env)
  out = process.stdout.read()
  _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  if process.returncode:
    raise RuntimeError(f'the child for {path} failed ({process.returncode})')
  result = json.loads(out.decode().strip().splitlines()[-1])
  result['peak_rss_mb'] = usage.ru_maxrss / 1024  # Linux: kilobytes.
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='1e5,1e6',
                      help='records per data set, comma-separated')
  parser.add_argument('--gcs', action='store_true',
                      help='read from the GCS-API emulator, not local disk')
  parser.add_argument('--reader', default='streaming',
                      choices=('streaming', 'indexed'))
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child, args.reader)
    return
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3',
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  emulator = None
  if args.gcs:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
    from gcs_emulator import GcsEmulator  # pylint: disable=g-import-not-at-top
    emulator = GcsEmulator()
    env.update(emulator.environ)
    bucket = emulator.bucket()
  rows = []
  try:
    for size in (int(float(s)) for s in args.sizes.split(',')):
      start = time.perf_counter()
      path = write_dataset(size)
      written = time.perf_counter() - start
      if emulator:
        start = time.perf_counter()
        path = upload(path, bucket)
        written += time.perf_counter() - start
      result = run_child(path, args.reader, env)
      rows.append((size, shard_count(size), written, result))
      print(f'{size:>10,} records {shard_count(size):>5} shards: first batch '
            f'{result["first_batch_s"]:6.2f} s, peak RSS '
            f'{result["peak_rss_mb"]:7.0f} MB (import {result["import_s"]:.1f} '
            f's; data ready in {written:.0f} s)', flush=True)
  finally:
    if emulator:
      emulator.close()
  where = 'GCS emulator' if args.gcs else 'local disk'
  print(f'\n| records | shards | first batch (s) | peak RSS (MB) |  '
        f'[{args.reader}, {where}]')
  print('| ---: | ---: | ---: | ---: |')
  for size, shards, _, result in rows:
    print(f'| {size:,} | {shards} | {result["first_batch_s"]:.2f} | '
          f'{result["peak_rss_mb"]:.0f} |')


if __name__ == '__main__':
  main()
