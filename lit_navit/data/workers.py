"""Image preparation (decode, size, resize) in threads or worker processes.

`prepare_image` is the per-image work of the pipeline: decode the bytes,
sample the image's grid for each patch size, and resize it to that grid;
with local crops (`crops.py`), also cut each crop from the decoded image
and resize it to its own grid. What comes back is bounded by the token budget (grid * patch pixels, uint8),
not by the source image, so it crosses a process boundary cheaply.

The pipeline runs it on its threads (`input.workers`) or, when
`input.worker_processes` > 0, in a `ProcessPool`, which scales with a
host's cores where threads stop: PIL's decoders hold the GIL for part of
their work. Results come back in submission order, so batches do not
depend on the kind or number of workers.

Processes start by forkserver, not fork: a fork of a process that already
runs JAX's threads can deadlock. Each worker imports only PIL and numpy.
"""

import concurrent.futures
import dataclasses
import multiprocessing

import numpy as np

from lit_navit.data import crops as crops_lib
from lit_navit.data import decode
from lit_navit.data import patches as patches_lib
from lit_navit.data import resolution

_RESOLUTION_TAG = 0x7273


@dataclasses.dataclass(frozen=True)
class Sizing:
  """How `prepare_image` sizes images: the same for every image of a pipeline."""
  seed: int
  patch_sizes: tuple
  resolution: object  # the input.resolution ConfigDict
  max_tokens: int
  max_pixels: int
  crops: crops_lib.CropConfig | None = None  # Train mode with local crops.


@dataclasses.dataclass
class Prepared:
  """An image at its grid for each patch size: uint8 [rows*p, cols*p, 3]."""
  grids: dict    # patch size -> (rows, cols)
  resized: dict  # patch size -> uint8 image
  crops: tuple = ()  # Its local crops, each a Prepared (with no crops).
  orientation: int = 1  # The EXIF orientation decoding applied (boxes follow).


def prepare_image(data: bytes, index: int, epoch: int, sizing: Sizing):
  """(Prepared, None), or (None, the skip reason) for a bad image.

  The grid is keyed by (seed, index, epoch) and each crop's box by (seed,
  index, epoch, crop number), so a restored pipeline and any worker compute
  the same ones.
  """
  try:
    image, orientation = decode.decode_oriented(data, sizing.max_pixels)
  except decode.BadImage as e:
    return None, e.reason
  height, width = image.shape[:2]
  grids, resized = {}, {}
  for p in sizing.patch_sizes:
    rng = np.random.default_rng([sizing.seed, _RESOLUTION_TAG, index, epoch])
    grids[p] = resolution.sample_grid(rng, height, width, p, sizing.resolution,
                                      sizing.max_tokens)
    resized[p] = patches_lib.resize_image(image, (grids[p][0] * p, grids[p][1] * p))
  crops = ()
  if sizing.crops is not None:
    boxes = crops_lib.crop_boxes(sizing.crops, seed=sizing.seed, index=index,
                                 epoch=epoch, height=height, width=width)
    crops = tuple(_prepare_crop(image, box, sizing) for box in boxes)
  return Prepared(grids, resized, crops, orientation), None


def _prepare_crop(image: np.ndarray, box, sizing: Sizing) -> Prepared:
  """One crop cut from the decoded `image`, at its grid for each patch size."""
  pixels = crops_lib.cut(image, box)
  grid = crops_lib.crop_grid(box, sizing.crops.max_tokens)
  return Prepared(
      {p: grid for p in sizing.patch_sizes},
      {p: patches_lib.resize_image(pixels, (grid[0] * p, grid[1] * p))
       for p in sizing.patch_sizes})


def _call(job):
  fn, args = job
  return fn(*args)


class ProcessPool:
  """`processes` worker processes; `map(fn, jobs)` takes a module-level fn
  (picklable) and argument tuples, and returns results in order."""

  def __init__(self, processes: int):
    if processes < 1:
      raise ValueError(f'worker processes must be >= 1, got {processes}')
    self.processes = processes
    self._pool = concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context('forkserver'))

  def map(self, fn, jobs) -> list:
    """[fn(*args) for args in jobs], in order."""
    jobs = [(fn, tuple(args)) for args in jobs]
    # A few jobs a task: little pickling overhead per job, and every worker
    # still gets work.
    chunk = max(1, len(jobs) // (4 * self.processes))
    try:
      return list(self._pool.map(_call, jobs, chunksize=chunk))
    except concurrent.futures.process.BrokenProcessPool as e:
      raise RuntimeError(
          'a worker process died (killed, out of memory, or a decoder '
          'crash); the batch cannot be made') from e

  def close(self):
    self._pool.shutdown(cancel_futures=True)
