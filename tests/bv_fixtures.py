"""The big_vision reference fixtures (../shared/fixtures/big_vision) as packed batches."""

import os

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repo's sibling shared/ (a main checkout), else the workspace's (a worktree).
ROOT = os.environ.get('BIG_VISION_FIXTURES') or next(
    (p for p in (os.path.join(_REPO, '..', 'shared', 'fixtures', 'big_vision'),
                 '/work/shared/fixtures/big_vision') if os.path.isdir(p)),
    os.path.join(_REPO, '..', 'shared', 'fixtures', 'big_vision'))
NAMES = ('siglip_vit', 'siglip2_naflex')


def path(name: str, kind: str) -> str:
  """kind: 'params', 'inputs' or 'expected'."""
  return os.path.join(ROOT, name, f'{kind}.npz')


def load(name: str, kind: str) -> dict:
  with np.load(path(name, kind), allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def image_batch(name: str, patch_size: int = 16) -> dict:
  """The fixture's images, one a row, as the image keys of a packed batch."""
  inputs = load(name, 'inputs')
  if 'image' in inputs:  # ViT: NHWC images, cut row-major into (py, px, c) patches.
    images = inputs['image']
    n, h, w, _ = images.shape
    p = patch_size
    rows, cols = h // p, w // p
    patches = images.reshape(n, rows, p, cols, p, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, rows * cols, p * p * 3)
    yy, xx = np.divmod(np.arange(rows * cols, dtype=np.int32), cols)
    yx = np.broadcast_to(np.stack([yy, xx], -1), (n, rows * cols, 2))
    segment = np.ones((n, rows * cols), np.int32)
    grid = np.full((n, 1, 2), (rows, cols), np.int32)
  else:  # NaFlex: patches with (y, x); ptype 1 marks a patch, 0 padding.
    patches = inputs['patches']
    yx = np.stack([inputs['yabs'], inputs['xabs']], -1)
    segment = inputs['ptype']
    grid = inputs['grid_hw'][:, None, :]
  return {'image/patches': np.asarray(patches, np.float32),
          'image/yx': np.asarray(yx, np.int32),
          'image/segment': np.asarray(segment, np.int32),
          'image/grid': np.asarray(grid, np.int32)}


def pack_into_one_row(batch: dict) -> dict:
  """The images of a one-image-a-row batch packed side by side into one row."""
  keep = batch['image/segment'] > 0
  n = keep.shape[0]
  take = lambda key: np.concatenate([batch[key][i][keep[i]] for i in range(n)])[None]
  segment = np.concatenate([np.full(keep[i].sum(), i + 1, np.int32)
                            for i in range(n)])[None]
  return {'image/patches': take('image/patches'), 'image/yx': take('image/yx'),
          'image/segment': segment,
          'image/grid': batch['image/grid'][:, 0][None]}
