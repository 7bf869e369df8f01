"""Image decoding in worker processes, so it scales with a host's cores.

A thread pool cannot keep a 100-core host busy: PIL's JPEG decoder holds
the GIL for part of its work. `DecodePool` runs `decode.decode_image` in
separate processes instead. Results come back in submission order, so
batches do not depend on the number of workers.

Workers start by forkserver, not fork: a fork of a process that already
runs JAX's threads can deadlock. Each worker imports only PIL and numpy.
"""

import concurrent.futures
import itertools
import multiprocessing

from lit_navit.data import decode


def decode_or_reason(data: bytes, max_pixels: int):
  """(uint8 RGB image, None), or (None, the skip reason) for a bad image."""
  try:
    return decode.decode_image(data, max_pixels), None
  except decode.BadImage as e:
    return None, e.reason


class DecodePool:
  """`processes` decode workers; 0 decodes in the calling process."""

  def __init__(self, processes: int):
    if processes < 0:
      raise ValueError(f'decode processes must be >= 0, got {processes}')
    self.processes = processes
    self._pool = None
    if processes:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          processes, mp_context=multiprocessing.get_context('forkserver'))

  def decode(self, blobs: list, max_pixels: int) -> list:
    """[decode_or_reason(blob)] for each encoded image, in order."""
    if self._pool is None:
      return [decode_or_reason(blob, max_pixels) for blob in blobs]
    # A few images a task: the pickling overhead per task stays small while
    # every worker still gets work.
    chunk = max(1, len(blobs) // (4 * self.processes))
    try:
      return list(self._pool.map(decode_or_reason, blobs,
                                 itertools.repeat(max_pixels), chunksize=chunk))
    except concurrent.futures.process.BrokenProcessPool as e:
      raise RuntimeError(
          'a decode worker process died (killed, out of memory, or a decoder '
          'crash); the batch cannot be made') from e

  def close(self):
    if self._pool is not None:
      self._pool.shutdown(cancel_futures=True)
      self._pool = None

