"""How much resizing uint8 pixels (ours) instead of floats (big_vision) moves embeddings.

big_vision's NaFlex pp runs value_range(-1, 1) and then tf.image.resize
(bilinear, antialias) on float pixels; our pipeline resizes the uint8 image
with PIL (same kernel, fixed-point, rounded to uint8) and then scales. This
script feeds both to the imported SigLIP 2 NaFlex fixture model and prints
the pixel and embedding differences per image and token budget.

  PYTHONPATH=. python benchmarks/bench_bv_resize.py

Images: matplotlib's sample photograph (Grace Hopper, 600x512) as is, and
cropped to a wide (300x512) and a tall (600x256) one. Needs tensorflow (big_vision's resize).
"""

import os
import sys

import matplotlib
import numpy as np
from PIL import Image
import tensorflow as tf

from lit_navit.interop import big_vision
from lit_navit.data import patches as patches_lib
from lit_navit.data import resolution
from lit_navit.models import two_towers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'tests'))
import bv_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

FIXTURE = bv_fixtures.path('siglip2_naflex', 'params')
PATCH = 16


def photos():
  path = os.path.join(matplotlib.get_data_path(), 'sample_data', 'grace_hopper.jpg')
  image = np.asarray(Image.open(path).convert('RGB'))
  h, w, _ = image.shape
  return {'hopper': image,
          'hopper_wide': image[h // 4: h // 4 + h // 2],
          'hopper_tall': image[:, w // 4: w - w // 4]}


def float_path(image, grid):
  """big_vision: value_range(-1, 1), then tf.image.resize on floats."""
  x = tf.constant(image, tf.float32) / 255.0 * 2.0 - 1.0
  size = (grid[0] * PATCH, grid[1] * PATCH)
  return tf.image.resize(x, size, method='bilinear', antialias=True).numpy()


def to_patches(image_float, grid):
  rows, cols = grid
  p = PATCH
  blocks = image_float.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4)
  return blocks.reshape(rows * cols, p * p * 3)


def batch_of(pixels, grid):
  rows, cols = grid
  n = rows * cols
  yy, xx = np.divmod(np.arange(n, dtype=np.int32), cols)
  return {'image/patches': pixels[None].astype(np.float32),
          'image/yx': np.stack([yy, xx], -1)[None],
          'image/segment': np.ones((1, n), np.int32),
          'image/grid': np.array([[[rows, cols]]], np.int32)}


def main():
  arrays = big_vision.load_npz(FIXTURE)
  config = big_vision.model_config(arrays)
  params = big_vision.to_params(arrays, config)
  model = two_towers.TwoTowers(config)
  embed = lambda batch: np.asarray(model.apply({'params': params}, batch,
                                               method=model.embed_images))[0]
  print('image            budget grid   |d pixel| max / mean (uint8 steps)   '
        '|d zimg| max   cos(zimg)   float-vs-float |d pixel| max')
  for name, image in photos().items():
    for budget in (64, 256):
      grid = resolution.grid_for_budget(image.shape[0], image.shape[1], budget)
      theirs = to_patches(float_path(image, grid), grid)
      ours = patches_lib.resize_and_patchify(image, grid, PATCH).pixels
      ours_float = to_patches(patches_lib.resize_image(
          image.astype(np.float32) / 255.0 * 2.0 - 1.0,
          (grid[0] * PATCH, grid[1] * PATCH)), grid)
      steps = np.abs(ours - theirs) * 127.5
      z_theirs, z_ours = embed(batch_of(theirs, grid)), embed(batch_of(ours, grid))
      print(f'{name:16s} {budget:6d} {grid[0]:2d}x{grid[1]:<2d}  '
            f'{steps.max():8.2f} / {steps.mean():.3f}                  '
            f'{np.abs(z_ours - z_theirs).max():.2e}     '
            f'{float(z_ours @ z_theirs):.7f}   '
            f'{np.abs(ours_float - theirs).max():.1e}')


if __name__ == '__main__':
  main()
