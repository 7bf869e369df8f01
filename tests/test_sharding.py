"""Mesh, partition rules, state and batch shardings, multi-host start-up."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lit_navit import optim
from lit_navit import rules
from lit_navit import sharding


def _mesh(axes):
  return sharding.make_mesh(ml_collections.ConfigDict({'mesh': axes}))


def _abstract(shapes):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


PARAMS = _abstract({
    'img': {'embedding': {'kernel': (6, 16), 'bias': (16,)},
            'head': {'kernel': (16, 6)},
            'odd': {'kernel': (3, 5)}},
    'txt': {'Embed_0': {'embedding': (12, 8)}},
    't': (),
})
PARAMS_SHAPES = dict(zip(rules.tree_paths(PARAMS),
                         (x.shape for x in jax.tree.leaves(PARAMS))))


def test_default_mesh_is_data_parallel_over_all_devices():
  mesh = sharding.make_mesh(sharding.default_config())
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 1}
  assert mesh.size == len(jax.devices())


@pytest.mark.parametrize('axes,shape', [
    ([('data', -1), ('fsdp', 2)], {'data': 4, 'fsdp': 2}),
    ([('data', 2), ('fsdp', -1)], {'data': 2, 'fsdp': 4}),
    ([('data', 1), ('fsdp', 8)], {'data': 1, 'fsdp': 8}),
])
def test_mesh_fills_in_the_rest(axes, shape):
  assert dict(_mesh(axes).shape) == shape


@pytest.mark.parametrize('axes,match', [
    ([('data', 3), ('fsdp', -1)], '8 devices'),
    ([('data', 2), ('fsdp', 2)], '8 devices'),
    ([('data', -1), ('fsdp', -1)], 'at most one'),
])
def test_bad_mesh_is_rejected(axes, match):
  with pytest.raises(ValueError, match=match):
    _mesh(axes)


def _specs(shardings):
  return dict(zip(rules.tree_paths(shardings),
                  (s.spec for s in jax.tree.leaves(shardings))))


def test_fsdp_picks_the_largest_evenly_divisible_dimension():
  mesh = _mesh([('data', 2), ('fsdp', 4)])
  specs = _specs(sharding.param_shardings(PARAMS, [('.*', 'fsdp')], mesh))
  assert specs == {
      'img/embedding/kernel': P(None, 'fsdp'),   # 16 > 6, and 6 % 4 != 0.
      'img/embedding/bias': P('fsdp'),
      'img/head/kernel': P('fsdp', None),
      'img/odd/kernel': P(),                     # Nothing divides: replicate.
      'txt/Embed_0/embedding': P('fsdp', None),  # 12 > 8: both divide.
      't': P(),
  }


def test_fsdp_with_a_dimension_shards_it_when_it_divides():
  # Attention kernels, scanned: [depth, width, heads, head_dim] and
  # [depth, heads, head_dim, width]; 'fsdp' alone would take the width.
  params = _abstract({'qkv': (3, 32, 4, 8), 'out': (3, 4, 8, 32), 'few_heads': (3, 32, 2, 8)})
  rules_ = [('qkv|few_heads', 'fsdp:-2'), ('out', 'fsdp:-3'), ('.*', 'fsdp')]
  specs = _specs(sharding.param_shardings(params, rules_, _mesh([('data', 2), ('fsdp', 4)])))
  assert specs == {'qkv': P(None, None, 'fsdp', None), 'out': P(None, 'fsdp', None, None),
                   'few_heads': P(None, 'fsdp', None, None)}  # 2 heads: the width
  with pytest.raises(ValueError, match="'fsdp:heads'"):
    sharding.param_shardings(params, [('.*', 'fsdp:heads')], _mesh([('data', 8), ('fsdp', 1)]))


def test_fsdp_of_size_one_and_replicate_rule_replicate():
  rules_ = [('img/.*', 'replicate'), ('.*', 'fsdp')]
  specs = _specs(sharding.param_shardings(
      PARAMS, rules_, _mesh([('data', 4), ('fsdp', 2)])))
  assert all(specs[p] == P() for p in specs if p.startswith('img/'))
  assert specs['txt/Embed_0/embedding'] == P('fsdp', None)
  specs = _specs(sharding.param_shardings(
      PARAMS, [('.*', 'fsdp')], _mesh([('data', 8), ('fsdp', 1)])))
  assert set(specs.values()) == {P()}


def test_params_are_placed_as_specified_on_8_devices():
  mesh = _mesh([('data', 2), ('fsdp', 4)])
  shardings = sharding.param_shardings(PARAMS, [('.*', 'fsdp')], mesh)
  params = jax.tree.map(lambda a: jnp.ones(a.shape), PARAMS)
  placed = jax.device_put(params, shardings)
  kernel = placed['img']['embedding']['kernel']
  assert len(kernel.addressable_shards) == 8
  assert {s.data.shape for s in kernel.addressable_shards} == {(6, 4)}
  embedding = placed['txt']['Embed_0']['embedding']
  assert {s.data.shape for s in embedding.addressable_shards} == {(3, 8)}
  odd = placed['img']['odd']['kernel']
  assert {s.data.shape for s in odd.addressable_shards} == {(3, 5)}


def test_rules_must_cover_every_parameter_and_be_known():
  mesh = _mesh([('data', 4), ('fsdp', 2)])
  with pytest.raises(ValueError) as error:
    sharding.param_shardings(PARAMS, [('img/.*', 'fsdp')], mesh)
  assert 'txt/Embed_0/embedding' in str(error.value)
  assert 't' in str(error.value).split(': ')[-1].split(', ')
  with pytest.raises(ValueError, match="'shard'"):
    sharding.param_shardings(PARAMS, [('.*', 'shard')], mesh)


@pytest.mark.parametrize('optax_name', ['adam', 'adafactor'])
def test_state_shardings_follow_the_params(optax_name):
  mesh = _mesh([('data', 2), ('fsdp', 4)])
  config = optim.default_config()
  config.optax_name = optax_name
  config.optax = {} if optax_name == 'adafactor' else config.optax
  config.schedule = [('img/odd/.*', None),
                     ('.*', dict(decay_type='cosine', warmup_steps=1))]
  tx, _ = optim.make_optimizer(config, PARAMS, total_steps=10)
  param_shardings = sharding.param_shardings(PARAMS, [('.*', 'fsdp')], mesh)
  abstract_state = jax.eval_shape(tx.init, PARAMS)
  state_shardings = sharding.state_shardings(
      abstract_state, PARAMS, param_shardings, mesh)

  specs = _specs(state_shardings)
  shapes = dict(zip(rules.tree_paths(abstract_state),
                    (x.shape for x in jax.tree.leaves(abstract_state))))
  param_specs = _specs(param_shardings)
  for path, spec in specs.items():
    owner = [p for p in param_specs if path.endswith('/' + p)]
    if owner and shapes[path] == PARAMS_SHAPES[owner[0]]:
      assert spec == param_specs[owner[0]], path
    else:
      assert spec == P(), path
  if optax_name == 'adam':  # Both moments of the kernel are fsdp-sharded.
    sharded = [p for p in specs if p.endswith('img/embedding/kernel')]
    assert len(sharded) == 2
    assert all(specs[p] == P(None, 'fsdp') for p in sharded)

  # The trainer's use: initialise the state straight into its shardings.
  params = jax.device_put(jax.tree.map(lambda a: jnp.ones(a.shape), PARAMS),
                          param_shardings)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  for leaf, want in zip(jax.tree.leaves(state),
                        jax.tree.leaves(state_shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def test_global_batch_splits_rows_over_data_and_fsdp():
  mesh = _mesh([('data', 4), ('fsdp', 2)])
  local = {'valid': np.arange(16) % 3 > 0,
           'image/patches': np.arange(240, dtype=np.float32).reshape(16, 5, 3)}
  batch = sharding.make_global_batch(local, mesh)
  for key, value in local.items():
    assert batch[key].sharding.is_equivalent_to(
        sharding.batch_sharding(mesh), value.ndim)
    np.testing.assert_array_equal(np.asarray(batch[key]), value)
    assert {s.data.shape[0] for s in batch[key].addressable_shards} == {2}
  # Device (data i, fsdp j) holds rows 2 * (2 i + j) and the next.
  device = mesh.devices[1, 1]
  shard = next(s for s in batch['image/patches'].addressable_shards
               if s.device == device)
  np.testing.assert_array_equal(shard.data, local['image/patches'][6:8])


@pytest.fixture
def initialize_calls(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda *args, **kwargs: calls.append(args))
  for var in ('JAX_COORDINATOR_ADDRESS', 'TPU_PROCESS_ADDRESSES',
              'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(var, raising=False)
  return calls


def test_single_host_does_not_initialize(initialize_calls, monkeypatch):
  sharding.initialize_distributed()
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'host0')
  sharding.initialize_distributed()
  assert initialize_calls == []


def test_multi_host_initializes(initialize_calls, monkeypatch):
  sharding.initialize_distributed('10.0.0.1:1234', 2, 1)
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'host0,host1')
  sharding.initialize_distributed()
  monkeypatch.delenv('TPU_WORKER_HOSTNAMES')
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  sharding.initialize_distributed()
  assert initialize_calls == [('10.0.0.1:1234', 2, 1), (None, None, None),
                              (None, None, None)]


def test_caption_gather_stays_on_each_device():
  """With one caption group per device, slot embeddings never cross devices."""
  from lit_navit.models import two_towers  # pylint: disable=import-outside-toplevel
  mesh = _mesh([('data', 4), ('fsdp', 2)])
  rows, slots, captions, dim = 16, 3, 4, 5
  rng = np.random.default_rng(0)
  slot_emb = rng.normal(size=(rows, slots, dim)).astype(np.float32)
  # Group g (rows 2g, 2g+1) owns captions of its own six slots only.
  caption_slot = rng.integers(0, 2 * slots, (8, captions)).astype(np.int32)
  batch = sharding.make_global_batch(
      {'slots': slot_emb, 'caption_slot': caption_slot}, mesh)
  gather = jax.jit(two_towers.gather_to_captions,
                   out_shardings=sharding.batch_sharding(mesh))
  hlo = gather.lower(batch['slots'], batch['caption_slot']).compile().as_text()
  for collective in ('all-gather', 'all-to-all', 'collective-permute',
                     'all-reduce'):
    assert collective not in hlo
  out = np.asarray(gather(batch['slots'], batch['caption_slot']))
  by_group = slot_emb.reshape(8, 2 * slots, dim)
  expected = np.stack([by_group[g, caption_slot[g]] for g in range(8)])
  np.testing.assert_array_equal(out, expected.reshape(-1, dim))
