"""JPEG decode throughput: worker processes against threads, interleaved.

Decodes the same synthetic JPEGs (encoded before timing) with each arm in
turn, round after round, and prints the median images/s of each arm and
its ratio to one process. Arms: inline (no pool), a thread pool of N
threads, and `workers.DecodePool(N)` processes, for each N in --workers.

  python benchmarks/bench_decode.py                    # 1 and 2 workers
  python benchmarks/bench_decode.py --workers 1 4 8 16 # a bigger host
"""

import argparse
import concurrent.futures
import itertools
import os
import time

import numpy as np

from lit_navit.data import synthetic
from lit_navit.data import workers

MAX_PIXELS = 10**8


def encoded_images(count: int, min_side: int, max_side: int) -> list:
  source = synthetic.SyntheticSource(size=count, seed=0, min_side=min_side,
                                     max_side=max_side)
  return [source[i].image for i in range(count)]


def thread_arm(threads: int):
  pool = concurrent.futures.ThreadPoolExecutor(threads)

  def run(blobs):
    return list(pool.map(workers.decode_or_reason, blobs,
                         itertools.repeat(MAX_PIXELS)))
  return run, pool.shutdown


def process_arm(processes: int):
  pool = workers.DecodePool(processes)
  return (lambda blobs: pool.decode(blobs, MAX_PIXELS)), pool.close


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workers', type=int, nargs='+', default=[1, 2])
  parser.add_argument('--images', type=int, default=256)
  parser.add_argument('--min-side', type=int, default=256)
  parser.add_argument('--max-side', type=int, default=640)
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args()

  blobs = encoded_images(args.images, args.min_side, args.max_side)
  arms = {'inline': (lambda b: [workers.decode_or_reason(x, MAX_PIXELS) for x in b],
                     lambda: None)}
  for n in args.workers:
    arms[f'threads {n}'] = thread_arm(n)
    arms[f'processes {n}'] = process_arm(n)
  for run, _ in arms.values():
    run(blobs[:8])  # Start the workers before timing.
  seconds = {name: [] for name in arms}
  for round_ in range(args.rounds):
    names = list(arms)
    names = names[round_ % len(names):] + names[:round_ % len(names)]
    for name in names:
      start = time.perf_counter()
      arms[name][0](blobs)
      seconds[name].append(time.perf_counter() - start)
  for _, close in arms.values():
    close()

  base = f'processes {args.workers[0]}'
  rate = {name: args.images / np.median(s) for name, s in seconds.items()}
  print(f'{args.images} JPEGs, side {args.min_side}-{args.max_side} px, '
        f'{args.rounds} interleaved rounds, {os.cpu_count()} cores')
  print(f'{"arm":<14} {"images/s":>9} {"spread":>12} {"vs " + base:>16}')
  for name, s in seconds.items():
    low, high = args.images / max(s), args.images / min(s)
    print(f'{name:<14} {rate[name]:9.0f} {low:5.0f}-{high:<6.0f} '
          f'{rate[name] / rate[base]:16.2f}')


if __name__ == '__main__':
  main()
