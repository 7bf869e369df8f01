"""Image preparation (decode + grid + resize) on threads against worker
processes, interleaved.

Prepares the same synthetic JPEGs (encoded before timing) as the training
pipeline does, in NaViT's setting (side ~ U(64, 256), patch 16, <= 256
tokens), with each arm in turn, round after round, and prints each arm's
median images/s and its ratio to one process. Arms: the calling thread,
a thread pool of N threads and a `workers.ProcessPool` of N processes, for
each N in --workers.

  python benchmarks/bench_workers.py                    # 1 and 2 workers
  python benchmarks/bench_workers.py --workers 1 4 8 16 # a bigger host
"""

import argparse
import concurrent.futures
import os
import time

import numpy as np

from lit_navit.data import pipeline as pipeline_lib
from lit_navit.data import synthetic
from lit_navit.data import workers


def jobs(count: int, min_side: int, max_side: int) -> list:
  source = synthetic.SyntheticSource(size=count, seed=0, min_side=min_side,
                                     max_side=max_side)
  resolution = pipeline_lib.default_config().resolution
  resolution.update(mode='side', dist='uniform', min=64, max=256)
  sizing = workers.Sizing(seed=0, patch_sizes=(16,), resolution=resolution,
                          max_tokens=256, max_pixels=10**8)
  return [(source[i].image, i, 0, sizing) for i in range(count)]


def thread_arm(threads: int):
  pool = concurrent.futures.ThreadPoolExecutor(threads)
  return (lambda js: list(pool.map(lambda job: workers.prepare_image(*job), js)),
          pool.shutdown)


def process_arm(processes: int):
  pool = workers.ProcessPool(processes)
  return (lambda js: pool.map(workers.prepare_image, js)), pool.close


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workers', type=int, nargs='+', default=[1, 2])
  parser.add_argument('--images', type=int, default=256)
  parser.add_argument('--min-side', type=int, default=256,
                      help='source JPEG sides (before resizing)')
  parser.add_argument('--max-side', type=int, default=640)
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args()

  work = jobs(args.images, args.min_side, args.max_side)
  arms = {'calling thread': (lambda js: [workers.prepare_image(*j) for j in js],
                             lambda: None)}
  for n in args.workers:
    arms[f'threads {n}'] = thread_arm(n)
    arms[f'processes {n}'] = process_arm(n)
  for run, _ in arms.values():
    run(work[:8])  # Start the workers before timing.
  seconds = {name: [] for name in arms}
  names = list(arms)
  for round_ in range(args.rounds):
    for name in names[round_ % len(names):] + names[:round_ % len(names)]:
      start = time.perf_counter()
      arms[name][0](work)
      seconds[name].append(time.perf_counter() - start)
  for _, close in arms.values():
    close()

  base = f'processes {args.workers[0]}'
  rate = {name: args.images / np.median(s) for name, s in seconds.items()}
  print(f'{args.images} JPEGs of side {args.min_side}-{args.max_side} px -> '
        f'side U(64, 256), p=16; {args.rounds} interleaved rounds; '
        f'{os.cpu_count()} cores')
  print(f'{"arm":<15} {"images/s":>9} {"min-max":>11} {"vs " + base:>15}')
  for name, s in seconds.items():
    print(f'{name:<15} {rate[name]:9.0f} {args.images / max(s):5.0f}-'
          f'{args.images / min(s):<5.0f} {rate[name] / rate[base]:15.2f}')


if __name__ == '__main__':
  main()
