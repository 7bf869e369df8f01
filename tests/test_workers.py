"""Decoding in worker processes gives what decoding inline gives, in order."""

import os
import signal

import numpy as np
import pytest

from lit_navit.data import synthetic
from lit_navit.data import workers


def _blobs(count):
  source = synthetic.SyntheticSource(size=count, seed=3, min_side=16, max_side=80)
  blobs = [source[i].image for i in range(count)]
  return blobs[:3] + [b'not an image', blobs[3][:40]] + blobs[3:]


def test_processes_decode_like_inline_in_submission_order():
  blobs = _blobs(12)
  inline = workers.DecodePool(0).decode(blobs, 10**8)
  pool = workers.DecodePool(2)
  try:
    pooled = pool.decode(blobs, 10**8)
  finally:
    pool.close()
  assert len(pooled) == len(inline) == 14
  for (a, reason_a), (b, reason_b) in zip(inline, pooled):
    assert reason_a == reason_b
    if a is None:
      assert b is None
    else:
      np.testing.assert_array_equal(a, b)
  assert [reason for _, reason in pooled] == [None] * 3 + ['not_image', 'truncated'] + [None] * 9


def test_a_dead_worker_is_a_clear_error():
  pool = workers.DecodePool(1)
  try:
    pool.decode(_blobs(4), 10**8)  # Starts the worker.
    for pid in list(pool._pool._processes):  # pylint: disable=protected-access
      os.kill(pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match='decode worker process died'):
      pool.decode(_blobs(4), 10**8)
  finally:
    pool.close()


def test_negative_processes_are_refused():
  with pytest.raises(ValueError, match='>= 0'):
    workers.DecodePool(-1)
