"""Position embeddings: resize semantics, clamping, fractional buckets, finiteness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_navit.models import posemb

WIDTH = 8
G = 4


def _init_apply(kind, yx, grid, max_grid=G):
  module = posemb.make(kind, WIDTH, max_grid)
  params = module.init(jax.random.key(0), yx, grid)
  return params, np.asarray(module.apply(params, yx, grid))


def _all_tokens(rows, cols):
  """yx and per-token grid of every patch of one rows x cols image: [N, 2] each."""
  y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  yx = np.stack([y.ravel(), x.ravel()], -1).astype(np.int32)
  return yx, np.broadcast_to(np.int32([rows, cols]), yx.shape)


@pytest.mark.parametrize('in_size,out_size,antialias', [
    (4, 2, False), (4, 7, False), (1, 5, False), (5, 3, True), (3, 8, True),
    (6, 1, True)])
def test_resize_weights_match_jax_image_resize(in_size, out_size, antialias):
  signal = np.random.default_rng(in_size * 100 + out_size).normal(size=in_size)
  weights = posemb.resize_weights(jnp.arange(out_size), jnp.full(out_size, out_size),
                                  in_size, antialias)
  expected = jax.image.resize(jnp.float32(signal), (out_size,), 'bilinear',
                              antialias=antialias)
  np.testing.assert_allclose(weights @ signal, expected, atol=1e-5)


@pytest.mark.parametrize('rows,cols', [(2, 3), (4, 4), (7, 5), (1, 9)])
def test_learn_2d_resized_is_the_table_resized_per_image(rows, cols):
  yx, grid = _all_tokens(rows, cols)
  params, out = _init_apply('learn_2d_resized', yx, grid)
  table = params['params']['pos_embedding']
  expected = jax.image.resize(table, (rows, cols, WIDTH), 'bilinear', antialias=True)
  np.testing.assert_allclose(out.reshape(rows, cols, WIDTH), expected, atol=1e-5)


@pytest.mark.parametrize('kind', posemb.KINDS)
def test_every_kind_is_finite_far_beyond_the_table(kind):
  yx, grid = _all_tokens(3 * G, 3 * G + 1)
  _, out = _init_apply(kind, yx, grid)
  assert out.shape == (len(yx), WIDTH) and np.all(np.isfinite(out))
  # Off-contract inputs (yx outside the grid, padding's zero grid) stay finite too.
  _, odd = _init_apply(kind, np.int32([[9, 9], [0, 0]]), np.int32([[2, 2], [0, 0]]))
  assert np.all(np.isfinite(odd))


def test_learn_factorized_clamps_to_the_last_entry():
  yx, grid = _all_tokens(G + 3, 2)
  _, out = _init_apply('learn_factorized', yx, grid)
  out = out.reshape(G + 3, 2, WIDTH)
  for row in range(G, G + 3):
    np.testing.assert_array_equal(out[row], out[G - 1])
  assert not np.allclose(out[G - 2], out[G - 1])


def test_fractional_buckets_follow_relative_position():
  yx = np.int32([[1, 0], [2, 0], [1, 0]])
  grid = np.int32([[2, 3], [4, 3], [4, 3]])
  _, out = _init_apply('fractional_factorized', yx, grid)
  np.testing.assert_array_equal(out[0], out[1])  # Half-way down, either size.
  assert not np.allclose(out[0], out[2])


def test_sincos_has_no_params_and_separates_positions():
  yx, grid = _all_tokens(3, 3)
  params, out = _init_apply('sincos_factorized', yx, grid)
  assert not jax.tree.leaves(params)
  assert len({tuple(np.round(v, 5)) for v in out}) == 9
  np.testing.assert_allclose(out[0], [0, 0, 1, 1] * 2)  # sin 0, cos 0 per half.
  with pytest.raises(ValueError, match='divisible by 4'):
    posemb.make('sincos_factorized', 6, G).init(jax.random.key(0), yx, grid)


def test_unknown_kind_raises():
  with pytest.raises(ValueError, match='unknown posemb'):
    posemb.make('rope', WIDTH, G)
