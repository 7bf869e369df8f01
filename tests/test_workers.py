"""Image preparation in worker processes gives what threads give, in order;
a worker that dies is a clear error. (Batches equal across worker kinds:
tests/test_pipeline.py.)"""

import os
import signal

import numpy as np
import pytest

from lit_navit.data import pipeline as pipeline_lib
from lit_navit.data import synthetic
from lit_navit.data import workers


def _jobs(count):
  source = synthetic.SyntheticSource(size=count, seed=3, min_side=16, max_side=80)
  blobs = [source[i].image for i in range(count)]
  blobs = blobs[:3] + [b'not an image', blobs[3][:40]] + blobs[3:]
  resolution = pipeline_lib.default_config().resolution
  resolution.update(min=16, max=64)
  sizing = workers.Sizing(seed=0, patch_sizes=(8, 16), resolution=resolution,
                          max_tokens=64, max_pixels=10**8)
  return [(blob, index, 0, sizing) for index, blob in enumerate(blobs)]


def test_processes_prepare_like_the_calling_thread_in_order():
  jobs = _jobs(12)
  inline = [workers.prepare_image(*job) for job in jobs]
  pool = workers.ProcessPool(2)
  try:
    pooled = pool.map(workers.prepare_image, jobs)
  finally:
    pool.close()
  assert [reason for _, reason in pooled] == (
      [None] * 3 + ['not_image', 'truncated'] + [None] * 9)
  for (a, _), (b, _) in zip(inline, pooled):
    if a is None:
      assert b is None
      continue
    assert a.grids == b.grids
    for p, (rows, cols) in a.grids.items():
      assert b.resized[p].shape == (rows * p, cols * p, 3)
      assert b.resized[p].dtype == np.uint8 and rows * cols <= 64
      np.testing.assert_array_equal(a.resized[p], b.resized[p])


def test_a_dead_worker_is_a_clear_error():
  pool = workers.ProcessPool(1)
  try:
    pool.map(workers.prepare_image, _jobs(4))  # Starts the worker.
    for pid in list(pool._pool._processes):  # pylint: disable=protected-access
      os.kill(pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match='worker process died'):
      pool.map(workers.prepare_image, _jobs(4))
  finally:
    pool.close()


def test_no_processes_is_refused():
  with pytest.raises(ValueError, match='>= 1'):
    workers.ProcessPool(0)
