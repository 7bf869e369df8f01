"""Resolution sampling: aspect kept, budget respected, NaFlex sizing exact."""

import statistics

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_navit.data import resolution

sides = st.integers(1, 3000)
patch_sizes = st.sampled_from([1, 4, 8, 14, 16, 32])


def config(mode='side', dist='uniform', low=64, high=256, mean=-0.5, std=1.0):
  return ml_collections.ConfigDict(
      dict(mode=mode, dist=dist, min=low, max=high, mean=mean, std=std))


def assert_aspect_within_one_patch(height, width, grid):
  """The shorter side's patches are within one of what the aspect implies."""
  rows, cols = grid
  if height >= width:
    long_grid, short_grid, ratio = rows, cols, width / height
  else:
    long_grid, short_grid, ratio = cols, rows, height / width
  assert abs(short_grid - long_grid * ratio) < 1


@settings(max_examples=300, deadline=None)
@given(height=sides, width=sides, patch=patch_sizes,
       mode=st.sampled_from(resolution.MODES),
       dist=st.sampled_from(resolution.DISTRIBUTIONS),
       max_tokens=st.integers(1, 1024), seed=st.integers(0, 2**31))
def test_grid_keeps_aspect_and_budget(height, width, patch, mode, dist,
                                      max_tokens, seed):
  rng = np.random.default_rng(seed)
  grid = resolution.sample_grid(rng, height, width, patch,
                                config(mode, dist, 16, 1024), max_tokens)
  rows, cols = grid
  assert rows >= 1 and cols >= 1
  assert rows * cols <= max_tokens
  if mode != 'square':
    assert_aspect_within_one_patch(height, width, grid)


@settings(max_examples=200, deadline=None)
@given(height=sides, width=sides, patch=patch_sizes,
       length=st.floats(1, 4000))
def test_side_mode_sets_the_longer_side(height, width, patch, length):
  rows, cols = resolution.grid_for_long_side(height, width, length, patch,
                                             max_tokens=10**9)
  long_grid = rows if height >= width else cols
  assert long_grid == max(1, round(length / patch))


@settings(max_examples=100, deadline=None)
@given(height=st.integers(100, 400), aspect=st.floats(0.25, 4),
       seed=st.integers(0, 2**31))
def test_area_mode_sets_sqrt_of_area(height, aspect, seed):
  width = round(height * aspect)
  rng = np.random.default_rng(seed)
  length = resolution.sample_length(np.random.default_rng(seed), 'uniform',
                                    64, 256)
  rows, cols = resolution.sample_grid(rng, height, width, 1,
                                      config('area', low=64, high=256), 10**9)
  # With 1-pixel patches the grid is the pixel size, up to rounding.
  assert np.sqrt(rows * cols) == pytest.approx(length, rel=0.03)


def test_large_images_are_scaled_down_whole_not_cropped():
  # 4:1 at a 4096-pixel longer side would be 256 x 64 patches; the row has 256.
  rows, cols = resolution.grid_for_long_side(4096, 1024, 4096, 16, 256)
  assert (rows, cols) == (32, 8)
  # 100:1 wants 10000 / 16 = 625 patches along, capped at the row's 256. A
  # grid of c columns has round(c / 100) rows (at least 1, halves rounded up):
  # 1 row for c <= 149, 2 rows from c = 150, and 2 x 150 = 300 > 256 tokens.
  # So the widest grid that fits is 1 x 149, not 1 x 256.
  rows, cols = resolution.grid_for_long_side(100, 10_000, 10_000, 16, 256)
  assert (rows, cols) == (1, 149)


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 500), width=st.integers(1, 500),
       max_tokens=st.integers(1, 40))
def test_budget_grid_is_the_largest_naflex_size(height, width, max_tokens):
  """Brute force over all grids: none reachable by a larger scale fits."""
  rows, cols = resolution.grid_for_budget(height, width, max_tokens)
  assert rows * cols <= max_tokens

  # Grid (r, c) is what scale s gives iff s lies in ((r-1)/h, r/h] and in
  # ((c-1)/w, c/w] (times p); the largest such s is min(r/h, c/w). Scaled by
  # h * w everything is an integer.
  r, c = np.meshgrid(np.arange(1, max_tokens + 1), np.arange(1, max_tokens + 1),
                     indexing='ij')
  top = np.minimum(r * width, c * height)
  reachable = np.maximum((r - 1) * width, (c - 1) * height) < top
  fits = reachable & (r * c <= max_tokens)
  best = top[fits].max()
  assert reachable[rows - 1, cols - 1]
  assert top[rows - 1, cols - 1] == best


def test_budget_grid_examples():
  assert resolution.grid_for_budget(224, 224, 256) == (16, 16)
  assert resolution.grid_for_budget(100, 400, 256) == (8, 32)
  # A tiny image is scaled up to the budget.
  assert resolution.grid_for_budget(10, 10, 64) == (8, 8)
  # 15 x 17 (255) is one too many; of the smaller scales, the one giving
  # 16 columns beats the one giving 14 rows (16/170 > 14/150).
  assert resolution.grid_for_budget(150, 170, 254) == (15, 16)
  # An extreme aspect: one row, as many columns as fit.
  assert resolution.grid_for_budget(1, 2, 1) == (1, 1)
  assert resolution.grid_for_budget(3, 1000, 64) == (1, 64)


