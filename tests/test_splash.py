"""Splash attention (Pallas, interpret mode on CPU) equals the dense
segment-masked attention over packed rows, values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_navit.models import attention

splash = functools.partial(attention.splash_attention, interpret=True)


def _inputs(head_dim):
  rng = np.random.default_rng(head_dim)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 128, 2, head_dim)), jnp.float32)
             for _ in range(3))
  segment = np.zeros((2, 128), np.int32)
  segment[0, :50], segment[0, 50:90], segment[0, 90:100] = 1, 2, 3  # then padding
  segment[1, :] = 1  # one image fills the row
  segment = jnp.asarray(segment)
  return q, k, v, attention.Segments(segment, segment)


@pytest.mark.parametrize('head_dim', [64, 72])
def test_splash_matches_dense_segment_attention(head_dim):
  q, k, v, segments = _inputs(head_dim)
  np.testing.assert_allclose(splash(q, k, v, segments),
                             attention.dense_attention(q, k, v, segments), atol=2e-6)

  def grads(fn):
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, segments)))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  for ours, dense in zip(grads(splash), grads(attention.dense_attention)):
    np.testing.assert_allclose(ours, dense, atol=5e-6)


def test_splash_keeps_segments_apart():
  q, k, v, segments = _inputs(64)
  changed = v.at[0, 50:90].add(10.0)  # only image 2 of row 0
  before, after = splash(q, k, v, segments), splash(q, k, changed, segments)
  np.testing.assert_array_equal(before[0, :50], after[0, :50])
  np.testing.assert_array_equal(before[0, 90:], after[0, 90:])
  assert not np.allclose(before[0, 50:90], after[0, 50:90])


def test_splash_refuses_a_mask_array():
  q, k, v, segments = _inputs(64)
  with pytest.raises(ValueError, match='segment ids'):
    splash(q, k, v, attention.segment_mask(*segments))
