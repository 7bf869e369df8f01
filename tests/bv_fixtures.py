"""The big_vision reference fixtures (../shared/fixtures/big_vision) as packed batches."""

import os

import numpy as np

from lit_navit.interop import big_vision

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
  if 'image' in inputs:
    return big_vision.image_batch(inputs['image'], patch_size)
  batch = big_vision.image_batch(tuple(inputs[k] for k in ('patches', 'ptype',
                                                           'yabs', 'xabs')))
  # NaFlex's grid from coordinates is the grid the pp made.
  np.testing.assert_array_equal(batch['image/grid'][:, 0], inputs['grid_hw'])
  return batch


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


def prefixed_copy(name: str, prefix: str, directory) -> str:
  """The fixture's params as a released file names them ('params/img/...') or
  a training checkpoint does ('opt/target/img/...', beside optimizer state)."""
  with np.load(path(name, 'params'), allow_pickle=False) as npz:
    arrays = {prefix + k: npz[k] for k in npz.files}
  arrays['opt/state/count' if prefix == 'opt/target/' else 'step'] = np.array(7)
  out = os.path.join(str(directory), f'{name}_{prefix.replace("/", "_")}.npz')
  np.savez(out, **arrays)
  return out
