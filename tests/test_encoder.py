"""The attention seam and the shared encoder: masking, kernels, scan, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_navit.models import attention
from lit_navit.models import encoder

SEGMENTS = np.array([[1, 1, 1, 2, 2, 3, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)


def _qkv(seed=0, heads=2, head_dim=8):
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (*SEGMENTS.shape, heads, head_dim)
  return [jax.random.normal(k, shape) for k in keys]


def _softmax_attention(q, k, v):
  """Unmasked reference on one sequence: q, k, v [L, H, Dh]."""
  logits = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('hqk,khd->qhd', weights, v)


def test_segment_mask_keeps_segments_apart():
  mask = np.asarray(attention.segment_mask(SEGMENTS, SEGMENTS))
  assert mask.shape == (2, 1, 8, 8)
  assert mask[0, 0, 0, 2] and not mask[0, 0, 0, 3] and not mask[0, 0, 5, 6]
  assert mask[0, 0, 6, 7]  # Padding sees padding: no empty softmax row.
  assert mask.any(-1).all()


def test_dense_attention_equals_attention_per_segment():
  q, k, v = _qkv()
  out = np.asarray(attention.dense_attention(
      q, k, v, attention.segment_mask(SEGMENTS, SEGMENTS)))
  assert np.all(np.isfinite(out))
  for row in range(2):
    for seg in range(1, 4):
      idx = np.flatnonzero(SEGMENTS[row] == seg)
      if idx.size:
        expected = _softmax_attention(*(np.asarray(x[row, idx]) for x in (q, k, v)))
        np.testing.assert_allclose(out[row, idx], expected, atol=1e-5, rtol=1e-5)


def test_padding_does_not_leak():
  q, k, v = _qkv()
  mask = attention.segment_mask(SEGMENTS, SEGMENTS)
  pad = (SEGMENTS == 0)[..., None, None]
  noisy = [jnp.where(pad, 1e3 * x, x) for x in (q, k, v)]
  before = attention.dense_attention(q, k, v, mask)
  after = attention.dense_attention(*noisy, mask)
  np.testing.assert_array_equal(np.asarray(after)[~pad[..., 0, 0]],
                                np.asarray(before)[~pad[..., 0, 0]])


def test_all_masked_rows_stay_finite():
  q, k, v = _qkv()
  out = np.asarray(attention.dense_attention(q, k, v, jnp.zeros((2, 1, 8, 8), bool)))
  # A query with no allowed key averages the values (equal weights), so
  # its output is finite and still depends on them; not NaN, not a constant.
  mean = np.asarray(v).mean(axis=1, keepdims=True)
  np.testing.assert_allclose(out, np.broadcast_to(mean, out.shape), atol=1e-5, rtol=1e-5)


def test_xla_kernel_matches_dense():
  q, k, v = _qkv(seed=1)
  causal = jnp.tril(jnp.ones((8, 8), bool))
  for mask in (attention.segment_mask(SEGMENTS, SEGMENTS),
               attention.segment_mask(SEGMENTS, SEGMENTS) & causal, None):
    np.testing.assert_allclose(attention.get('xla')(q, k, v, mask),
                               attention.get('dense')(q, k, v, mask),
                               atol=1e-5, rtol=1e-5)


def test_get_resolves_names_and_callables():
  assert attention.get('dense') is attention.dense_attention
  assert attention.get(_softmax_attention) is _softmax_attention
  with pytest.raises(ValueError, match='unknown attention'):
    attention.get('flash')


def _encoder(**kwargs):
  return encoder.Encoder(depth=2, mlp_dim=64, num_heads=2, **kwargs)


def _inputs():
  x = jax.random.normal(jax.random.key(3), (2, 8, 32))
  return x, attention.segment_mask(SEGMENTS, SEGMENTS)


def test_scan_equals_unrolled_layers():
  x, mask = _inputs()
  scanned = _encoder(scan=True, qk_norm=True)
  params = jax.jit(scanned.init)(jax.random.key(0), x, mask)['params']
  assert params['encoderblock']['MlpBlock_0']['Dense_0']['kernel'].shape == (2, 32, 64)
  unrolled_params = {f'encoderblock_{i}': jax.tree.map(lambda a: a[i], params['encoderblock'])
                     for i in range(2)}
  unrolled_params['encoder_norm'] = params['encoder_norm']
  unrolled = _encoder(scan=False, qk_norm=True)
  np.testing.assert_allclose(
      jax.jit(unrolled.apply)({'params': unrolled_params}, x, mask),
      jax.jit(scanned.apply)({'params': params}, x, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('scan', [True, False])
def test_remat_wraps_each_block(scan):
  x, mask = _inputs()
  model = _encoder(scan=scan, remat_policy='dots_saveable')
  params = jax.eval_shape(model.init, jax.random.key(0), x, mask)
  jaxpr = str(jax.make_jaxpr(model.apply)(params, x, mask))
  assert jaxpr.count('remat') == (1 if scan else 2)


def test_remat_keeps_gradients():
  x, mask = _inputs()
  plain = _encoder()
  params = jax.jit(plain.init)(jax.random.key(0), x, mask)

  def grads(model):
    loss = lambda p: jnp.sum(model.apply(p, x, mask) ** 2)
    return jax.jit(jax.grad(loss))(params)

  expected = grads(plain)
  for policy in ('nothing_saveable', 'weights_saveable'):
    got = grads(_encoder(remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 got, expected)


def test_weights_saveable_saves_the_compute_dtype_kernels_and_nothing_else():
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=import-outside-toplevel
  x, mask = _inputs()

  def named_residuals(policy):
    model = _encoder(scan=False, remat_policy=policy, dtype=jnp.bfloat16)
    params = jax.eval_shape(model.init, jax.random.key(0), x, mask)
    loss = lambda p: jnp.sum(model.apply(p, x, mask).astype(jnp.float32))
    saved = saved_residuals(loss, params)
    return sorted((a.shape, a.dtype.name) for a, why in saved if 'gathered_weights' in why)

  # Per block: query, key, value [32, 2, 16], out [2, 16, 32], the MLP's two.
  block = [((2, 16, 32), 'bfloat16'), ((32, 2, 16), 'bfloat16'),
           ((32, 2, 16), 'bfloat16'), ((32, 2, 16), 'bfloat16'),
           ((32, 64), 'bfloat16'), ((64, 32), 'bfloat16')]
  assert named_residuals('weights_saveable') == sorted(2 * block)
  assert named_residuals('nothing_saveable') == []


def test_unknown_remat_policy_raises():
  x, mask = _inputs()
  with pytest.raises(ValueError, match='unknown remat_policy'):
    _encoder(remat_policy='sometimes').init(jax.random.key(0), x, mask)


def test_no_bias_and_qk_norm_params():
  x, mask = _inputs()
  params = jax.eval_shape(_encoder(use_bias=False, qk_norm=True).init,
                          jax.random.key(0), x, mask)
  block = params['params']['encoderblock']
  attn = block['MultiHeadDotProductAttention_0']
  assert set(attn['query']) == {'kernel'} and set(block['MlpBlock_0']['Dense_0']) == {'kernel'}
  assert set(attn['query_ln']) == {'scale'} and attn['query_ln']['scale'].shape == (2, 16)


def test_gathered_weights_leave_the_gradient_unconstrained():
  # Constrained replicated in the backward pass too, a kernel's gradient is
  # all-reduced whole instead of reduce-scattered to its fsdp shards.
  from lit_navit.models import partitioning  # pylint: disable=import-outside-toplevel
  mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  kernel, scale = jnp.ones((8, 4)), jnp.arange(4.0)
  loss = lambda k: jnp.sum(partitioning.gathered_weights(k) * scale)
  with jax.set_mesh(mesh):
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(loss))(kernel))
    grad = jax.jit(jax.grad(loss))(kernel)
  assert grad_jaxpr.count('sharding_constraint') == 1  # the forward's only
  np.testing.assert_array_equal(grad, jnp.broadcast_to(scale, (8, 4)))

