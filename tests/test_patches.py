"""Resize and patchify: exact round trip, layout, and the resize's properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lit_navit.data import decode
from lit_navit.data import patches as patches_lib
from lit_navit.data import synthetic


@st.composite
def patch_images(draw):
  p = draw(st.sampled_from([1, 2, 3, 4, 8]))
  rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
  image = draw(hnp.arrays(np.uint8, (rows * p, cols * p, 3)))
  return image, p


@settings(max_examples=200, deadline=None)
@given(patch_images())
def test_unpatchify_inverts_patchify_exactly(case):
  image, p = case
  patches = patches_lib.patchify(image, p)
  np.testing.assert_array_equal(patches_lib.unpatchify(patches, p), image)


@settings(max_examples=100, deadline=None)
@given(patch_images())
def test_patch_layout_is_row_major_py_px_c(case):
  image, p = case
  patches = patches_lib.patchify(image, p)
  rows, cols = image.shape[0] // p, image.shape[1] // p
  assert patches.grid == (rows, cols)
  assert patches.pixels.dtype == np.float32 and patches.yx.dtype == np.int32
  assert patches.pixels.shape == (rows * cols, p * p * 3)
  assert np.abs(patches.pixels).max() <= 1
  for k, (y, x) in enumerate(patches.yx):
    assert k == y * cols + x
    block = image[y * p:(y + 1) * p, x * p:(x + 1) * p]
    np.testing.assert_array_equal(
        patches.pixels[k].reshape(p, p, 3), block / np.float32(127.5) - 1)


def test_pixel_scale_hits_both_ends_exactly():
  image = np.array([[[0, 255, 128]]], np.uint8)
  pixels = patches_lib.patchify(image, 1).pixels
  assert pixels[0, 0] == -1 and pixels[0, 1] == 1


def test_patchify_rejects_sizes_that_are_not_whole_patches():
  with pytest.raises(ValueError, match='not'):
    patches_lib.patchify(np.zeros((10, 16, 3), np.uint8), 8)


@settings(max_examples=50, deadline=None)
@given(image=hnp.arrays(np.uint8, st.tuples(st.integers(1, 40),
                                             st.integers(1, 40),
                                             st.just(3))),
       size=st.tuples(st.integers(1, 40), st.integers(1, 40)))
def test_uint8_and_float_paths_are_the_same_filter(image, size):
  as_uint8 = patches_lib.resize_image(image, size).astype(np.float32)
  as_float = patches_lib.resize_image(image.astype(np.float32), size)
  assert as_uint8.shape == as_float.shape == size + (3,)
  # The uint8 path rounds fixed-point sums to integers.
  assert np.abs(as_uint8 - as_float).max() <= 1.0


@settings(max_examples=50, deadline=None)
@given(shape=st.tuples(st.integers(1, 24), st.integers(1, 24)),
       size=st.tuples(st.integers(1, 24), st.integers(1, 24)),
       a=st.floats(-3, 3), b=st.floats(-3, 3), seed=st.integers(0, 2**31))
def test_float_resize_is_linear(shape, size, a, b, seed):
  """PI-resize relies on resize(a x + b y) = a resize(x) + b resize(y)."""
  rng = np.random.default_rng(seed)
  x, y = rng.normal(size=(2,) + shape).astype(np.float32)
  left = patches_lib.resize_image(a * x + b * y, size)
  right = (a * patches_lib.resize_image(x, size)
           + b * patches_lib.resize_image(y, size))
  np.testing.assert_allclose(left, right, atol=1e-4)


def test_resize_identity_and_constants():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
  np.testing.assert_array_equal(patches_lib.resize_image(image, (12, 20)), image)
  grey = np.full((30, 50, 3), 77, np.uint8)
  np.testing.assert_array_equal(patches_lib.resize_image(grey, (7, 9)), 77)


def test_downscaling_is_antialiased():
  """A one-pixel checkerboard averages to grey; a sampling resize would alias."""
  checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
  image = np.repeat(checker[..., None], 3, axis=-1)
  small = patches_lib.resize_image(image, (8, 8)).astype(float)
  assert np.abs(small - 127.5).max() <= 2


def test_resize_and_patchify_a_decoded_jpeg():
  record = synthetic.SyntheticSource(4, seed=3)[1]
  image = decode.decode_image(record.image)
  patches = patches_lib.resize_and_patchify(image, (3, 5), 8)
  assert patches.grid == (3, 5) and len(patches) == 15
  # The patches are the resized image, cut up.
  resized = patches_lib.resize_image(image, (24, 40))
  np.testing.assert_array_equal(patches_lib.unpatchify(patches, 8), resized)


def test_unpatchify_leaves_missing_patches_black():
  image = np.full((4, 6, 3), 200, np.uint8)
  patches = patches_lib.patchify(image, 2)
  kept = patches_lib.Patches(patches.pixels[1:], patches.yx[1:], patches.grid)
  out = patches_lib.unpatchify(kept, 2)
  assert np.all(out[:2, :2] == 0) and np.all(out[2:] == 200)
