"""The optax chain: freezing, decay, lr mults, clipping, schedules, rules."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lit_navit import optim
from lit_navit import rules

# Every leaf shape is unique, so a state leaf's shape says whose it is.
SHAPES = {
    'img': {'embedding': {'kernel': (4, 6), 'bias': (6,)},
            'Transformer': {'encoderblock': {'MlpBlock_0': {
                'Dense_0': {'kernel': (6, 7), 'bias': (7,)}}}}},
    'txt': {'Embed_0': {'embedding': (9, 5)},
            'Dense_0': {'kernel': (5, 3), 'bias': (3,)}},
    't': (),
    'b': (1,),
}


def _params(seed=0):
  keys = iter(jax.random.split(jax.random.key(seed), 16))
  return jax.tree.map(lambda s: jax.random.normal(next(keys), s), SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def _config(**overrides):
  config = optim.default_config()
  config.schedule = [('.*', dict(decay_type='constant'))]
  config.update(overrides)
  return config


def _steps(config, params, grads_fn, steps=4):
  tx, _ = optim.make_optimizer(config, params, total_steps=100)
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    updates, state = tx.update(grads_fn(params, i), state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, i)
  return params, state


def _first_update(config, grads, params):
  tx, _ = optim.make_optimizer(config, params, total_steps=10)
  return jax.jit(tx.update)(grads, tx.init(params), params)[0]


def _random_grads(params, i):
  keys = iter(jax.random.split(jax.random.key(100 + i), 16))
  return jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)


def _bits(x):
  return np.asarray(x).view(np.uint32)


@pytest.mark.parametrize('frozen,trained', [('img', 'txt'), ('txt', 'img')])
@pytest.mark.parametrize('optax_name', ['adam', 'adafactor'])
def test_frozen_tower_is_unchanged_and_has_no_state(
    frozen, trained, optax_name):
  config = _config(optax_name=optax_name)
  if optax_name == 'adafactor':
    config.optax = dict(min_dim_size_to_factor=4)
  config.schedule = [(f'{frozen}/.*', None),
                     ('.*', dict(decay_type='cosine', warmup_steps=2))]
  params = _params()
  new_params, state = _steps(config, params, _random_grads)

  for old, new in zip(jax.tree.leaves(params[frozen]),
                      jax.tree.leaves(new_params[frozen])):
    np.testing.assert_array_equal(_bits(old), _bits(new))
  assert all(np.any(old != new) for old, new in zip(
      jax.tree.leaves(params[trained]), jax.tree.leaves(new_params[trained])))

  frozen_shapes = {p.shape for p in jax.tree.leaves(params[frozen])}
  assert not any(leaf.shape in frozen_shapes for leaf in jax.tree.leaves(state))
  assert not any(f'{frozen}/' in path for path in rules.tree_paths(state))
  assert any(f'{trained}/' in path for path in rules.tree_paths(state))


def test_frozen_gradients_do_not_count_towards_clipping():
  config = _config(grad_clip_norm=1.0, wd=0.0, optax_name='adam')
  config.schedule = [('img/.*', None), ('.*', dict(decay_type='constant'))]
  config.optax = dict(b1=0.0, b2=0.0)  # Update = g / |g|: sensitive to scale.
  params = _params()
  small = lambda p, i: jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), p)

  def huge_on_img(p, i):
    grads = small(p, i)
    grads['img'] = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), p['img'])
    return grads

  want, _ = _steps(config, params, small, steps=1)
  got, _ = _steps(config, params, huge_on_img, steps=1)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_clipping_scales_to_the_global_norm():
  config = _config(grad_clip_norm=0.5, optax_name='adam', wd=0.0)
  # With a huge eps, Adam's first step is g / eps: linear in the gradient.
  config.optax = dict(eps=1e8)
  params = _params()
  grads = _random_grads(params, 0)
  assert optax.tree.norm(grads) > 1.0
  updates = _first_update(config, grads, params)
  norm = optax.tree.norm(updates) * config.optax.eps / config.lr
  np.testing.assert_allclose(norm, 0.5, rtol=1e-5)


def test_decay_and_lr_mults():
  config = _config(lr=0.1, wd=0.01, optax_name='adam',
                   lr_mults=[('txt/.*', 0.5)],
                   wd_mults=[('img/.*/kernel', 2.0), ('.*/kernel', 1.0)])
  params = _params()
  # Adam turns a zero gradient into a zero step: what is left is decay.
  updates = _first_update(
      config, jax.tree.map(jnp.zeros_like, params), params)
  lr, wd = config.lr, config.wd
  expected = {
      'img/embedding/kernel': -lr * wd * 2.0,
      'img/embedding/bias': 0.0,
      'img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel': -lr * wd * 2.0,
      'txt/Dense_0/kernel': -lr * 0.5 * wd,
      'txt/Dense_0/bias': 0.0,
      'txt/Embed_0/embedding': 0.0,
      't': 0.0,
  }
  flat_updates = dict(zip(rules.tree_paths(updates), jax.tree.leaves(updates)))
  flat_params = dict(zip(rules.tree_paths(params), jax.tree.leaves(params)))
  for path, factor in expected.items():
    np.testing.assert_allclose(
        flat_updates[path], factor * flat_params[path], rtol=1e-6, err_msg=path)


@pytest.mark.parametrize('optax_name', ['adam', 'adamw', 'adafactor'])
def test_every_optimizer_descends(optax_name):
  config = _config(optax_name=optax_name, wd=0.0)
  if optax_name == 'adafactor':
    config.optax = {}
  params = _params()
  tx, _ = optim.make_optimizer(config, params, total_steps=10)
  state = tx.init(params)
  loss = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(jax.grad(loss)(params), state, params)
    new_params = optax.apply_updates(params, updates)
    assert loss(new_params) < loss(params)
    params = new_params


def test_schedule_values():
  total, warmup = 110, 10
  cosine = optim.make_schedule(
      total, decay_type='cosine', warmup_steps=warmup, min_lr=0.1)
  np.testing.assert_allclose(
      [cosine(0), cosine(5), cosine(warmup), cosine(60), cosine(total)],
      [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  linear = optim.make_schedule(
      total, decay_type='linear', warmup_steps=warmup, linear_end=0.2)
  np.testing.assert_allclose(
      [linear(warmup), linear(60), linear(total)], [1.0, 0.6, 0.2], atol=1e-6)
  constant = optim.make_schedule(total, decay_type='constant')
  np.testing.assert_allclose([constant(0), constant(60), constant(total)], 1.0)
  rsqrt = optim.make_schedule(total, decay_type='rsqrt', warmup_steps=warmup,
                              timescale=40, cooldown_steps=20)
  np.testing.assert_allclose(
      [rsqrt(warmup), rsqrt(50), rsqrt(100), rsqrt(total)],
      [1.0, 2 ** -0.5, 0.5 * (1 + 90 / 40) ** -0.5, 0.0], atol=1e-6)


def test_schedule_percent_and_errors():
  by_percent = optim.make_schedule(100, decay_type='cosine', warmup_percent=0.2)
  np.testing.assert_allclose([by_percent(10), by_percent(20)], [0.5, 1.0])
  with pytest.raises(ValueError, match='warmup_steps and warmup_percent'):
    optim.make_schedule(100, decay_type='cosine', warmup_steps=5,
                        warmup_percent=0.1)
  with pytest.raises(ValueError, match="'cosin'"):
    optim.make_schedule(100, decay_type='cosin')


def test_schedule_fns_per_group():
  config = _config(lr=0.01)
  config.schedule = [
      ('img/.*', None),
      ('txt/.*', dict(decay_type='cosine', warmup_steps=10)),
      ('.*', dict(decay_type='constant'))]
  _, fns = optim.make_optimizer(config, _params(), total_steps=110)
  assert set(fns) == {'txt/.*', '.*'}
  np.testing.assert_allclose([fns['txt/.*'](10), fns['txt/.*'](60)],
                             [0.01, 0.005], rtol=1e-6)
  np.testing.assert_allclose(fns['.*'](60), 0.01)


def test_a_single_schedule_dict_applies_to_all():
  config = ml_collections.ConfigDict({
      **_config().to_dict(),
      'schedule': {'decay_type': 'linear', 'linear_end': 0.0}})
  _, fns = optim.make_optimizer(config, _params(), total_steps=10)
  np.testing.assert_allclose(fns['.*'](5), 0.5 * config.lr)


def test_unmatched_parameters_are_listed():
  config = _config()
  config.schedule = [('img/.*', dict(decay_type='constant'))]
  with pytest.raises(ValueError) as error:
    optim.make_optimizer(config, _params(), total_steps=10)
  message = str(error.value)
  assert 'config.schedule' in message
  for name in ('txt/Dense_0/kernel', 'txt/Embed_0/embedding', 't', 'b'):
    assert name in message
  assert 'img/' not in message


def test_unknown_optimizer_is_named():
  with pytest.raises(ValueError, match="'sgd'"):
    optim.make_optimizer(_config(optax_name='sgd'), _params(), total_steps=10)


def test_rules_first_match_wins_and_match_whole_paths():
  params = _params()
  got = rules.match_rules(
      params,
      [('img/.*/kernel', 'a'), ('img/.*', 'b'), ('t', 'c'), ('.*', 'd')],
      'test rules')
  flat = dict(zip(rules.tree_paths(params), jax.tree.leaves(got)))
  assert flat['img/embedding/kernel'] == 'a'
  assert flat['img/embedding/bias'] == 'b'
  assert flat['t'] == 'c'
  assert flat['txt/Dense_0/kernel'] == 'd'  # 't' must match the whole path.


def test_tree_paths_join_keys_with_slashes():
  paths = rules.tree_paths(_params())
  assert 'img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel' in paths
  assert len(paths) == len(jax.tree.leaves(_params()))
