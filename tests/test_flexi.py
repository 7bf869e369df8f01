"""FlexiViT PI-resize: tokens keep their value when patches are resized the pipeline's way."""

import hypothesis
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

from lit_navit.data import patches
from lit_navit.models import flexi
from lit_navit.models import navit


def _resize_channels(image, size, resize_fn=patches.resize_image):
  return np.stack([resize_fn(image[..., c], size) for c in range(image.shape[-1])], -1)


def nearest_resize(image, size):
  """A different resize, to show the matrix follows the function it is given."""
  rows = (np.arange(size[0]) + 0.5) * image.shape[0] // size[0]
  cols = (np.arange(size[1]) + 0.5) * image.shape[1] // size[1]
  return image[rows.astype(int)][:, cols.astype(int)]


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(old=st.integers(2, 6), extra=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_upsampling_keeps_inner_products(old, extra, seed):
  new = old + extra
  rng = np.random.default_rng(seed)
  kernel = rng.normal(size=(old, old, 3, 5)).astype(np.float32)
  x = rng.uniform(-1, 1, (old, old, 3)).astype(np.float32)
  resized_kernel = np.asarray(flexi.pi_resize(kernel, new))
  np.testing.assert_allclose(
      np.einsum('yxc,yxcd->d', _resize_channels(x, (new, new)), resized_kernel),
      np.einsum('yxc,yxcd->d', x, kernel), atol=1e-4, rtol=1e-4)


def test_resize_matrix_is_the_resize():
  x = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
  for resize_fn in (patches.resize_image, nearest_resize):
    matrix = flexi.resize_matrix(3, 7, resize_fn)
    np.testing.assert_allclose(matrix @ x.ravel(), resize_fn(x, (7, 7)).ravel(), atol=1e-5)


def test_the_matrix_follows_the_given_resize():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
  x = rng.uniform(-1, 1, (2, 2, 3)).astype(np.float32)
  resized = np.asarray(flexi.pi_resize(kernel, 6, nearest_resize))
  np.testing.assert_allclose(
      np.einsum('yxc,yxcd->d', _resize_channels(x, (6, 6), nearest_resize), resized),
      np.einsum('yxc,yxcd->d', x, kernel), atol=1e-5)
  assert not np.allclose(resized, flexi.pi_resize(kernel, 6), atol=1e-3)


def test_downsampling_is_least_squares():
  w = np.random.default_rng(2).normal(size=(8 * 8,))
  b = flexi.resize_matrix(8, 5)
  w_hat = flexi.pi_resize_matrix(8, 5) @ w
  # Residual of B^T w_hat = w is orthogonal to the range of B^T.
  np.testing.assert_allclose(b @ (w - b.T @ w_hat), 0, atol=1e-4)


def test_same_size_is_identity_and_matrices_are_cached():
  kernel = np.ones((4, 4, 3, 2), np.float32)
  assert flexi.pi_resize(kernel, 4) is kernel
  assert flexi.pi_resize_matrix(4, 8) is flexi.pi_resize_matrix(4, 8)
  with pytest.raises(ValueError):
    flexi.pi_resize_matrix(4, 8)[0, 0] = 1.0


def test_patch_embedding_serves_every_patch_size():
  rng = np.random.default_rng(3)
  images = rng.uniform(-1, 1, (5, 4, 4, 3)).astype(np.float32)
  upsampled = np.stack([_resize_channels(im, (8, 8)) for im in images])
  module = navit.PatchEmbedding(width=6, base_patch_size=4)
  params = module.init(jax.random.key(0), images.reshape(1, 5, -1))
  assert params['params']['kernel'].shape == (4, 4, 3, 6)
  np.testing.assert_allclose(module.apply(params, upsampled.reshape(1, 5, -1)),
                             module.apply(params, images.reshape(1, 5, -1)),
                             atol=1e-4, rtol=1e-4)