def native_grid(height, width, patch):
  """Each side rounded up to a whole patch."""
  return -(-height // patch), -(-width // patch)


@settings(max_examples=300, deadline=None)
@given(height=sides, width=sides, patch=patch_sizes,
       max_tokens=st.integers(1, 1024))
def test_native_grid_within_budget_never_upscaled(height, width, patch,
                                                  max_tokens):
  rows, cols = resolution.grid_for_native(height, width, patch, max_tokens)
  native_rows, native_cols = native_grid(height, width, patch)
  assert 1 <= rows and 1 <= cols and rows * cols <= max_tokens
  # Never past the native size rounded up to a patch, on either side.
  assert rows <= native_rows and cols <= native_cols
  assert_aspect_within_one_patch(height, width, (rows, cols))
  if native_rows * native_cols <= max_tokens:
    assert (rows, cols) == (native_rows, native_cols)
  else:  # Too large for the budget: exactly NaFlex's downscale.
    assert (rows, cols) == resolution.grid_for_budget(height, width, max_tokens)
  # Never more tokens than 'fit', which scales small images up.
  fit_rows, fit_cols = resolution.grid_for_budget(height, width, max_tokens)
  assert rows <= fit_rows and cols <= fit_cols


def test_native_grid_examples():
  # Small images keep their size: 1 x 1 and 14 x 14 patches, where 'fit'
  # scales them up to 8 x 8 and 16 x 16.
  assert resolution.grid_for_native(10, 10, 16, 64) == (1, 1)
  assert resolution.grid_for_native(224, 224, 16, 256) == (14, 14)
  # Rounded up: 100 x 400 is 6.25 x 25 patches.
  assert resolution.grid_for_native(100, 400, 16, 256) == (7, 25)
  # Too large: scaled down exactly as 'fit' does.
  assert resolution.grid_for_native(1024, 768, 16, 256) == (18, 14)
  assert resolution.grid_for_budget(1024, 768, 256) == (18, 14)
  cfg = config('native')
  assert resolution.sample_grid(None, 224, 224, 16, cfg, 256) == (14, 14)


def test_uniform_length_covers_range():
  rng = np.random.default_rng(0)
  draws = [resolution.sample_length(rng, 'uniform', 64, 256) for _ in range(4000)]
  assert min(draws) >= 64 and max(draws) <= 256
  assert np.mean(draws) == pytest.approx(160, abs=3)


@pytest.mark.parametrize('mean,std', [(-0.5, 1.0), (0.3, 0.2), (3.0, 0.5)])
def test_truncated_normal_matches_its_analytic_mean(mean, std):
  rng = np.random.default_rng(1)
  draws = np.array([resolution.truncated_normal(rng, mean, std, -1.0, 1.0)
                    for _ in range(5000)])
  normal = statistics.NormalDist()
  a, b = (-1 - mean) / std, (1 - mean) / std
  expected = mean + std * (normal.pdf(a) - normal.pdf(b)) / (
      normal.cdf(b) - normal.cdf(a))
  assert draws.min() >= -1 and draws.max() <= 1
  assert draws.mean() == pytest.approx(expected, abs=0.02)


def test_truncated_normal_length_favours_small_sides():
  rng = np.random.default_rng(2)
  draws = [resolution.sample_length(rng, 'truncated_normal', 64, 256, -0.5, 1.0)
           for _ in range(3000)]
  assert 64 <= min(draws) and max(draws) <= 256
  assert np.mean(draws) < 160 - 10


def test_same_key_same_grid():
  cfg = config('side', 'truncated_normal')

  def grid(key):
    return resolution.sample_grid(np.random.default_rng(key), 300, 200, 16, cfg, 256)

  keys = [[7, k] for k in range(20)]
  grids = [grid(key) for key in keys]
  # The same key gives the same grid, whatever was drawn in between ...
  assert [grid(key) for key in reversed(keys)] == grids[::-1]
  # ... and it is the grid of the length that key draws; other keys, other grids.
  for key, drawn in zip(keys, grids):
    length = resolution.sample_length(np.random.default_rng(key), 'truncated_normal',
                                      64, 256, -0.5, 1.0)
    assert drawn == resolution.grid_for_long_side(300, 200, length, 16, 256)
  assert len(set(grids)) >= 5


@pytest.mark.parametrize('bad', [dict(mode='crop'), dict(dist='gamma')])
def test_unknown_mode_or_distribution_is_an_error(bad):
  cfg = config(**bad)
  with pytest.raises(ValueError, match='resolution'):
    resolution.sample_grid(np.random.default_rng(0), 100, 100, 16, cfg, 256)


@settings(max_examples=100, deadline=None)
@given(height=sides, width=sides, patch=patch_sizes,
       max_tokens=st.integers(1, 4096))
def test_square_mode_is_the_largest_square_whatever_the_image(
    height, width, patch, max_tokens):
  rows, cols = resolution.sample_grid(None, height, width, patch,
                                      config('square'), max_tokens)
  assert rows == cols
  assert rows * cols <= max_tokens < (rows + 1) ** 2
