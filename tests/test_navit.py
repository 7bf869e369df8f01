"""NaViT image tower: packing invariance, segment isolation, empty slots, large grids."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

from lit_navit.models import navit
from model_batches import image_inputs, pack, random_image

P = 4          # Patch size of the test batches (and the stored kernel).
MAX_GRID = 3   # Small on purpose: some test images overrun the position tables.
TOL = dict(atol=1e-5, rtol=1e-5)


@functools.lru_cache(maxsize=None)
def tower(posemb_kind='learn_factorized', pool='map'):
  """(params, jitted apply) of a tiny tower; jit reuses compiles per shape."""
  model = navit.NaViT(width=32, depth=2, mlp_dim=64, num_heads=2,
                      base_patch_size=P, posemb=posemb_kind, max_grid=MAX_GRID,
                      pool=pool, out_dim=16)
  sample = pack([[random_image(np.random.default_rng(0), 1, 1, P)]], 1, 1)
  params = jax.jit(model.init)(jax.random.key(0), *image_inputs(sample))
  return params, jax.jit(model.apply)


def embed(batch, **tower_kwargs):
  params, apply = tower(**tower_kwargs)
  return np.asarray(apply(params, *image_inputs(batch)))


# Every test packs into one of these two shapes, so each tower compiles twice.
WIDE = dict(tokens_per_row=24, slots=3)    # 4 rows.
NARROW = dict(tokens_per_row=42, slots=2)  # 2 rows; 42 = a 6 x 7 image.
# Each posemb once, each pool at least once.
CONFIGS = [('learn_factorized', 'map'), ('fractional_factorized', 'mean'),
           ('sincos_factorized', 'map'), ('learn_2d_resized', 'map')]


def _images(rng):
  # d (4 x 3) overruns the MAX_GRID = 3 tables.
  return (random_image(rng, 3, 2, P), random_image(rng, 2, 4, P),
          random_image(rng, 1, 1, P), random_image(rng, 4, 3, P))


def test_output_shape_and_dtype():
  a, b, _, _ = _images(np.random.default_rng(0))
  params, apply = tower()
  out = apply(params, *image_inputs(pack([[a], [b], [a], [a]], **WIDE)))
  assert out.shape == (4, 3, 16) and out.dtype == np.float32
  out = np.asarray(out)
  # Each row's image lands in its own row's first slot: the rows holding a
  # agree, the row holding b differs (rows shifted by any amount would not) ...
  np.testing.assert_allclose(out[2, 0], out[0, 0], **TOL)
  np.testing.assert_allclose(out[3, 0], out[0, 0], **TOL)
  assert np.all(np.isfinite(out[:, 0])) and not np.allclose(out[0, 0], out[1, 0], atol=1e-3)
  # ... and the empty slots are zero.
  assert not out[:, 1:].any()


@pytest.mark.parametrize('posemb_kind,pool', CONFIGS)
def test_packing_invariance(posemb_kind, pool):
  a, b, c, d = _images(np.random.default_rng(1))
  kwargs = dict(posemb_kind=posemb_kind, pool=pool)
  wide = embed(pack([[a], [b, a], [c, a, d], [d, c, b]], **WIDE), **kwargs)
  narrow = embed(pack([[a, c], [b]], **NARROW), **kwargs)
  same = {  # Each image: its embedding wherever it sits, in either batch shape.
      'a': [wide[0, 0], wide[1, 1], wide[2, 1], narrow[0, 0]],
      'b': [wide[1, 0], wide[3, 2], narrow[1, 0]],
      'c': [wide[2, 0], wide[3, 1], narrow[0, 1]],
      'd': [wide[2, 2], wide[3, 0]],
  }
  for name, embeddings in same.items():
    for other in embeddings[1:]:
      np.testing.assert_allclose(other, embeddings[0], **TOL, err_msg=name)
  assert not np.allclose(wide[0, 0], wide[1, 0], atol=1e-3)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    grids=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 2)),
                   min_size=1, max_size=3),
    order=st.randoms(use_true_random=False),
    seed=st.integers(0, 2**16))
def test_packing_invariance_property(grids, order, seed):
  rng = np.random.default_rng(seed)
  images = [random_image(rng, rows, cols, P) for rows, cols in grids]
  packed_order = list(range(len(images)))
  order.shuffle(packed_order)
  # Rows 0..2: each image alone (missing ones leave the row empty); row 3: all.
  alone = [[im] for im in images] + [[] for _ in range(3 - len(images))]
  out = embed(pack(alone + [[images[i] for i in packed_order]], **WIDE))
  for slot, i in enumerate(packed_order):
    np.testing.assert_allclose(out[3, slot], out[i, 0], **TOL)


def test_segment_isolation():
  rng = np.random.default_rng(2)
  a, b, c, d = _images(rng)
  b_changed = random_image(rng, *b.shape[:2], P)
  before = embed(pack([[b, a], [d, c, b], [a], [c]], **WIDE))
  after = embed(pack([[b_changed, a], [d, c, b_changed], [a], [c]], **WIDE))
  for r, k in [(0, 1), (1, 0), (1, 1), (2, 0), (3, 0)]:
    np.testing.assert_allclose(after[r, k], before[r, k], atol=1e-6)
  for r, k in [(0, 0), (1, 2)]:
    assert not np.allclose(after[r, k], before[r, k], atol=1e-3)


@pytest.mark.parametrize('posemb_kind,pool', CONFIGS[:2])
def test_empty_slots_are_zero(posemb_kind, pool):
  a, b, _, _ = _images(np.random.default_rng(3))
  out = embed(pack([[a], [b, a], [], []], **WIDE), posemb_kind=posemb_kind, pool=pool)
  assert np.all(out[0, 1:] == 0) and np.all(out[1, 2] == 0) and np.all(out[2:] == 0)
  assert np.all(np.abs(out[0, 0]) > 0)


@pytest.mark.parametrize('posemb_kind,pool', CONFIGS)
def test_grids_beyond_position_table_are_finite(posemb_kind, pool):
  rng = np.random.default_rng(4)
  big = random_image(rng, 2 * MAX_GRID, 2 * MAX_GRID + 1, P)  # Twice the table.
  out = embed(pack([[big], [random_image(rng, 1, 1, P)]], **NARROW),
              posemb_kind=posemb_kind, pool=pool)
  assert np.all(np.isfinite(out))
  assert not np.allclose(out[0, 0], out[1, 0], atol=1e-3)


def test_patch_size_must_be_square_times_three():
  with pytest.raises(ValueError, match='p\\*p\\*3'):
    navit.patch_size_of(50)
  assert navit.patch_size_of(16 * 16 * 3) == 16


def test_unknown_pool_raises():
  model = navit.NaViT(32, 1, 64, 2, base_patch_size=P, pool='cls')
  batch = pack([[random_image(np.random.default_rng(0), 1, 1, P)]], 1, 1)
  with pytest.raises(ValueError, match='unknown image pool'):
    model.init(jax.random.key(0), *image_inputs(batch))
