"""Resize, patchify and unpatchify images.

`resize_image` is the one resize of the project: the pipeline resizes images
with it and FlexiViT's PI-resize of the patch embedding resamples its basis
with it, so that "resized the same way" holds exactly.

The method is PIL's bilinear filter with antialiasing: a triangle kernel on
half-pixel centres, widened by the scale factor when downscaling, with
weights renormalised at the borders (the same maths as tf.image.resize with
antialias=True and jax.image.resize 'bilinear'). PIL was chosen over
tf.image because it resizes a single image in microseconds rather than
paying an eager-op dispatch, and it releases the GIL, so a thread pool
scales. uint8 RGB images use PIL's fixed-point path (rounded to uint8); float
arrays are resized channel by channel in float32 with the same kernel, so the
float path is exactly linear (what PI-resize needs).
"""

import dataclasses

import numpy as np
from PIL import Image

_FILTER = Image.Resampling.BILINEAR


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes to `size` = (height, width) with antialiased bilinear filtering.

  Args:
    image: uint8 [H, W, 3], or float [H, W] / [H, W, C] (any C).
    size: output (height, width), both >= 1.

  Returns:
    The resized image, uint8 for uint8 input, float32 otherwise.
  """
  height, width = size
  if height < 1 or width < 1:
    raise ValueError(f'resize size must be positive, got {size}')
  if image.dtype == np.uint8:
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'uint8 images must be [H, W, 3], got {image.shape}')
    if image.shape[:2] == (height, width):
      return image
    resized = Image.fromarray(image).resize((width, height), _FILTER)
    return np.asarray(resized)
  channels = np.asarray(image, np.float32)
  squeeze = channels.ndim == 2
  if squeeze:
    channels = channels[..., None]
  out = np.stack([
      np.asarray(Image.fromarray(np.ascontiguousarray(channels[..., c]))
                 .resize((width, height), _FILTER))
      for c in range(channels.shape[-1])
  ], axis=-1)
  return out[..., 0] if squeeze else out


@dataclasses.dataclass(frozen=True)
class Patches:
  """An image as a sequence of patches, possibly with some dropped.

  Attributes:
    pixels: float32 [N, p*p*3] in [-1, 1], or uint8 in [0, 255]; each patch
      flattened (py, px, c).
    yx: int32 [N, 2], each patch's (row, column) in the image's patch grid;
      row-major order.
    grid: the full image's size in patches, (rows, cols).
  """
  pixels: np.ndarray
  yx: np.ndarray
  grid: tuple[int, int]

  def __len__(self) -> int:
    return self.pixels.shape[0]


def patchify(image: np.ndarray, patch_size: int, dtype: str = 'float32') -> Patches:
  """Cuts a uint8 [rows*p, cols*p, 3] image into row-major p x p patches,
  as float32 in [-1, 1] or, with dtype 'uint8', as the pixels themselves."""
  height, width, channels = image.shape
  p = patch_size
  if height % p or width % p or channels != 3:
    raise ValueError(f'image {image.shape} is not [k*{p}, m*{p}, 3]')
  rows, cols = height // p, width // p
  blocks = image.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4)
  yy, xx = np.divmod(np.arange(rows * cols, dtype=np.int32), cols)
  yx = np.stack([yy, xx], axis=1)
  if dtype == 'uint8':
    return Patches(blocks.reshape(rows * cols, p * p * 3).astype(np.uint8), yx,
                   (rows, cols))
  pixels = blocks.reshape(rows * cols, p * p * 3).astype(np.float32)
  # In place: this is the hot path. Dividing by 127.5 (exact in float32)
  # maps 0..255 onto exactly [-1, 1].
  pixels /= np.float32(127.5)
  pixels -= 1
  return Patches(pixels, yx, (rows, cols))


def unpatchify(patches: Patches, patch_size: int) -> np.ndarray:
  """Inverse of `patchify`: uint8 [rows*p, cols*p, 3]; missing patches are 0."""
  rows, cols = patches.grid
  p = patch_size
  blocks = np.zeros((rows, cols, p, p, 3), np.uint8)
  values = patches.pixels
  if values.dtype != np.uint8:
    values = np.rint((values + 1) * 127.5).clip(0, 255).astype(np.uint8)
  blocks[patches.yx[:, 0], patches.yx[:, 1]] = values.reshape(-1, p, p, 3)
  return blocks.transpose(0, 2, 1, 3, 4).reshape(rows * p, cols * p, 3)


def resize_and_patchify(image: np.ndarray, grid: tuple[int, int],
                        patch_size: int) -> Patches:
  """Resizes a uint8 image to `grid` patches of `patch_size` and patchifies it."""
  rows, cols = grid
  resized = resize_image(image, (rows * patch_size, cols * patch_size))
  return patchify(resized, patch_size)
