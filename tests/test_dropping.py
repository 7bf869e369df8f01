"""Token dropping: rate distributions, schedule, keyed draws, kept patches."""

import ast
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lit_navit.data import dropping
from lit_navit.data import patches as patches_lib


def config(**overrides):
  base = dict(kind='none', rate=0.0, rate_min=0.0, rate_max=0.5,
              resolution_sd=0.02, schedule_steps=0, schedule_end_factor=1.0)
  return ml_collections.ConfigDict({**base, **overrides})


def rates(cfg, num_tokens=100, n=4000, step=0, seed=0):
  return np.array([dropping.drop_rate(cfg, seed=seed, index=i, step=step,
                                      num_tokens=num_tokens, max_tokens=256)
                   for i in range(n)])


def test_none_and_constant():
  assert np.all(rates(config(), n=50) == 0)
  assert np.all(rates(config(kind='constant', rate=0.3), n=50) == 0.3)


@pytest.mark.parametrize('mean', [0.1, 0.5, 0.75])
def test_beta_rates_have_the_papers_mean_and_variance(mean):
  draws = rates(config(kind='beta', rate=mean))
  assert draws.min() >= 0 and draws.max() <= 1
  assert draws.mean() == pytest.approx(mean, abs=0.015)
  assert draws.var() == pytest.approx(0.3 * mean * (1 - mean), rel=0.08)


@settings(max_examples=50, deadline=None)
@given(mean=st.floats(0.01, 0.99))
def test_beta_parameters_solve_mean_and_variance(mean):
  a, b = dropping.beta_parameters(mean)
  assert a / (a + b) == pytest.approx(mean)
  variance = a * b / ((a + b) ** 2 * (a + b + 1))
  assert variance == pytest.approx(0.3 * mean * (1 - mean))


def test_resolution_rate_is_linear_in_token_count():
  cfg = config(kind='resolution', rate_min=0.1, rate_max=0.6)
  for num_tokens, mean in [(1, 0.1), (256, 0.6), (128, 0.1 + 0.5 * 127 / 255)]:
    draws = rates(cfg, num_tokens=num_tokens, n=2000)
    assert draws.mean() == pytest.approx(mean, abs=0.005)
    assert draws.std() == pytest.approx(0.02, rel=0.1)


def test_linear_schedule_scales_rates_over_steps():
  cfg = config(kind='constant', rate=0.4, schedule_steps=100,
               schedule_end_factor=0.0)
  assert dropping.schedule_factor(cfg, 0) == 1.0
  assert dropping.schedule_factor(cfg, 50) == pytest.approx(0.5)
  assert dropping.schedule_factor(cfg, 500) == 0.0
  assert rates(cfg, n=1, step=50)[0] == pytest.approx(0.2)
  draws = rates(config(kind='beta', rate=0.4, schedule_steps=10,
                       schedule_end_factor=0.5), step=10)
  assert draws.mean() == pytest.approx(0.2, abs=0.015)


def test_rates_are_keyed_by_seed_index_and_step():
  cfg = config(kind='beta', rate=0.5)
  def rate(seed, index, step):
    return dropping.drop_rate(cfg, seed=seed, index=index, step=step,
                              num_tokens=64, max_tokens=256)
  # Each part of the key matters, in its own place: swapping two parts (or
  # keying on their sum) gives another draw.
  keys = [(1, 2, 3), (0, 2, 3), (1, 0, 3), (1, 2, 0), (2, 1, 3), (1, 3, 2), (3, 2, 1)]
  first = [rate(*key) for key in keys]
  assert len(set(first)) == len(keys)
  # A draw depends on its key only: not on the draws made before it ...
  assert [rate(*key) for key in reversed(keys)] == first[::-1]
  # ... nor on the process (workers draw in their own processes).
  script = ('import ml_collections; from lit_navit.data import dropping; '
            f'cfg = ml_collections.ConfigDict({cfg.to_dict()!r}); '
            'print([dropping.drop_rate(cfg, seed=s, index=i, step=t, num_tokens=64, '
            f'max_tokens=256) for s, i, t in {keys!r}])')
  out = subprocess.run([sys.executable, '-c', script], check=True, capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
  assert ast.literal_eval(out) == first


def test_unknown_kind_is_an_error():
  with pytest.raises(ValueError, match='token_drop.kind'):
    rates(config(kind='random'), n=1)


@settings(max_examples=100, deadline=None)
@given(num_tokens=st.integers(1, 10_000), rate=st.floats(0, 1))
def test_kept_count_keeps_at_least_one(num_tokens, rate):
  kept = dropping.kept_count(num_tokens, rate)
  assert 1 <= kept <= num_tokens
  assert abs(kept - (1 - rate) * num_tokens) <= max(0.5, 1 - (1 - rate) * num_tokens)


@st.composite
def patches_and_keep(draw):
  rows, cols = draw(st.integers(1, 8)), draw(st.integers(1, 8))
  image = draw(hnp.arrays(np.uint8, (rows * 2, cols * 2, 3)))
  keep = draw(st.integers(1, rows * cols))
  return patches_lib.patchify(image, 2), keep


@settings(max_examples=100, deadline=None)
@given(case=patches_and_keep(), index=st.integers(0, 10**6),
       step=st.integers(0, 10**6))
def test_dropped_patches_keep_coordinates_and_order(case, index, step):
  patches, keep = case
  kept = dropping.drop_patches(patches, keep, seed=0, index=index, step=step)
  assert len(kept) == keep and kept.grid == patches.grid
  cols = patches.grid[1]
  flat = kept.yx[:, 0] * cols + kept.yx[:, 1]
  assert np.all(np.diff(flat) > 0)  # A subset, in row-major order.
  np.testing.assert_array_equal(kept.pixels, patches.pixels[flat])
  again = dropping.drop_patches(patches, keep, seed=0, index=index, step=step)
  np.testing.assert_array_equal(again.yx, kept.yx)


def test_drop_patches_rejects_bad_keep():
  patches = patches_lib.patchify(np.zeros((4, 4, 3), np.uint8), 2)
  for keep in (0, 5):
    with pytest.raises(ValueError, match='keep'):
      dropping.drop_patches(patches, keep, seed=0, index=0, step=0)
