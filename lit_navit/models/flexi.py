"""FlexiViT PI-resize of a patch-embedding kernel (arXiv 2212.08013, Sec. 3.4).

A kernel stored at patch size p0 is resampled to the batch's patch size p so
that tokens keep their value when the images are resized: with B the matrix of
the resize from p0 x p0 to p x p (x_p = B x_p0), the resized kernel
w_p = pinv(B^T) w_p0 satisfies <x_p0, w_p0> = <B x_p0, w_p> exactly when
upsampling (p >= p0) and in the least-squares sense when downsampling.

B must be built with the resize the data pipeline applies to images, so it is
built by resizing basis images with `resize_fn(image[h, w], (h', w'))`,
by default the pipeline's own `lit_navit.data.patches.resize_image`.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lit_navit.data import patches

ResizeFn = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


@functools.lru_cache(maxsize=None)
def resize_matrix(old: int, new: int,
                  resize_fn: ResizeFn = patches.resize_image) -> np.ndarray:
  """B of shape [new*new, old*old]: row-major flattened resize of an old x old image."""
  basis = np.eye(old * old).reshape(old * old, old, old)
  columns = [np.asarray(resize_fn(image, (new, new)), np.float64).reshape(-1)
             for image in basis]
  matrix = np.stack(columns, axis=1)
  matrix.flags.writeable = False
  return matrix


@functools.lru_cache(maxsize=None)
def pi_resize_matrix(old: int, new: int,
                     resize_fn: ResizeFn = patches.resize_image) -> np.ndarray:
  """pinv(B^T) of shape [new*new, old*old], cached per (old, new, resize_fn)."""
  matrix = np.linalg.pinv(resize_matrix(old, new, resize_fn).T).astype(np.float32)
  matrix.flags.writeable = False
  return matrix


def pi_resize(kernel, new_size: int,
              resize_fn: ResizeFn = patches.resize_image):
  """PI-resizes a kernel [p0, p0, ...] to [new_size, new_size, ...]."""
  old_size = kernel.shape[0]
  if kernel.shape[1] != old_size:
    raise ValueError(f'kernel must be square in its two leading axes, got {kernel.shape}')
  if new_size == old_size:
    return kernel
  matrix = pi_resize_matrix(old_size, new_size, resize_fn)
  flat = kernel.reshape(old_size * old_size, -1)
  # Full precision: accelerators otherwise round float32 matmuls to bfloat16.
  resized = jnp.matmul(jnp.asarray(matrix, kernel.dtype), flat,
                       precision=jax.lax.Precision.HIGHEST)
  return resized.reshape(new_size, new_size, *kernel.shape[2:])
