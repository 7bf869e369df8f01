"""Prepares the next batches on a background thread while the model trains.

The iterator state that goes into a checkpoint must describe what was
consumed, not what was prepared: each prefetched batch travels with the
pipeline state taken right after producing it, and `get_state` returns the
state that came with the last batch handed out.
"""

import queue
import threading


class Prefetch:
  """Wraps an iterator with get_state/set_state; yields the same batches."""

  def __init__(self, pipeline, depth: int = 2):
    self._pipeline = pipeline
    self._depth = depth
    self._state = pipeline.get_state()
    self._thread = None
    self._start()

  @property
  def skipped(self):
    return self._pipeline.skipped

  def _start(self):
    self._queue = queue.Queue(maxsize=self._depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, daemon=True)
    self._thread.start()

  def _produce(self):
    try:
      while not self._stop.is_set():
        batch = next(self._pipeline)
        self._put((batch, self._pipeline.get_state(), None))
    except BaseException as e:  # pylint: disable=broad-except
      # Handed to the consumer, who raises it (StopIteration included).
      self._put((None, None, e))

  def _put(self, item):
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def __iter__(self):
    return self

  def __next__(self):
    batch, state, error = self._queue.get()
    if error is not None:
      self._queue.put((None, None, error))  # Stay exhausted or failed.
      raise error
    self._state = state
    return batch

  def get_state(self):
    return self._state

  def set_state(self, state):
    """Drops what was prefetched and restarts from `state`."""
    self.close()
    self._pipeline.set_state(state)
    self._state = self._pipeline.get_state()
    self._start()

  def close(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
