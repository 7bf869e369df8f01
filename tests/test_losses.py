"""Sharded losses equal the dense references in value, gradient and metrics."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lit_navit import losses
from lit_navit.sharding import batch_sharding, make_mesh

N, DIM = 32, 8
# Fractions of valid slots: all, most, few, exactly one (below), none.
DENSITIES = (1.0, 0.7, 0.2)


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embeddings(seed, n=N):
  """Pairs that are correlated, so that top-1 accuracy is neither 0 nor 1."""
  rng = np.random.default_rng(seed)
  zimg = rng.normal(size=(n, DIM))
  ztxt = zimg + 1.5 * rng.normal(size=(n, DIM))
  return (_normalise(zimg).astype(np.float32),
          _normalise(ztxt).astype(np.float32))


def _masks(seed, n=N):
  rng = np.random.default_rng(seed)
  masks = [rng.random(n) < d for d in DENSITIES]
  one = np.zeros(n, bool)
  one[rng.integers(n)] = True
  return masks + [one, np.zeros(n, bool)]


def _np_sigmoid_loss(zimg, ztxt, valid, t_log, b):
  logits = np.exp(t_log) * zimg @ ztxt.T + b
  total = 0.0
  for i in np.flatnonzero(valid):
    for j in np.flatnonzero(valid):
      z = 1.0 if i == j else -1.0
      total -= np.log(1 / (1 + np.exp(-z * logits[i, j])))
  return total / max(valid.sum(), 1)


def _np_softmax_loss(zimg, ztxt, valid, t_log):
  logits = np.exp(t_log) * zimg @ ztxt.T
  keep = np.flatnonzero(valid)
  sub = logits[np.ix_(keep, keep)]
  log_p_i2t = sub - np.log(np.exp(sub).sum(1, keepdims=True))
  log_p_t2i = sub - np.log(np.exp(sub).sum(0, keepdims=True))
  per_pair = -(np.diag(log_p_i2t) + np.diag(log_p_t2i)) / 2
  return per_pair.sum() / max(len(keep), 1)


def _np_metrics(logits, valid):
  keep = np.flatnonzero(valid)
  sub = logits[np.ix_(keep, keep)]
  n = len(keep)
  return {
      'pos_logit': np.diag(sub).mean(),
      'neg_logit': (sub.sum() - np.trace(sub)) / (n * (n - 1)),
      'i2t_top1': np.mean(sub.argmax(1) == np.arange(n)),
      't2i_top1': np.mean(sub.argmax(0) == np.arange(n)),
  }


@pytest.mark.parametrize('seed', [0, 1])
def test_sigmoid_dense_matches_numpy(seed):
  zimg, ztxt = _embeddings(seed)
  t_log, b = 2.0, -3.0
  for valid in _masks(seed):
    loss, metrics = losses.sigmoid_loss_dense(zimg, ztxt, valid, t_log, b)
    np.testing.assert_allclose(
        loss, _np_sigmoid_loss(zimg, ztxt, valid, t_log, b), rtol=1e-5)
    assert metrics['b'] == b and np.isclose(metrics['t'], np.exp(t_log))


@pytest.mark.parametrize('seed', [0, 1])
def test_softmax_dense_matches_numpy(seed):
  zimg, ztxt = _embeddings(seed)
  for valid in _masks(seed):
    loss, metrics = losses.softmax_loss_dense(zimg, ztxt, valid, 2.0)
    np.testing.assert_allclose(
        loss, _np_softmax_loss(zimg, ztxt, valid, 2.0), rtol=1e-5, atol=1e-7)
    assert 'b' not in metrics


@pytest.mark.parametrize('kind', ['sigmoid', 'softmax'])
def test_metrics_match_numpy(kind):
  zimg, ztxt = _embeddings(3, n=64)
  valid = np.random.default_rng(3).random(64) < 0.6
  t_log, b = 1.5, -1.0
  if kind == 'sigmoid':
    _, metrics = losses.sigmoid_loss_dense(zimg, ztxt, valid, t_log, b)
    logits = np.exp(t_log) * zimg @ ztxt.T + b
  else:
    _, metrics = losses.softmax_loss_dense(zimg, ztxt, valid, t_log)
    logits = np.exp(t_log) * zimg @ ztxt.T
  expected = _np_metrics(logits, valid)
  assert 0 < expected['i2t_top1'] < 1 and 0 < expected['t2i_top1'] < 1
  for key, value in expected.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)


MESHES = {
    '1dev': ([('data', 1), ('fsdp', 1)], 1),
    'data8': ([('data', 8), ('fsdp', 1)], 8),
    'data4_fsdp2': ([('data', 4), ('fsdp', 2)], 8),
}


def _mesh_over(axes, devices):
  return make_mesh(ml_collections.ConfigDict({'mesh': axes}),
                   jax.devices()[:devices])


def _mesh(name):
  return _mesh_over(*MESHES[name])


def _assert_equal_to_dense(sharded, dense, args, argnums):
  value_and_grad = lambda f: jax.jit(
      jax.value_and_grad(f, argnums=argnums, has_aux=True))
  sharded_fn, dense_fn = value_and_grad(sharded), value_and_grad(dense)
  zimg, ztxt = args[:2]
  for valid in _masks(seed=11):
    call_args = (zimg, ztxt, valid) + args[2:]
    (loss, metrics), grads = sharded_fn(*call_args)
    (want_loss, want_metrics), want_grads = dense_fn(*call_args)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):
      assert np.all(np.isfinite(got))
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
      np.testing.assert_allclose(
          metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
    if not valid.any():
      assert loss == 0 and all(np.all(g == 0) for g in grads)


@pytest.mark.parametrize('mesh_name', MESHES)
@pytest.mark.parametrize('with_bias', [True, False])
@pytest.mark.parametrize(
    'sharded', [losses.sigmoid_loss_ring, losses.sigmoid_loss_allgather],
    ids=['ring', 'allgather'])
def test_sharded_sigmoid_equals_dense(sharded, with_bias, mesh_name):
  mesh = _mesh(mesh_name)
  zimg, ztxt = _embeddings(mesh.size)
  if with_bias:
    args, argnums = (zimg, ztxt, 1.7, -2.5), (0, 1, 3, 4)
    shard_fn = lambda zi, zt, v, t, b: sharded(zi, zt, v, t, b, mesh=mesh)
    dense_fn = losses.sigmoid_loss_dense
  else:
    args, argnums = (zimg, ztxt, 1.7), (0, 1, 3)
    shard_fn = lambda zi, zt, v, t: sharded(zi, zt, v, t, mesh=mesh)
    dense_fn = lambda zi, zt, v, t: losses.sigmoid_loss_dense(zi, zt, v, t)
  _assert_equal_to_dense(shard_fn, dense_fn, args, argnums)


@pytest.mark.parametrize('mesh_name', MESHES)
def test_sharded_softmax_equals_dense(mesh_name):
  mesh = _mesh(mesh_name)
  zimg, ztxt = _embeddings(mesh.size + 1)
  _assert_equal_to_dense(
      lambda zi, zt, v, t: losses.softmax_loss_sharded(zi, zt, v, t, mesh=mesh),
      losses.softmax_loss_dense, (zimg, ztxt, 2.3), (0, 1, 3))


def test_ring_runs_on_sharded_global_arrays():
  mesh = _mesh('data4_fsdp2')
  zimg, ztxt = _embeddings(5)
  valid = _masks(5)[1]
  rows = batch_sharding(mesh)
  placed = [jax.device_put(x, rows) for x in (zimg, ztxt, valid)]
  ring = jax.jit(
      lambda *a: losses.sigmoid_loss_ring(*a, 1.0, -2.0, mesh=mesh))
  loss, _ = ring(*placed)
  want, _ = losses.sigmoid_loss_dense(zimg, ztxt, valid, 1.0, -2.0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_make_loss():
  mesh = _mesh('data8')
  zimg, ztxt = _embeddings(7)
  valid = _masks(7)[1]
  call = lambda name, b: jax.jit(losses.make_loss(name, mesh))(
      zimg, ztxt, valid, 1.0, b)[0]
  want = losses.sigmoid_loss_dense(zimg, ztxt, valid, 1.0, -2.0)[0]
  np.testing.assert_allclose(
      [call('sigmoid', -2.0), call('sigmoid_allgather', -2.0)], [want, want],
      rtol=1e-5)
  # The bias shifts every logit: no effect on a softmax.
  want = losses.softmax_loss_dense(zimg, ztxt, valid, 1.0)[0]
  np.testing.assert_allclose(
      [call('softmax', None), call('softmax', 5.0)], [want, want], rtol=1e-5)
  with pytest.raises(ValueError, match="'siglip'"):
    losses.make_loss('siglip', mesh)


def _temp_bytes(fn, n, mesh):
  zimg = jax.ShapeDtypeStruct((n, DIM), jnp.float32)
  valid = jax.ShapeDtypeStruct((n,), jnp.bool_)
  step = jax.jit(jax.value_and_grad(
      lambda zi, zt, v: fn(zi, zt, v, 1.0, -1.0, mesh=mesh)[0], argnums=(0, 1)))
  compiled = step.lower(zimg, zimg, valid).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_ring_memory_is_flat_in_device_count():
  """At a fixed per-device batch, the ring never materialises b x N logits."""
  per_device = 256
  block = per_device * per_device * 4  # Bytes of one b x b float32 block.
  mesh = lambda n: _mesh_over([('data', n), ('fsdp', 1)], n)
  ring = {n: _temp_bytes(losses.sigmoid_loss_ring, n * per_device, mesh(n))
          for n in (2, 8)}
  gathered = _temp_bytes(
      losses.sigmoid_loss_allgather, 8 * per_device, mesh(8))
  assert ring[8] <= ring[2] * 1.05
  assert ring[8] < 4 * block < 8 * block < gathered


def test_bfloat16_towers_get_a_float32_loss_and_bfloat16_gradients():
  mesh = _mesh('data8')
  zimg, ztxt = (x.astype(jnp.bfloat16) for x in _embeddings(9))
  valid = _masks(9)[1]
  loss_fn = lambda zi, zt: losses.sigmoid_loss_ring(
      zi, zt, valid, 1.0, -2.0, mesh=mesh)[0]
  loss, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(zimg, ztxt)
  want = losses.sigmoid_loss_dense(
      zimg.astype(jnp.float32), ztxt.astype(jnp.float32), valid, 1.0, -2.0)[0]
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert all(g.dtype == jnp.bfloat16 for g in grads)
