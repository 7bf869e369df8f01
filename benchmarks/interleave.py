"""Interleaved timing of train steps in persistent worker processes.

On a shared machine, arms timed in separate runs meet different loads, so
their ratio measures the load as much as the code. Here each arm (one
framework on one workload, or a matmul ceiling) lives in its own process,
set up, compiled and warmed up once; then, round after round, the parent
asks one worker at a time for k timed steps while the others wait idle.
Ratios are taken within a round, so every ratio compares arms that met
nearly the same load, and the spread over rounds says how far to trust it.

The order within rounds follows a Williams design: over a full cycle each
arm runs right after each other arm equally often, which matters because a
worker's first step after idling re-faults its memory.

Worker side: a script calls `serve(setup)`; the protocol is one JSON line
each way on the worker's stdin/stdout, and anything libraries print goes to
stderr.
"""

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def williams_orders(count: int) -> list:
  """Orders of range(count) in which each arm follows each other equally often.

  A Williams (balanced Latin square) design: `count` rows for even counts,
  2 * count for odd ones (each row and its reverse).
  """
  first, low, high = [0], 1, count - 1
  while len(first) < count:
    first.append(low)
    low += 1
    if len(first) < count:
      first.append(high)
      high -= 1
  rows = [[(a + shift) % count for a in first] for shift in range(count)]
  if count % 2:
    rows += [row[::-1] for row in rows]
  return rows


def usage() -> np.ndarray:
  """[wall seconds, CPU seconds (user + system), minor page faults] so far."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return np.array([time.perf_counter(), r.ru_utime + r.ru_stime, r.ru_minflt])


# --- worker side -----------------------------------------------------------

def serve(setup) -> None:
  """Runs a worker: `setup()` -> (step, info), then timed steps on request.

  `step()` runs one complete step and blocks until its results are ready;
  `info` (a JSON-able dict: FLOPs per step, parameters, compile time) is
  sent once with the ready message. Requests are {"steps": k} or
  {"stop": true}; each answer lists k [wall, CPU seconds, page faults].
  """
  protocol = os.fdopen(os.dup(sys.stdout.fileno()), 'w', buffering=1)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # Libraries print to stderr.
  try:
    step, info = setup()
  except Exception as error:  # Sent to the parent, which names the arm.
    protocol.write(json.dumps({'error': f'{type(error).__name__}: {error}'}) + '\n')
    raise
  protocol.write(json.dumps({'ready': info}) + '\n')
  for line in sys.stdin:
    request = json.loads(line)
    if request.get('stop'):
      break
    samples = []
    for _ in range(request['steps']):
      before = usage()
      step()
      samples.append((usage() - before).tolist())
    protocol.write(json.dumps({'samples': samples}) + '\n')


# --- parent side -----------------------------------------------------------

class Worker:
  """One arm's persistent process, started now; ready once set up and warm."""

  def __init__(self, name: str, argv: list, env: dict | None = None):
    self.name = name
    self.process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})})
    self.info = self._answer()['ready']

  def _answer(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f'worker {self.name!r} exited (code {self.process.wait()}) '
                         'without answering; its stderr is above')
    answer = json.loads(line)
    if 'error' in answer:
      raise RuntimeError(f"worker {self.name!r} failed: {answer['error']}")
    return answer

  def run(self, steps: int) -> np.ndarray:
    """Times `steps` steps back to back: [steps, 3] of usage() differences."""
    self.process.stdin.write(json.dumps({'steps': steps}) + '\n')
    self.process.stdin.flush()
    return np.array(self._answer()['samples'])

  def close(self) -> None:
    if self.process.poll() is None:
      self.process.stdin.write(json.dumps({'stop': True}) + '\n')
      self.process.stdin.close()
      self.process.wait(timeout=120)


def run_rounds(workers: list, rounds: int, steps: dict) -> list:
  """`rounds` rounds, each worker once per round in Williams order.

  `steps` maps a worker name to its timed steps per round. Returns one dict
  per round: {'order': [names], name: [steps, 3] samples}.
  """
  orders = williams_orders(len(workers))
  results = []
  for r in range(rounds):
    order = [workers[i] for i in orders[r % len(orders)]]
    result = {'order': [w.name for w in order]}
    for worker in order:
      result[worker.name] = worker.run(steps[worker.name])
      time.sleep(0.5)  # Lets the last arm's freed memory go back to the OS.
    print(f"  round {r + 1}/{rounds}: " + ', '.join(
        f"{w.name} {np.median(result[w.name][:, 0]):.2f} s" for w in order),
          file=sys.stderr, flush=True)
    results.append(result)
  return results


def spread(values) -> dict:
  """Median, min, max and interquartile range of `values`."""
  values = np.asarray(values, float)
  q1, median, q3 = np.percentile(values, [25, 50, 75])
  return {'median': float(median), 'min': float(values.min()),
          'max': float(values.max()), 'q1': float(q1), 'q3': float(q3),
          'n': int(values.size)}


def round_seconds(rounds: list, name: str) -> np.ndarray:
  """Each round's median step seconds of arm `name`."""
  return np.array([np.median(r[name][:, 0]) for r in rounds])


def ratio_spread(rounds: list, numerator: str, denominator: str) -> dict:
  """Spread over rounds of the within-round ratio of two arms' step seconds."""
  return spread(round_seconds(rounds, numerator) / round_seconds(rounds, denominator))
