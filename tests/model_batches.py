"""Builds packed batches for model tests, straight from the batch contract."""

import numpy as np

from lit_navit.data import batch as batch_lib


def random_image(rng: np.random.Generator, rows: int, cols: int,
                 patch_size: int) -> np.ndarray:
  """An image as its patch grid: float32 [rows, cols, p*p*3] in [-1, 1]."""
  return rng.uniform(-1, 1, (rows, cols, patch_size * patch_size * 3)).astype(np.float32)


def pack(rows_of_images, tokens_per_row: int, slots: int, captions=None,
         text_len: int = 1, pad_id: int = 0, groups: int = 1,
         captions_per_group: int | None = None) -> dict:
  """Packs images row by row, in the order given, into a validated batch.

  Args:
    rows_of_images: per row, a list of patch grids [rows, cols, p*p*3].
    tokens_per_row, slots: L and E.
    captions: per row, one token list per image (default: token 1 each).
    text_len, pad_id: T and the padding id of the captions.
    groups, captions_per_group: G and C (see `batch.py`).
  """
  patch_dim = next(im for row in rows_of_images for im in row).shape[-1]
  p = int(round((patch_dim / 3) ** 0.5))
  spec = batch_lib.BatchSpec(rows=len(rows_of_images), tokens_per_row=tokens_per_row,
                             slots=slots, text_len=text_len, patch_size=p,
                             groups=groups, captions_per_group=captions_per_group)
  batch = spec.empty(pad_id)
  used = [0] * groups
  for r, images in enumerate(rows_of_images):
    group, row_in_group = divmod(r, spec.rows_per_group)
    start = 0
    for k, image in enumerate(images):
      rows, cols = image.shape[:2]
      end = start + rows * cols
      batch['image/patches'][r, start:end] = image.reshape(rows * cols, -1)
      y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
      batch['image/yx'][r, start:end] = np.stack([y.ravel(), x.ravel()], -1)
      batch['image/segment'][r, start:end] = k + 1
      batch['image/grid'][r, k] = (rows, cols)
      caption = captions[r][k] if captions else [1]
      c = used[group]
      batch['text/tokens'][group, c, :len(caption)] = caption
      batch['text/slot'][group, c] = row_in_group * slots + k
      batch['text/valid'][group, c] = True
      used[group] += 1
      batch['valid'][r, k] = True
      batch['index'][r, k] = r * slots + k
      start = end
  batch_lib.validate_batch(batch, spec, pad_id)
  return batch


def image_inputs(batch: dict) -> tuple:
  """The NaViT call arguments (patches, yx, segment, grid) of a batch."""
  return (batch['image/patches'], batch['image/yx'], batch['image/segment'],
          batch['image/grid'])
